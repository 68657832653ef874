import datetime

import pytest
import yaml

from jmp_ext.train.config import ConfigError, TrainConfig, build_config, from_dict, load_config, save_config, to_dict
from jmp_ext.train.presets import PRESETS, demo

TASK = {"name": "a", "train": "/data/a", "targets": [{"name": "energy", "kind": "energy"}]}


def test_defaults_and_types():
    cfg = build_config({"mode": "pretrain", "tasks": [TASK], "optim": {"lr": 1}})
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for a float
    assert cfg.tasks[0].targets[0].coef == 1.0


@pytest.mark.parametrize("raw, override, match", [
    ({}, "optim.lrr=1", r"optim\.lrr: unknown key"),
    ({}, "loop.max_steps=ten", r"loop\.max_steps: expected an integer"),
    ({}, "loop.max_steps=1.5", r"loop\.max_steps: expected an integer"),
    ({}, "loop.progress=1", r"loop\.progress: expected bool"),
    ({}, "loop.precision=fp8", r"loop\.precision: 'fp8' is not one of"),
    ({}, "tasks.0.targets.0.kind=energyy", r"tasks\.0\.targets\.0\.kind"),
    ({}, "tasks.3.train=x", r"tasks\.3\.train: tasks has 1 item\(s\), '3' is not an index of it; .*tasks=\["),
    # A mistyped list key: unknown, not "not set ... set the whole list", whose advice then failed.
    ({}, "tasks.0.target.0.name=mu", r"tasks\.0\.target: unknown key \(known: name, train, .*targets"),
    ({}, "optim.llrd_block.0=0.5", r"optim\.llrd_block: unknown key \(known: .*llrd_blocks"),
    ({}, "optim.llrd_blocks.0=0.5", r"optim\.llrd_blocks\.0: optim\.llrd_blocks is not set in the config .* "
                                    r"set the whole list: optim\.llrd_blocks=\["),
    ({"optim": {"lr": 1e-3}}, "optim.lr.x=1", r"optim\.lr\.x: optim\.lr is a float, it has no key 'x'"),
    ({2: "x", "b": 1}, "seed=1", r"2: unknown key"),
    ({}, "optim.betas={a: 010}", r"optim\.betas: expected a list, got dict \{'a': 010\}"),  # as written
    ({}, "optim.lr=[1,", r"override 'optim\.lr=\[1,': invalid YAML"),
    ({}, "optim.betas=[0.9]", r"optim\.betas must be two numbers"),
    ({}, "nonsense", r"not of the form key\.path=value"),
    ({"preset": "nope"}, "seed=1", r"preset: unknown preset 'nope'"),
    ({}, "loop.log_every=0", r"loop\.log_every must be >= 1"),
    ({}, "loop.ckpt_every=0", r"loop\.ckpt_every must be >= 1"),
    ({}, "tasks.0.targets.0.name=U_0", r"target 'U_0': kind energy is the dataset's 'energy' field"),
    ({}, "tasks.0.targets.0.reduction=mean", r"target energy: an energy is a sum over atoms .* not a mean; .*kind "
                                             r"scalar with reduction mean"),
    # Non-finite floats, however written, fail here rather than mid-run.
    ({}, "optim.lr=.nan", r"optim\.lr: expected a finite number, got nan"),
    ({}, "optim.lr=nan", r"optim\.lr: expected a finite number, got nan"),
    ({}, "optim.lr=.inf", r"optim\.lr: expected a finite number, got inf"),
    ({}, "optim.weight_decay=-.inf", r"optim\.weight_decay: expected a finite number, got -inf"),
    ({}, "optim.betas=[0.9, .nan]", r"optim\.betas\.1: expected a finite number, got nan"),
    ({}, "tasks.0.targets.0.coef=1e999", r"tasks\.0\.targets\.0\.coef: expected a finite number, got inf"),
    # Ranges.
    ({}, "optim.weight_decay=-0.1", r"optim\.weight_decay must be >= 0, got -0\.1"),
    ({}, "optim.grad_clip_norm=-1", r"optim\.grad_clip_norm must be >= 0"),
    ({}, "optim.grad_clip_value=-1", r"optim\.grad_clip_value must be >= 0"),
    ({}, "graph.cutoff=-1", r"graph\.cutoff must be >= 0"),
    ({}, "graph.max_neighbors=-1", r"graph\.max_neighbors must be >= 0"),
    ({}, "graph.preset=oc21", r"graph\.preset: unknown GraphConfig preset 'oc21'"),
    ({}, "tasks.0.graph={preset: qm8}", r"graph\.preset: unknown GraphConfig preset 'qm8'"),
    ({}, "model.edge_dropout=1", r"model\.edge_dropout must be in \[0, 1\), got 1\.0"),
    ({}, "model.dropout=-0.1", r"model\.dropout must be in \[0, 1\)"),
    ({}, "model.freeze_blocks=[0, -1]", r"model\.freeze_blocks entries must be >= 0"),
    ({}, "model.backbone_overrides.edge_dropout=0.2", r"backbone_overrides\.edge_dropout: set model\.edge_dropout"),
    ({}, "data.batch_size=0", r"data\.batch_size must be >= 1"),
    ({}, "data.val_batch_size=0", r"data\.val_batch_size must be >= 1"),
    ({}, "data.temperature=0", r"data\.temperature must be > 0"),
    ({}, "data.max_atoms=-1", r"data\.max_atoms must be >= 0"),
    ({}, "data.num_workers=-1", r"data\.num_workers must be >= 0"),
    ({}, "schedule.warmup=-1", r"schedule\.warmup must be >= 0"),
    ({}, "schedule.cosine=-1", r"schedule\.cosine must be >= 0"),
    ({}, "schedule.warmup_start_factor=0", r"schedule\.warmup_start_factor must be in \(0, 1\]"),
    ({}, "schedule.min_lr_factor=1.5", r"schedule\.min_lr_factor must be in \(0, 1\]"),
    ({}, "schedule.plateau_patience=-1", r"schedule\.plateau_patience must be >= 0"),
    ({}, "schedule.plateau_factor=1", r"schedule\.plateau_factor must be in \(0, 1\)"),
    ({"loop": {"max_epochs": 1}}, "loop.max_steps=-1", r"loop\.max_steps must be >= 0"),
    ({}, "loop.max_epochs=-1", r"loop\.max_epochs must be >= 0"),
    ({}, "loop.val_every=-1", r"loop\.val_every must be >= 0"),
    ({}, "loop.early_stop_patience=-1", r"loop\.early_stop_patience must be >= 0"),
    ({}, "loop.min_lr=-1", r"loop\.min_lr must be >= 0"),
    ({}, "loop.fit_scale_factors=-1", r"loop\.fit_scale_factors must be >= 0"),
    ({}, "threads=-1", r"threads must be >= 0"),
    ({}, "tasks.0.name=a/b", r"task name 'a/b' must be non-empty and without '/'"),
    ({}, "tasks.0.name=", r"task name '' must be non-empty"),
    ({}, "tasks.0.targets.0.name=", r"target name is empty"),
    # (a '.' crashed building the heads, torch's module names; 'train' is a method of their ModuleDict)
    ({}, "tasks.0.targets.0.name=gap.x", r"target 'gap.x': a target's name must be non-empty and without '\.'"),
    ({}, "tasks.0.targets.0.name=train", r"target 'train': 'train' is an attribute of torch's nn.ModuleDict"),
    ({}, "tasks.0.targets.0.name=training", r"target 'training': 'training' is an attribute of torch's nn.Module"),
    # (a stress target named as its source's key: "not in the dataset, convert with --stress-key")
    ({}, "tasks.0.targets=[{name: REF_stress, kind: stress}]",
     r"target 'REF_stress': kind stress is the dataset's 'stress' field .*: name the target stress"),
    ({}, "tasks.0.targets=[{name: force, kind: forces}]", r"target 'force': kind forces is the dataset's 'forces'"),
    # (options a target's kind does not use were accepted and ignored)
    ({}, "tasks.0.targets=[{name: forces, kind: forces, reduction: mean}]",
     r"target 'forces': reduction pools a head's per-atom outputs .*; forces have none to set"),
    ({}, "tasks.0.targets=[{name: stress, kind: stress, normalize: false}]",
     r"target 'stress': a stress is the energy's derivative, .*; normalize: false does not apply"),
    ({}, "tasks.0={name: a, train: /data/a, forces: gradient, targets: [{name: energy, kind: energy}, "
         "{name: forces, kind: forces, normalize: false}]}",
     r"target 'forces': gradient forces are the energy's derivative, .*; normalize: false does not apply"),
])
def test_bad_config_names_the_key(raw, override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"mode": "pretrain", "tasks": [dict(TASK)], **raw}, [override])


