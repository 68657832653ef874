"""load_jmp_checkpoint on synthetic Lightning checkpoints built from the fixtures' weights, and
fitting of the ScaleFactors."""

from __future__ import annotations

import collections
import os
import warnings

import pytest
import torch
from jmp_fixtures import bulk_batch_and_graphs, fixture_batch, graphs_on_jmps_a2a, load, requires_fixtures

from jmp_ext.models import BackboneConfig, FinetuneModel, HeadConfig, PretrainModel, ScaleFactor, fit_scale_factors
from jmp_ext.models.checkpoint import _skipped_by_ema, load_jmp_checkpoint, read_state_dict, safe_load

pytestmark = requires_fixtures
TASKS = ["oc20", "oc22", "ani1x", "transition1x"]


class RunConfig:
    """Stands for the pydantic config objects a Lightning checkpoint pickles."""

    def __init__(self):
        self.lr = 3e-4


class AttributeDict(dict):
    """A dict subclass in the pickle (Lightning's AttributeDict is one)."""


class Sequence(list):
    """A list subclass in the pickle: torch's unpickler extends plain lists only."""


class Exploit:
    """Unpickling this would run a shell command, if anything in the file were executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class EvalExploit(Exploit):
    """The same through eval, a builtin that torch's unpickler does not block by itself."""

    def __reduce__(self):
        return eval, (f"open({str(self.path)!r}, 'w')",)


def reference_model() -> PretrainModel:
    w = load("weights.pt")
    model = PretrainModel(BackboneConfig.from_dict(w["meta"]["config"]), TASKS)
    model.backbone.load_state_dict(w["backbone_state_dict"])
    model.embedding.atom_embedding.load_state_dict(w["embedding_state_dict"])
    return model


