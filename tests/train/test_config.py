import pytest
import yaml

from jmp_ext.train.config import ConfigError, TrainConfig, build_config, load_config, save_config, to_dict
from jmp_ext.train.presets import PRESETS

TASK = {"name": "a", "train": "/data/a", "targets": [{"name": "energy", "kind": "energy"}]}


def test_defaults_and_types():
    cfg = build_config({"tasks": [TASK], "optim": {"lr": 1}})
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
    ({}, "tasks.3.train=x", r"tasks\.3: '3' is not an index of a list of 1"),
    ({}, "optim.betas=[0.9]", r"optim\.betas must be two numbers"),
    ({}, "tasks.0.train=", r"task 'a': train is empty"),
    ({}, "nonsense", r"not of the form key\.path=value"),
    ({"preset": "nope"}, "seed=1", r"preset: unknown preset 'nope'"),
    ({}, "loop.log_every=0", r"loop\.log_every must be >= 1"),
    ({}, "loop.ckpt_every=0", r"loop\.ckpt_every must be >= 1"),
    ({}, "tasks.0.targets.0.name=U_0", r"target 'U_0': kind energy is the dataset's 'energy' field"),
])
def test_bad_config_names_the_key(raw, override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"tasks": [dict(TASK)], **raw}, [override])


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"tasks\.0\.train: required key is missing"):
        build_config({"tasks": [{"name": "a", "targets": TASK["targets"]}]})


def test_overrides_parse_yaml_values():
    cfg = build_config({"tasks": [TASK]}, ["optim.lr=1e-4", "optim.llrd_blocks=[0.3, 0.4]",
                                           "model.backbone_overrides.num_blocks=2", "tasks.0.val=/v"])
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.llrd_blocks == [0.3, 0.4]
    assert cfg.model.backbone_overrides == {"num_blocks": 2}
    assert cfg.tasks[0].val == "/v"


def test_names_and_paths_that_yaml_reads_as_numbers_or_dates():
    cfg = build_config({"tasks": [dict(TASK)]}, ["tasks.0.name=2024-01-05", "run_dir=2024"])
    assert cfg.tasks[0].name == "2024-01-05" and cfg.run_dir == "2024"
    with pytest.raises(ConfigError, match=r"run_dir: expected str, got bool"):
        build_config({"tasks": [dict(TASK)]}, ["run_dir=no"])


def test_yaml_roundtrip(tmp_path):
    cfg = build_config({"tasks": [TASK], "seed": 3})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_once_paths_are_given(name):
    raw = PRESETS[name]()
    with pytest.raises(ConfigError, match="train is empty"):
        build_config({"preset": name})
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
    ft = build_config({"preset": "jmp_l_rmd17", "tasks": [{**PRESETS["jmp_l_rmd17"]()["tasks"][0], "train": "x"}]})
    assert ft.optim.llrd_blocks == [0.55, 0.40, 0.30, 0.40, 0.55, 0.625]
    assert {t.name: t.coef for t in ft.tasks[0].targets} == {"energy": 0.0, "forces": 10.0}
    assert ft.tasks[0].forces == "gradient"


def test_yaml_file_with_preset_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "jmp_s_qm9", "tasks": [{**PRESETS["jmp_s_qm9"]()["tasks"][0],
                                                                       "train": "/q"}]}))
    cfg = load_config(path, ["data.batch_size=4"])
    assert cfg.data.batch_size == 4 and cfg.tasks[0].train == "/q" and cfg.optim.llrd_embedding == 0.3


def test_compile_needs_direct_forces():
    forces_task = {**TASK, "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}
    build_config({"tasks": [forces_task], "loop": {"compile": True}})  # direct forces: fine
    with pytest.raises(ConfigError, match="loop.compile needs direct forces"):
        build_config({"tasks": [{**forces_task, "forces": "gradient"}], "loop": {"compile": True}})


@pytest.mark.parametrize("forces, kinds, expected", [
    ("gradient", ["energy", "forces"], True),
    ("gradient", ["energy", "stress"], True),
    ("gradient", ["energy"], False),  # nothing to differentiate: forces=gradient changes nothing
    ("direct", ["energy", "forces"], False),
])
def test_task_gradient_forces(forces, kinds, expected):
    task = {**TASK, "forces": forces, "targets": [{"name": k, "kind": k} for k in kinds]}
    cfg = build_config({"tasks": [task]})
    assert cfg.tasks[0].gradient_forces is expected
    if expected:
        with pytest.raises(ConfigError, match="loop.compile needs direct forces"):
            build_config({"tasks": [task], "loop": {"compile": True}})
    else:
        build_config({"tasks": [task], "loop": {"compile": True}})