def test_options_a_target_ignores_are_refused_in_new_configs_only():
    """A checkpoint of an earlier run whose config holds one (accepted then) still loads."""
    task = {"name": "a", "train": "/data/a", "forces": "gradient", "targets": [
        {"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces", "reduction": "mean"},
        {"name": "stress", "kind": "stress", "normalize": False}]}
    with pytest.raises(ConfigError, match="reduction pools"):
        build_config({"mode": "finetune", "tasks": [task]})
    stored = from_dict(TrainConfig, {"mode": "finetune", "tasks": [task]})
    assert [t.reduction for t in stored.tasks[0].targets] == ["sum", "mean", "sum"]


def test_mode_is_never_a_silent_default(tmp_path):
    """A fine-tuning config without mode: was pretrained (and then could not be resumed)."""
    with pytest.raises(ConfigError, match=r"mode: not set: write mode: finetune \(or pretrain\) in the config, or "
                                          r"run python -m jmp_ext\.train finetune CONFIG\.yaml"):
        build_config({"tasks": [TASK]})
    assert build_config({"tasks": [TASK]}, mode="finetune").mode == "finetune"  # the sub-command
    assert build_config({"tasks": [TASK]}, ["mode=finetune"]).mode == "finetune"


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"tasks\.0\.name: required key is missing"):
        build_config({"mode": "pretrain", "tasks": [{"train": "/data/a", "targets": TASK["targets"]}]})