def lightning_checkpoint(model: torch.nn.Module, tmp_path) -> dict:
    """JMP's layout: raw weights in state_dict are perturbed; the EMA tuple holds the true ones."""
    g = torch.Generator().manual_seed(0)
    ema = tuple(p.detach().clone() for p in model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if not _skipped_by_ema(key) or ".seq_energy_pre." in key:
            state[key] += 0.1 * torch.randn(state[key].shape, generator=g)
    state = {**state, **{f"task_steps.{t}.value": torch.tensor(7.0) for t in TASKS}}
    return {"state_dict": state, "optimizer_states": [{"ema": ema, "state": {}}], "epoch": 1,
            "hyper_parameters": {"config": RunConfig()}}


def test_ema_rule_walks_the_parameters_in_order():
    """JMP's rule (state_dict keys minus buffers, aliases, task_steps) gives named_parameters()."""
    model = reference_model()
    assert [k for k in model.state_dict() if not _skipped_by_ema(k)] == [k for k, _ in model.named_parameters()]


def test_loads_ema_weights_safely_and_reproduces_jmp(tmp_path):
    reference = reference_model()
    path = tmp_path / "jmp.ckpt"
    torch.save(lightning_checkpoint(reference, tmp_path), path)
    with pytest.raises(Exception):  # what plain torch.load(weights_only=True) does with such a file
        torch.load(path, weights_only=True)

    model = load_jmp_checkpoint(path, PretrainModel(reference.backbone.config, TASKS), load_heads=True)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
    # The EMA weights are JMP's fixture weights: the loaded backbone reproduces its outputs.
    case = load("ani_molecules.pt")
    batch = fixture_batch(case, torch.float64)
    model.double().eval()
    with torch.no_grad():
        out = model.backbone(model.embedding(batch["atomic_numbers"]), graphs_on_jmps_a2a(case, batch))
    expected = case["outputs_f64"]["energy"]
    assert ((out["energy"] - expected).abs().max() / expected.abs().max()) < 1e-9

    raw = load_jmp_checkpoint(path, PretrainModel(reference.backbone.config, TASKS), use_ema=False)
    w = raw.backbone.int_blocks[0].trip_interaction.dense_ba.linear.weight
    assert not torch.equal(w, reference.backbone.int_blocks[0].trip_interaction.dense_ba.linear.weight)


def test_a_file_that_would_run_code_is_refused(tmp_path):
    """os.system (which torch blocks: its message advised weights_only=False) and eval (which
    torch does not know, and which was read as an inert stub: loaded without a word)."""
    for exploit, name in ((Exploit(tmp_path / "pwned"), "posix.system"), (EvalExploit(tmp_path / "pwned"),
                                                                           "builtins.eval")):
        path = tmp_path / "evil.ckpt"
        torch.save({"state_dict": reference_model().state_dict(), "hyper_parameters": exploit}, path)
        with pytest.raises(ValueError, match=rf"evil.ckpt would call {name} when unpickled: a checkpoint has no "
                                             r"reason to, so it is refused \(nothing of it was run\)$"):
            load_jmp_checkpoint(path, reference_model(), use_ema=False)
        assert not (tmp_path / "pwned").exists()


def test_dict_subclasses_in_the_file_are_read_as_dicts(tmp_path):
    """torch's weights-only unpickler fills only plain dicts: Lightning's AttributeDict or a
    defaultdict in hyper_parameters made the whole file unreadable (the advice to re-save it
    with weights_only=False needs the classes importable: lightning installed). They are read
    as plain dicts, with nothing of theirs run."""
    path = tmp_path / "hparams.ckpt"
    reference = reference_model()
    hparams = AttributeDict(lr=3e-4, groups=collections.defaultdict(list, a=[1]), config=RunConfig())
    torch.save({**lightning_checkpoint(reference, tmp_path), "hyper_parameters": hparams}, path)
    loaded = safe_load(path)
    assert type(loaded["hyper_parameters"]) is dict and loaded["hyper_parameters"]["lr"] == 3e-4
    assert loaded["hyper_parameters"]["groups"] == {"a": [1]}
    model = load_jmp_checkpoint(path, PretrainModel(reference.backbone.config, TASKS), load_heads=True)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def assert_loads_the_ema_weights(checkpoint, reference):
    model = load_jmp_checkpoint(checkpoint, PretrainModel(reference.backbone.config, TASKS), load_heads=True)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_wrapped_keys_and_an_ema_out_of_order(tmp_path):
    """Prefixes that wrappers put before every key (torch.compile's _orig_mod., a Lightning
    module's model., nested in DDP's module.) were refused as an architecture mismatch listing
    only missing keys; keys in another order than the network's silently got other keys' EMA
    tensors (the tuple follows that order), wherever the shapes agreed."""
    reference = reference_model()
    ckpt = lightning_checkpoint(reference, tmp_path)
    for prefix in ("_orig_mod.", "model.", "module._orig_mod."):
        assert_loads_the_ema_weights({**ckpt, "state_dict": {prefix + k: v for k, v in ckpt["state_dict"].items()}},
                                     reference)
    # A jmp_ext TaskModel's state_dict saved alone: net.* beside its normalisation buffers.
    task_model = {**{f"net.{k}": v for k, v in reference.state_dict().items()}, "norm_energy_mean": torch.zeros(4)}
    assert_loads_the_ema_weights(task_model, reference)
    # Two blocks' keys swapped (each keeps its own tensors; their shapes agree).
    state = ckpt["state_dict"]
    first = [k for k in state if k.startswith("backbone.out_blocks.0.")]
    second = [k for k in state if k.startswith("backbone.out_blocks.1.")]
    assert [tuple(state[k].shape) for k in first] == [tuple(state[k].shape) for k in second]
    order = list(state)
    at = order.index(first[0])
    swapped = order[:at] + second + first + [k for k in order[at:] if k not in first + second]
    reordered = {**ckpt, "state_dict": {k: state[k] for k in swapped}}
    with pytest.raises(ValueError, match=r"not in the network's \(JMP's\) order: backbone.out_blocks.0.\S+ comes "
                                         r"after backbone.out_blocks.1.*use_ema=False \(model.init_ema=false\)$"):
        load_jmp_checkpoint(reordered, PretrainModel(reference.backbone.config, TASKS))
    load_jmp_checkpoint(reordered, PretrainModel(reference.backbone.config, TASKS), use_ema=False)
    # An EMA that is not a tuple of tensors (numpy arrays, a dict by name): said, not an AttributeError.
    for ema in ({"a": torch.zeros(1)}, tuple(t.numpy() for t in ckpt["optimizer_states"][0]["ema"])):
        with pytest.raises(ValueError, match=r"optimizer_states\[0\]\['ema'\] is a (dict|tuple of ndarray), not "
                                             r"JMP's tuple of tensors"):
            read_state_dict({**ckpt, "optimizer_states": [{"ema": ema}]})
    # No network keys at all: said so, with the keys it has.
    with pytest.raises(ValueError, match=r"no embedding.\* or backbone.\* weights.* begin weights.0, weights.1"):
        load_jmp_checkpoint({f"weights.{i}": torch.zeros(1) for i in range(3)}, reference_model())


def test_half_precision_weights_are_warned_of(tmp_path):
    """bfloat16 weights (a file shrunk for sharing) loaded without a word, their rounding (the
    radial basis constants' included) kept in the float32 network."""
    reference = reference_model()
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    with pytest.warns(UserWarning, match=r"weights in bfloat16: loaded into a float32 or float64 network, they keep "
                                         "that rounding"):
        model = load_jmp_checkpoint(half, PretrainModel(reference.backbone.config, TASKS), load_heads=True)
    assert next(model.parameters()).dtype == torch.float32


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    """A text file or a truncated download is a ValueError naming the file, not a KeyError or a
    zip error; a torch file of something else says it is not a JMP / jmp_ext checkpoint."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save(reference_model().state_dict(), tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:1000])
    for name in ("notes.txt", "truncated.pt"):
        with pytest.raises(ValueError, match=rf"{name} is not a readable torch checkpoint"):
            load_jmp_checkpoint(tmp_path / name, reference_model())
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a JMP or jmp_ext checkpoint.*\['a'\]"):
        load_jmp_checkpoint(tmp_path / "other.pt", reference_model())
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is empty \(0 bytes\)"):  # (it read "(EOFError: )")
        load_jmp_checkpoint(tmp_path / "empty.pt", reference_model())
    torch.save(reference_model(), tmp_path / "whole.pt")
    for whole in (reference_model(), tmp_path / "whole.pt"):  # (from a file: a stub of the class)
        with pytest.raises(ValueError, match=r"is a whole PretrainModel \(torch.save\(model\)\).* model.state_dict"):
            load_jmp_checkpoint(whole, reference_model())
    torch.save(RunConfig(), tmp_path / "config.pt")  # (an object, not a module: no state_dict advice)
    with pytest.raises(ValueError, match=r"^a checkpoint must be a dict, got RunConfig$"):
        load_jmp_checkpoint(tmp_path / "config.pt", reference_model())
    # A list subclass cannot be read as data: torch's reason, not its boilerplate or its advice.
    torch.save({"state_dict": {}, "hyper_parameters": Sequence([1, 2])}, tmp_path / "listed.pt")
    with pytest.raises(ValueError, match=r"listed.pt cannot be read without running code from it \((.* )?Can only "
                                         r"extend lists, but got <class '.*Sequence'>\)$") as raised:
        load_jmp_checkpoint(tmp_path / "listed.pt", reference_model())
    assert "weights_only` set to `False`" not in str(raised.value) and "Check the documentation" not in str(raised.value)


def test_weights_that_are_not_finite_tensors_are_refused(tmp_path):
    """A diverged run's NaN weights would only train NaNs; a non-tensor entry (a stubbed class in
    a Lightning file) would fail later as an AttributeError far from the file."""
    model = reference_model()
    ckpt = lightning_checkpoint(model, tmp_path)
    key = next(k for k in ckpt["state_dict"] if k.startswith("backbone."))
    nan_ema = tuple(t.clone() for t in ckpt["optimizer_states"][0]["ema"])
    nan_ema[3][0] = float("nan")
    torch.save({**ckpt, "optimizer_states": [{"ema": nan_ema, "state": {}}]}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt: 1 weight\(s\) hold NaN or inf, first 'backbone\."):
        load_jmp_checkpoint(tmp_path / "nan.pt", reference_model())
    load_jmp_checkpoint(tmp_path / "nan.pt", reference_model(), use_ema=False)  # the raw weights are finite
    ckpt["state_dict"][key] = [1.0, 2.0]
    with pytest.raises(ValueError, match=rf"state_dict entry '{key}' is a list, not a tensor"):
        read_state_dict(ckpt, use_ema=False)


def test_finetune_load_drops_heads_and_force_branch(tmp_path):
    reference = reference_model()
    ckpt = lightning_checkpoint(reference, tmp_path)
    model = FinetuneModel(reference.backbone.config, [HeadConfig(target="energy")], forces="gradient")
    fresh_head = model.output.heads["energy"].mlp[0].weight.clone()
    load_jmp_checkpoint(ckpt, model)
    assert torch.equal(model.output.heads["energy"].mlp[0].weight, fresh_head)
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    assert not any("seq_forces" in k or "out_mlp_F" in k for k in ours)

    direct = FinetuneModel(reference.backbone.config, [HeadConfig(target="energy")], forces="direct")
    load_jmp_checkpoint(ckpt, direct)
    assert torch.equal(direct.backbone.out_mlp_F.out_mlp[0].linear.weight, reference.backbone.out_mlp_F.out_mlp[0].linear.weight)


def test_a_jmp_finetuning_checkpoint_loads_its_backbone(tmp_path):
    """JMP's fine-tuning checkpoints keep the embedding at `embedding.weight` and their heads at
    graph_outputs.* / graph_classification_outputs.* / node_outputs.*: without load_heads only
    the embedding and the backbone are read (JMP's filter_state_dict)."""
    reference = reference_model()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("output.")}
    state["embedding.weight"] = state.pop("embedding.atom_embedding.weight")
    state["graph_outputs.ft_mlp_y.out_mlp.0.weight"] = torch.zeros(4, 4)
    state["node_outputs.ft_mlp_f.out_mlp.0.weight"] = torch.zeros(4, 4)
    model = FinetuneModel(reference.backbone.config, [HeadConfig(target="y")], forces="direct")
    load_jmp_checkpoint({"state_dict": state}, model, use_ema=False)
    for key, value in reference.state_dict().items():
        if not key.startswith("output."):
            assert torch.equal(model.state_dict()[key], value), key