def test_overrides_parse_yaml_values():
    cfg = build_config({"mode": "pretrain", "tasks": [TASK]}, ["optim.lr=1e-4", "optim.llrd_blocks=[0.3, 0.4]",
                                           "model.backbone_overrides.num_blocks=2", "tasks.0.val=/v"])
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.llrd_blocks == [0.3, 0.4]
    assert cfg.model.backbone_overrides == {"num_blocks": 2}
    assert cfg.tasks[0].val == "/v"


def test_names_and_paths_that_yaml_reads_as_numbers_or_dates(tmp_path):
    cfg = build_config({"mode": "pretrain", "tasks": [dict(TASK)]}, ["tasks.0.name=2024-01-05", "run_dir=2024"])
    assert cfg.tasks[0].name == "2024-01-05" and cfg.run_dir == "2024"
    with pytest.raises(ConfigError, match=r"run_dir: expected str, got bool"):
        build_config({"mode": "pretrain", "tasks": [dict(TASK)]}, ["run_dir=no"])
    # YAML 1.1 reads these as octal 8, 1.1, sexagesimal 750 and 0x10 = 16: the text must survive.
    texts = {"run_dir": "010", "tasks.0.name": "1.10", "tasks.0.train": "12:30", "tasks.0.val": "0x10"}
    cfg = build_config({"mode": "pretrain", "tasks": [dict(TASK)]}, [f"{k}={v}" for k, v in texts.items()])
    assert (cfg.run_dir, cfg.tasks[0].name, cfg.tasks[0].train, cfg.tasks[0].val) == tuple(texts.values())
    path = tmp_path / "c.yaml"
    path.write_text("mode: finetune\nrun_dir: 010\ntasks:\n- {name: 017, train: 1.10, val: 2024-01-05, test: 1_0,\n"
                    "   targets: [{name: energy, kind: energy}]}\n")
    cfg = load_config(path)
    task = cfg.tasks[0]
    assert (cfg.run_dir, task.name, task.train, task.val, task.test) == ("010", "017", "1.10", "2024-01-05", "1_0")


def test_numbers_with_leading_zeros_are_decimal():
    cfg = build_config({"mode": "pretrain", "tasks": [TASK]}, ["loop.max_steps=017", "loop.val_every=08", "schedule.warmup=010",
                                           "optim.llrd_blocks=[1.10, 01]"])
    assert cfg.loop.max_steps == 17 and cfg.loop.val_every == 8 and cfg.schedule.warmup == 10.0
    assert cfg.optim.llrd_blocks == [1.1, 1.0]


def test_any_typed_values_are_plain():
    override = "model.backbone_overrides={num_blocks: 010, x: [1.10, {y: 2024-01-05}], 1: z}"
    cfg = build_config({"mode": "pretrain", "tasks": [TASK]}, [override])
    overrides = cfg.model.backbone_overrides
    assert overrides == {"num_blocks": 10, "x": [1.1, {"y": datetime.date(2024, 1, 5)}], "1": "z"}  # keys are names
    assert type(overrides["num_blocks"]) is int and type(overrides["x"][0]) is float  # no wrapper left
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg)))["model"]["backbone_overrides"] == overrides


def test_override_inside_a_number_read_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tasks": [TASK], "optim": {"lr": 0.001}}))
    with pytest.raises(ConfigError, match=r"optim\.lr\.x: optim\.lr is a float, it has no key 'x'"):
        load_config(path, ["optim.lr.x=1"])