def test_a_ddp_module_prefix_is_dropped(tmp_path):
    """Weights saved from a DistributedDataParallel wrapper carry 'module.' on every key; the EMA
    rule (which skips task_steps.*) and the key match failed on it with a misleading count."""
    reference = reference_model()
    ckpt = lightning_checkpoint(reference, tmp_path)
    ckpt["state_dict"] = {f"module.{k}": v for k, v in ckpt["state_dict"].items()}
    model = load_jmp_checkpoint(ckpt, PretrainModel(reference.backbone.config, TASKS), load_heads=True)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_mismatches_name_the_keys(tmp_path):
    reference = reference_model()
    ckpt = lightning_checkpoint(reference, tmp_path)
    model = PretrainModel(reference.backbone.config, TASKS)
    broken = {**ckpt, "state_dict": dict(ckpt["state_dict"])}
    broken["state_dict"]["backbone.bases.mlp_rbf_h.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="EMA tensor for backbone.bases.mlp_rbf_h.linear.weight has shape"):
        load_jmp_checkpoint(broken, model)
    with pytest.raises(ValueError, match="shape mismatch \\(1\\): backbone.bases.mlp_rbf_h.linear.weight"):
        load_jmp_checkpoint(broken, model, use_ema=False)
    broken = {**ckpt, "state_dict": {**ckpt["state_dict"], "backbone.extra.weight": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"EMA tuple has 261 tensors but the state_dict has 262 weights, so .*"
                                         r"use_ema=False \(model.init_ema=false\)"):
        load_jmp_checkpoint(broken, model)
    extra = {**ckpt, "state_dict": {**ckpt["state_dict"], "model_ema.decay": torch.tensor(0.99)}}
    with pytest.raises(ValueError, match=r"has 262 weights \(1 outside JMP's embedding/backbone/output: "
                                         r"model_ema\.decay\)"):
        load_jmp_checkpoint(extra, model)
    with pytest.raises(ValueError, match="unexpected \\(1\\): backbone.extra.weight"):
        load_jmp_checkpoint(broken, model, use_ema=False)
    small = PretrainModel(BackboneConfig.tiny(num_blocks=1), TASKS)
    with pytest.raises(ValueError, match="unexpected .*backbone.int_blocks.1"):
        load_jmp_checkpoint(ckpt, small)
    # Weights of a preset's backbone in another network: the preset is named before the keys.
    with pytest.raises(ValueError, match=r"does not match the model: its backbone has the shapes of "
                                         r"BackboneConfig\.tiny\(\) \(model\.backbone=tiny with no "
                                         r"backbone_overrides\), the model's differ; unexpected \(\d+\): "):
        load_jmp_checkpoint(PretrainModel(BackboneConfig.tiny(), TASKS).state_dict(), small)
    # A gradient-force model's weights (no direct-force branch) into a direct-force network.
    gradient = FinetuneModel(BackboneConfig.tiny(), [HeadConfig(target="energy")], forces="gradient").state_dict()
    with pytest.raises(ValueError, match=r"does not match the model: it has no direct-force branch \(it was trained "
                                         r"with gradient forces\), which this model's direct forces need"):
        load_jmp_checkpoint(gradient, PretrainModel(BackboneConfig.tiny(), TASKS))
    with pytest.raises(ValueError, match=r"does not match the model: missing \(18\): output"):  # (heads only)
        tiny = PretrainModel(BackboneConfig.tiny(), TASKS[:1]).state_dict()
        load_jmp_checkpoint(tiny, PretrainModel(BackboneConfig.tiny(), TASKS[:2]), load_heads=True)
    # Without EMA weights the raw ones load, with a warning (model.init_ema's "when it has them").
    with pytest.warns(UserWarning, match="no EMA weights"):
        load_jmp_checkpoint({"state_dict": ckpt["state_dict"]}, model)
    key = "backbone.bases.mlp_rbf_h.linear.weight"
    assert torch.equal(model.state_dict()[key], ckpt["state_dict"][key])
    # A plain state dict (ours) loads as is, and without a warning about EMA weights it cannot have.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        plain = read_state_dict(reference.state_dict())
    load_jmp_checkpoint(plain, model, use_ema=False, load_heads=True)
    assert torch.equal(model.output.out_forces[2][8].weight, reference.output.out_forces[2][8].weight)


def test_fitted_scale_factors_restore_the_variances():
    torch.manual_seed(0)
    model = PretrainModel(BackboneConfig.tiny(), ["oc20"]).double()
    case = load("ani_molecules.pt")
    batch = fixture_batch(case, torch.float64)
    batches = [(batch, graphs_on_jmps_a2a(case, batch)), bulk_batch_and_graphs()]
    forward = lambda m, b: m(*b)  # noqa: E731
    fitted = fit_scale_factors(model, batches, forward)
    factors = {n: m for n, m in model.named_modules() if isinstance(m, ScaleFactor)}
    # (JMP's backbone: 11 per block, 2 per output block)
    assert set(fitted) == set(factors) and len(fitted) == 2 * 11 + 3 * 2
    assert all(v > 0 and v != 1.0 for v in fitted.values())
    # Measure every factor again, all at once: Var(reference) / Var(scaled output) is now 1.
    for f in factors.values():
        f._stats = {"variance_in": 0.0, "variance_out": 0.0, "n_samples": 0}
    with torch.no_grad():
        for b in batches:
            forward(model, b)
    for name, f in factors.items():
        ratio = f._stats["variance_in"] / f._stats["variance_out"]
        f._stats = None
        assert abs(ratio - 1) < 1e-6, (name, ratio)
    # The default forward (the backbone alone, what the trainer uses) reaches the same factors;
    # it names what it takes when given a batch alone.
    assert fit_scale_factors(model, batches) == pytest.approx(fitted, rel=1e-9)
    with pytest.raises(TypeError, match=r"default forward takes \(batch, graphs\) pairs .*, got a dict"):
        fit_scale_factors(model, [batch])


def test_single_element_data_fits_with_constant_references_left_at_1():
    """Pure Cu: every atom embedding is the same, so the first atom-to-edge interaction's rows
    have zero variance. The fit must not fail (elemental systems are common); that factor stays 1."""
    torch.manual_seed(0)
    model = PretrainModel(BackboneConfig.tiny(), ["oc20"]).double()
    batch, graphs = bulk_batch_and_graphs()
    batch = dict(batch, atomic_numbers=torch.full_like(batch["atomic_numbers"], 29))
    with pytest.warns(UserWarning, match="zero variance on the fitting batches") as record:
        fitted = fit_scale_factors(model, [(batch, graphs)], lambda m, b: m(*b))
    constant = {n for n, v in fitted.items() if v == 1.0}
    assert constant == {"backbone.int_blocks.0.atom_edge_interaction.scale_rbf",
                        "backbone.int_blocks.0.atom_interaction.scale_rbf_sum"}
    assert {str(w.message).split(":")[0] for w in record} == {f"ScaleFactor {n}" for n in constant}
    assert all(v > 0 for v in fitted.values())
    # One row has no variance at all (NaN): that is still an error.
    factor = ScaleFactor()
    with pytest.raises(ValueError, match="too few samples"), pytest.warns(UserWarning, match="degrees of freedom"):
        fit_scale_factors(torch.nn.Sequential(factor), [torch.ones(1, 4)], lambda m, x: m(x))


def test_scale_factor_references_are_jmps_rows(monkeypatch):
    """The variance a sum's factor restores is that of its input rows as JMP gathers them: one per
    triplet (scale_cbf_sum), quadruplet (scale_sbf_sum) and a2a edge (scale_rbf_sum), although
    the model never writes those gathered rows outside the fit."""
    torch.manual_seed(0)
    model = PretrainModel(BackboneConfig.tiny(), ["oc20"]).double()
    batch, graphs = bulk_batch_and_graphs()
    rows = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, ScaleFactor)}
    observe = ScaleFactor._observe

    def record(self, x, ref):
        rows[names[self]] = None if ref is None else ref.shape[0]
        return observe(self, x, ref)

    monkeypatch.setattr(ScaleFactor, "_observe", record)
    fit_scale_factors(model, [(batch, graphs)], lambda m, b: m(*b))
    block = "backbone.int_blocks.0."
    assert rows[block + "trip_interaction.scale_cbf_sum"] == graphs["trip_e2e"]["in"].shape[0]
    assert rows[block + "atom_edge_interaction.scale_cbf_sum"] == graphs["trip_a2e"]["in"].shape[0]
    assert rows[block + "edge_atom_interaction.scale_cbf_sum"] == graphs["trip_e2a"]["in"].shape[0]
    assert rows[block + "quad_interaction.scale_sbf_sum"] == graphs["quad"]["trip_in_to_quad"].shape[0]
    assert rows[block + "atom_interaction.scale_rbf_sum"] == graphs["a2a"]["edge_index"].shape[1]