def test_malformed_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tasks: [\n  {name: a\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(path)


def test_yaml_aliases_expand_within_bounds(tmp_path):
    """An alias reuses a block (a task's targets); ten nested aliases of ten, 400 bytes, took
    minutes to expand, and an alias of its own parent recursed without end."""
    (tmp_path / "ok.yaml").write_text(
        "mode: pretrain\ntasks:\n"
        "  - {name: a, train: /data/a, targets: &ef [{name: energy, kind: energy}, {name: forces, kind: forces}]}\n"
        "  - {name: b, train: /data/b, targets: *ef}\n")
    config = load_config(tmp_path / "ok.yaml")
    assert len(config.tasks[1].targets) == 2 and config.tasks[1].targets == config.tasks[0].targets
    laughs = ["model:", "  backbone_overrides:", "    l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    laughs += [f"    l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    with pytest.raises(ConfigError, match=r"laughs.yaml: its YAML aliases expand to more than 1000000 values"):
        load_config(tmp_path / "laughs.yaml")
    (tmp_path / "loop.yaml").write_text("model:\n  backbone_overrides: &x {a: *x}\n")
    with pytest.raises(ConfigError, match=r"loop.yaml: a YAML alias refers to the node that holds it"):
        load_config(tmp_path / "loop.yaml")


def test_yaml_roundtrip(tmp_path):
    cfg = build_config({"mode": "pretrain", "tasks": [TASK], "seed": 3})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


@pytest.mark.parametrize("raw, overrides", [({"mode": "pretrain", "tasks": [TASK]}, []), (demo(), []),
                                            ({}, ["preset=jmp_s_qm9", "tasks.0.train=x"])],
                         ids=["defaults", "demo", "jmp_s_qm9"])
def test_saved_config_is_a_fixed_point(tmp_path, raw, overrides):
    """config.yaml loads back to the same config, and saving that gives the same bytes (no int
    default such as max_epochs: 0 that reads back as 0.0)."""
    cfg = build_config(raw, overrides)
    save_config(cfg, tmp_path / "a.yaml")
    again = load_config(tmp_path / "a.yaml")
    assert again == cfg
    save_config(again, tmp_path / "b.yaml")
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_with_and_without_paths(name):
    raw = PRESETS[name]()
    assert all(t.train == "" for t in build_config({"preset": name}).tasks)  # (training refuses it: test_cli)
    overrides = [f"tasks.{i}.train=/data/{t['name']}" for i, t in enumerate(raw["tasks"])]
    cfg = build_config({}, [f"preset={name}", *overrides])
    assert cfg.mode in ("pretrain", "finetune")
    assert all(t.train.startswith("/data/") for t in cfg.tasks)


def test_preset_values_are_jmps():
    cfg = build_config({"preset": "jmp_l_pretrain"}, [f"tasks.{i}.train=x" for i in range(4)])
    coefs = {t.name: {x.name: x.coef for x in t.targets} for t in cfg.tasks}
    assert coefs["oc20"]["forces"] == 73 and coefs["oc22"]["forces"] == 80
    assert coefs["ani1x"]["forces"] == 15 and coefs["transition1x"]["forces"] == 14
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.lr == 3e-4 and cfg.loop.ema_decay == 0.99
    assert cfg.loop.fit_scale_factors == 16  # (JMP fits its scale factors on 16 batches)
    ft = build_config({"preset": "jmp_l_rmd17", "tasks": [{**PRESETS["jmp_l_rmd17"]()["tasks"][0], "train": "x"}]})
    assert ft.optim.llrd_blocks == [0.55, 0.40, 0.30, 0.40, 0.55, 0.625]
    assert {t.name: t.coef for t in ft.tasks[0].targets} == {"energy": 0.0, "forces": 10.0}
    assert ft.tasks[0].forces == "gradient"
    # Skipped with model.init_checkpoint (JMP's come fitted); a run from scratch fits them.
    assert ft.loop.fit_scale_factors == 16


def test_yaml_file_with_preset_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "jmp_s_qm9", "tasks": [{**PRESETS["jmp_s_qm9"]()["tasks"][0],
                                                                       "train": "/q"}]}))
    cfg = load_config(path, ["data.batch_size=4"])
    assert cfg.data.batch_size == 4 and cfg.tasks[0].train == "/q" and cfg.optim.llrd_embedding == 0.3


def test_structure_wise_force_loss_is_one_setting_for_the_run():
    """The loss averages a mixed batch's force errors one way: per structure or per atom."""
    targets = [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]
    tasks = [{**TASK, "name": name, "targets": targets, "structure_wise_force_loss": swl}
             for name, swl in (("a", True), ("b", False))]
    with pytest.raises(ConfigError, match="structure_wise_force_loss must be the same for every task"):
        build_config({"mode": "pretrain", "tasks": tasks})
    build_config({"mode": "pretrain", "tasks": [tasks[0], {**tasks[1], "structure_wise_force_loss": True}]})


def test_structure_wise_force_loss_defaults_to_jmps_for_the_mode():
    """A task list of one's own (pretraining on other domains than the preset's four) trained
    with a per-atom force loss unless it said otherwise: JMP pretrains with SWL."""
    forces_task = {**TASK, "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}
    assert build_config({"mode": "pretrain", "tasks": [forces_task]}).tasks[0].structure_wise_force_loss is True
    assert build_config({"mode": "finetune", "tasks": [forces_task]}).tasks[0].structure_wise_force_loss is False
    explicit = {**forces_task, "structure_wise_force_loss": False}
    assert build_config({"mode": "pretrain", "tasks": [explicit]}).tasks[0].structure_wise_force_loss is False


def test_compile_needs_direct_forces():
    forces_task = {**TASK, "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}
    build_config({"mode": "pretrain", "tasks": [forces_task], "loop": {"compile": True}})  # direct forces: fine
    with pytest.raises(ConfigError, match="loop.compile needs direct forces"):
        build_config({"mode": "pretrain", "tasks": [{**forces_task, "forces": "gradient"}], "loop": {"compile": True}})


@pytest.mark.parametrize("forces, kinds, expected", [
    ("gradient", ["energy", "forces"], True),
    ("gradient", ["energy", "stress"], True),
    ("direct", ["energy", "forces"], False),
    ("direct", ["energy"], False),
])
def test_task_gradient_forces(forces, kinds, expected):
    task = {**TASK, "forces": forces, "targets": [{"name": k, "kind": k} for k in kinds]}
    cfg = build_config({"mode": "pretrain", "tasks": [task]})
    assert cfg.tasks[0].gradient_forces is expected
    if expected:
        with pytest.raises(ConfigError, match="loop.compile needs direct forces"):
            build_config({"mode": "pretrain", "tasks": [task], "loop": {"compile": True}})
    else:
        build_config({"mode": "pretrain", "tasks": [task], "loop": {"compile": True}})


def test_gradient_forces_without_a_forces_target_are_refused():
    """An energy-only task with forces: gradient trained a model without forces, and a user's
    calculator then had none: the config says so instead."""
    task = {**TASK, "forces": "gradient", "targets": [{"name": "energy", "kind": "energy"}]}
    with pytest.raises(ConfigError, match=r"task 'a': forces: gradient .* this task has none, so its model would "
                                          r"predict no forces; add a forces target"):
        build_config({"mode": "finetune", "tasks": [task]})
    # ... in a new run only: the config of such a run's checkpoint still reads
    assert from_dict(TrainConfig, {"mode": "finetune", "tasks": [task]}).tasks[0].gradient_forces is False


def test_the_readmes_configs_are_valid():
    """The README's YAML examples are configs a user copies: each must build as it stands."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```yaml\n")[1:]]
    assert len(blocks) >= 3
    for block in blocks:
        config = build_config(yaml.safe_load(block))
        assert config.tasks and config.mode in ("pretrain", "finetune"), block


def test_a_key_given_twice_is_an_error(tmp_path):
    """YAML keeps the last of two equal keys without a word: `mode: pretrain` ... `mode: finetune`."""
    (tmp_path / "twice.yaml").write_text("mode: pretrain\nrun_dir: runs/a\nmode: finetune\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'mode' given twice in one mapping \(lines 1 and 3\)"):
        load_config(tmp_path / "twice.yaml")
    with pytest.raises(ConfigError, match=r"key 'lr' given twice"):
        build_config({"mode": "finetune", "tasks": [TASK]}, ["optim={lr: 1, lr: 2}"])


def test_a_flow_mapping_without_spaces_gets_a_hint(tmp_path):
    """{H:-13.6} is YAML for the key 'H:-13.6' without a value ([0.5,0.6] needs no spaces, so the
    habit carries over): the error says what YAML wants. config.yaml keeps 'Å' readable."""
    raw = {"mode": "finetune", "tasks": [TASK]}
    with pytest.raises(ConfigError, match=r"references\.H:-13\.6: expected a number, got NoneType None \(in YAML a "
                                          r"mapping needs a space after the colon: \{H: -13\.6\}\)"):
        build_config(raw, ["tasks.0.targets.0.references={H:-13.6}"])
    config = build_config(raw, ["tasks.0.targets.0.references={H: -13.6}", "tasks.0.targets.0.unit=eV/Å"])
    save_config(config, tmp_path / "config.yaml")
    assert "unit: eV/Å" in (tmp_path / "config.yaml").read_text(encoding="utf-8")
    assert load_config(tmp_path / "config.yaml").tasks[0].targets[0].references == {"H": -13.6}


def test_the_readmes_cpu_tryout_overrides_are_valid():
    """The README's overrides for trying a preset on a CPU are pasted after a preset: each set
    must build on the presets it names (a renamed key would only fail in a user's shell)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    paragraph = readme[readme.index("To try one on a CPU first:"):]
    paragraph = paragraph[:paragraph.index("- QM9:")]
    common, finetune, pretrain = (code.split() for code in re.findall(r"`([^`]*=[^`]*)`", paragraph)[:3])
    assert "model.backbone=tiny" in common and "schedule.warmup=2" in finetune and "schedule.warmup=5" in pretrain
    for preset, extra in [("jmp_s_qm9", finetune), ("jmp_l_md22", finetune), ("jmp_s_pretrain", pretrain)]:
        config = build_config({"preset": preset}, [*common, *extra])
        assert config.model.backbone == "tiny" and config.loop.max_steps == 20 and config.loop.fit_scale_factors == 2
        assert config.schedule.warmup < config.loop.max_steps, preset  # the point of the extras


def test_the_readmes_own_data_tryout_overrides_are_valid():
    """The same for the overrides that try my.yaml (the fine-tune of one's own data) on a CPU."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    my_yaml = readme[readme.index("# my.yaml\n"):].split("```")[0]
    paragraph = readme[readme.index("To try the recipe on a CPU first"):].split("\n\n")[0]
    overrides = re.findall(r"`([^`]*=[^`]*)`", paragraph)[0].split()
    config = build_config(yaml.safe_load(my_yaml), overrides)
    assert config.model.backbone == "tiny" and config.model.init_checkpoint == ""
    assert config.schedule.unit == "steps" and config.schedule.warmup < config.loop.max_steps == 20


def test_paths_expand_environment_variables_and_the_home_directory(tmp_path, monkeypatch):
    """A YAML file is read by no shell: `train: $SCRATCH/qm9/train` was looked up as a directory
    named '$SCRATCH', and `~/runs/a` made a directory named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    text = ("mode: finetune\nrun_dir: ~/runs/a\nmodel: {init_checkpoint: '${SCRATCH}/jmp-s.pt'}\n"
            "tasks: [{name: qm9, train: $SCRATCH/qm9/train, val: ~/qm9/val, test: ~user_without_home_dir/x,\n"
            "         targets: [{name: U_0, kind: scalar}]}]\n")
    (tmp_path / "c.yaml").write_text(text)
    config = load_config(tmp_path / "c.yaml")
    assert config.run_dir == str(tmp_path / "home" / "runs" / "a")
    assert config.model.init_checkpoint == str(tmp_path / "scratch" / "jmp-s.pt")
    task = config.tasks[0]
    assert (task.train, task.val) == (str(tmp_path / "scratch/qm9/train"), str(tmp_path / "home/qm9/val"))
    assert task.test == "~user_without_home_dir/x"  # (no such user: left as written, as a shell does)
    # An unset variable is named, with the key, rather than looked up as a directory.
    monkeypatch.delenv("SCRATCH")
    with pytest.raises(ConfigError, match=r"tasks\.0\.train: '\$SCRATCH/qm9/train' names the environment variable "
                                          r"\$SCRATCH, which is not set"):
        load_config(tmp_path / "c.yaml", ["model.init_checkpoint="])
    # The saved config holds the paths as expanded: a resume elsewhere reads the same ones.
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    save_config(config, tmp_path / "saved.yaml")
    monkeypatch.setenv("SCRATCH", "/elsewhere")
    assert load_config(tmp_path / "saved.yaml").tasks[0].train == str(tmp_path / "scratch/qm9/train")
    # A stored config (a checkpoint's, read by eval, predict, the calculator and resume) is taken
    # as it was written: a '$' in a path it never opens is no error there.
    stored = to_dict(config)
    stored["tasks"][0]["train"] = "/data/price$list/train"
    assert from_dict(TrainConfig, stored).tasks[0].train == "/data/price$list/train"
