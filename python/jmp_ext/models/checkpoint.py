"""Loading released JMP checkpoints (and ours) into PretrainModel / FinetuneModel, safely.

A JMP checkpoint is a Lightning file: `state_dict` with keys `embedding.atom_embedding.weight`,
`backbone.*`, `output.out_{energy,forces}.{i}.*`, `task_steps.*`, and the EMA weights as a
tuple in `optimizer_states[0]["ema"]`. The tuple follows the state_dict order with buffers
(`rbf.offset`, `rbf.temps`, `scale_factor`), the alias `seq_energy_pre` and `task_steps`
left out (JMP's utils/finetune_state_dict.py). Our modules carry JMP's keys, so the mapping is the
identity.

Files are read with torch.load(weights_only=True): nothing in the file is executed. Lightning
files also pickle the run's config objects (pydantic classes of JMP); those are read as inert
stubs (see `safe_load`), since only tensors are needed.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from jmp_ext.warn import warn_user

_FORCE_BRANCH = (".scale_rbf_F.", ".dense_rbf_F.", ".seq_forces.")
# Modules whose functions run code or touch the system (a pickle's GLOBAL naming one of them).
_CODE_MODULES = {"builtins", "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "pty",
                 "socket", "ctypes", "pickle", "marshal", "code", "codeop", "webbrowser"}
# Prefixes that wrappers put before every key: DDP's module., torch.compile's _orig_mod., a
# Lightning module's or a user's model. attribute.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


class _Stub:
    """Stand-in for a class a checkpoint pickles (its config objects): keeps the pickled state,
    runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _stub(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (_Stub,), {"__module__": module, "__qualname__": name})


def _dict_stub(qualified_name: str) -> type:
    """Stand-in for a dict subclass a checkpoint pickles (Lightning's AttributeDict, a
    defaultdict): builds a plain dict, the one mapping torch's weights-only unpickler fills."""
    module, _, name = qualified_name.rpartition(".")
    return type(name, (), {"__module__": module, "__qualname__": name, "__new__": lambda cls, *args, **kwargs: {}})


def safe_load(path: str | os.PathLike) -> dict:
    """torch.load(path, weights_only=True); classes outside torch's allowlist become inert stubs
    (dict subclasses, plain dicts). Anything that cannot be read so raises a ValueError naming
    the file."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # classes outside the allowlist (or not a torch file at all)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a torch file (text, a truncated download, ...)
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    # A function of these modules in a checkpoint is there to be called while it is unpickled:
    # no config object is one. (Stubbed, it would not run; the file is refused all the same.)
    # Builtin classes are data (a defaultdict pickles its factory, builtins.list).
    harmful = [name for name in names if name.partition(".")[0] in _CODE_MODULES
               and not isinstance(getattr(builtins, name.removeprefix("builtins."), None), type)]
    if harmful:
        raise ValueError(f"{path} would call {', '.join(harmful)} when unpickled: a checkpoint has no reason to, so "
                         "it is refused (nothing of it was run)")
    stubs = {name: _stub(name) for name in names}
    while True:
        with torch.serialization.safe_globals(list(stubs.values())):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                # Items go into plain dicts only: a class that receives them is a dict subclass.
                filled = re.search(r"Can only SETITEMS? for dict.* but got <class '([^']+)'>", str(e))
                name = filled.group(1) if filled else None
                if name not in stubs or not issubclass(stubs[name], _Stub):
                    raise ValueError(f"{path} cannot be read without running code from it "
                                     f"({_unpickling_problem(e)})") from e
                stubs[name] = _dict_stub(name)


def _unpickling_problem(error: pickle.UnpicklingError) -> str:
    """torch's weights-only error without its boilerplate, whose advice to load the file with
    weights_only=False is never ours to give for a file that needs it."""
    paragraphs = [p.strip() for p in str(error).split("\n\n")]
    kept = [p for p in paragraphs if p and not p.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(kept) or "torch's weights-only unpickler refused it"


def is_force_branch_key(key: str) -> bool:
    """A weight of the backbone's direct-force branch (a model with gradient forces has none)."""
    return key.startswith("backbone.out_mlp_F.") or any(p in key for p in _FORCE_BRANCH)


def _skipped_by_ema(key: str) -> bool:
    return (key.endswith(("rbf.offset", "rbf.temps", "scale_factor")) or ".seq_energy_pre." in key
            or key.startswith("task_steps"))


def is_training_checkpoint(checkpoint) -> bool:
    """One of our runs' best.pt / last.pt (jmp_ext.train): a dict with "model" (the TaskModel
    state) and "config" (the TrainConfig), both dicts, and in last.pt "ema" (a dict or None)."""
    return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("config"), dict)
            and isinstance(checkpoint.get("ema", {}), (dict, type(None))))


def run_weights(checkpoint: dict, ema: bool = True) -> dict[str, torch.Tensor]:
    """The TaskModel state_dict (net.* and its own buffers: norm_*, train_elements) of one of our
    loaded run checkpoints: last.pt's EMA weights when `ema` and the run had an EMA, else its
    weights; best.pt's validated weights."""
    weights = dict(checkpoint["model"])
    if ema and checkpoint.get("ema"):
        weights.update(checkpoint["ema"])
    return weights


def read_state_dict(source: str | os.PathLike | dict, *, use_ema: bool = True,
                    order: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint (path or loaded dict: a JMP Lightning file, a plain state dict
    or one of our runs' best.pt / last.pt) as a flat state dict with JMP's keys; a prefix that
    wraps every key (module., _orig_mod., model.) is dropped.

    use_ema: replace the raw weights by the EMA ones (JMP's released weights are used this way);
    a checkpoint without them gives its raw weights: with a warning for a JMP Lightning file,
    silently for a plain state dict (which never has them) and for one of our runs trained
    without an EMA (loop.ema_decay 0, the fine-tuning default: its raw weights are the model).
    order: the network's state_dict keys, in its order (JMP's module order). JMP's EMA tensors
    are matched to the keys by position: a checkpoint whose keys come in another order (which
    no shape check would always catch) is refused."""
    ckpt = safe_load(source) if isinstance(source, (str, Path, os.PathLike)) else source
    # (a module in a file is read as a stub of its class, holding the module's state)
    if isinstance(ckpt, nn.Module) or "_modules" in getattr(ckpt, "state", {}):
        raise ValueError(f"the checkpoint is a whole {type(ckpt).__name__} (torch.save(model)), not a dict of "
                         "weights: save model.state_dict() instead")
    if not isinstance(ckpt, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(ckpt).__name__}")
    if is_training_checkpoint(ckpt):
        # The network's keys are JMP's once the TaskModel's "net." is dropped.
        return checked_weights({k[len("net."):]: v for k, v in run_weights(ckpt, use_ema).items()
                                if k.startswith("net.")}, source)
    if "state_dict" in ckpt:
        state = dict(ckpt["state_dict"])
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, ckpt = dict(ckpt), {}
    else:
        where = "" if isinstance(source, dict) else f"{source}: "
        raise ValueError(f"{where}not a JMP or jmp_ext checkpoint: no 'state_dict', no run 'model' + 'config' "
                         f"and not a flat state dict (top-level keys: {sorted(ckpt)[:20]})")
    state = _unwrapped(state)

    if use_ema:
        states = ckpt.get("optimizer_states") or [{}]
        ema = states[0].get("ema") if isinstance(states[0], dict) else None
        if ema is None and ckpt:  # (a plain state dict is its raw weights, as its owner knows)
            warn_user("the checkpoint has no EMA weights (optimizer_states[0]['ema']): loading its raw weights")
    if use_ema and ema is not None:
        if not (isinstance(ema, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in ema)):
            kinds = sorted({type(t).__name__ for t in ema}) if isinstance(ema, (tuple, list)) else []
            raise ValueError(f"optimizer_states[0]['ema'] is a {type(ema).__name__}"
                             + (f" of {', '.join(kinds)}" if kinds else "") + ", not JMP's tuple of tensors, so its "
                             "EMA weights cannot be matched to the keys; the raw weights load with use_ema=False "
                             "(model.init_ema=false)")
        keys = [k for k in state if not _skipped_by_ema(k)]
        if order is not None:
            _check_ema_order(keys, order)
        if len(keys) != len(ema):
            foreign = [k for k in keys if not k.startswith(("embedding.", "backbone.", "output."))]
            raise ValueError(f"the EMA tuple has {len(ema)} tensors but the state_dict has {len(keys)} weights"
                             + (f" ({len(foreign)} outside JMP's embedding/backbone/output: "
                                f"{', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''})" if foreign else "")
                             + ", so its EMA weights cannot be matched to them; the raw weights load with "
                             "use_ema=False (model.init_ema=false)")
        for key, value in zip(keys, ema):
            if tuple(value.shape) != tuple(state[key].shape):
                raise ValueError(f"EMA tensor for {key} has shape {tuple(value.shape)}, the weight "
                                 f"{tuple(state[key].shape)}")
            state[key] = value
        # `seq_energy_pre` is an alias of `layers`: it must carry the same (EMA) tensors.
        for key in state:
            if ".seq_energy_pre." in key:
                state[key] = state[key.replace(".seq_energy_pre.", ".layers.")]

    if "embedding.weight" in state:
        state[_renamed("embedding.weight")] = state.pop("embedding.weight")
    return checked_weights({k: v for k, v in state.items() if not k.startswith("task_steps")}, source)


def _unwrapped(state: dict) -> dict:
    """state without the prefixes wrappers put before every key (_WRAPPER_PREFIXES, nested as
    DDP around torch.compile does), and a jmp_ext TaskModel's state_dict saved alone (net.*
    beside its norm_* buffers) as its network's."""
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith("net.") for k in state) and all(k.startswith(("net.", "norm_")) or k == "train_elements"
                                                        for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    return state


def _check_ema_order(keys: list[str], order: list[str]) -> None:
    """Raises a ValueError when the checkpoint's `keys` that the network has (`order`, its
    state_dict keys) do not come in the network's order, which JMP's EMA tuple follows."""
    rank = {k: i for i, k in enumerate(order)}
    ours = [k for k in keys if _renamed(k) in rank]
    for before, key in zip(ours, ours[1:]):
        if rank[_renamed(key)] < rank[_renamed(before)]:
            raise ValueError(f"the checkpoint's weights are not in the network's (JMP's) order: {key} comes after "
                             f"{before}. Its EMA tensors are a tuple in that order, so they cannot be matched to "
                             "the weights; the raw weights load with use_ema=False (model.init_ema=false)")


def _renamed(key: str) -> str:
    # JMP's fine-tuning checkpoints keep the embedding at `embedding.weight`.
    return "embedding.atom_embedding.weight" if key == "embedding.weight" else key


def checked_weights(state: dict, source) -> dict[str, torch.Tensor]:
    """state, once every value is a finite tensor (ValueError naming `source`, a path or the
    loaded dict, otherwise): weights of a diverged run would train or predict only NaNs, and a
    non-tensor entry would fail later as an AttributeError."""
    where = "" if isinstance(source, dict) else f"{source}: "
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{where}{len(bad)} weight(s) hold NaN or inf, first {bad[0]!r} (the weights of a "
                         "diverged run?)")
    half = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.dtype in (torch.float16,
                                                                                               torch.bfloat16)})
    if half:
        warn_user(f"{where}weights in {' and '.join(half)}: loaded into a float32 or float64 network, they keep "
                  f"that rounding (bfloat16: 3 significant digits), the radial basis constants and the "
                  "normalisation included; use the checkpoint as it was saved in float32 where you have it")
    return state


def load_jmp_checkpoint(source: str | os.PathLike | dict, model: nn.Module, *, use_ema: bool = True,
                        load_heads: bool = False) -> nn.Module:
    """Loads a JMP (or jmp_ext) checkpoint into `model` (PretrainModel or FinetuneModel), in place.

    use_ema: the EMA weights (default, as JMP fine-tuning starts from them) or the raw ones.
    load_heads: also load `output.*` (the pretraining heads into a PretrainModel); by default the
        heads keep their fresh initialisation and only the checkpoint's `embedding.*` and
        `backbone.*` are read, as JMP's filter_state_dict does (so a JMP fine-tuning checkpoint,
        whose heads are `graph_outputs.*` etc., loads too).
    The direct-force branch of the backbone is dropped when `model` has none (gradient forces).
    Any other difference (missing or unexpected keys, shapes) raises a ValueError naming the keys.
    Returns model."""
    return load_weights(read_state_dict(source, use_ema=use_ema, order=list(model.state_dict())), model,
                        load_heads=load_heads)


def load_weights(state: dict[str, torch.Tensor], model: nn.Module, *, load_heads: bool = False) -> nn.Module:
    """Loads `state`, read_state_dict's weights (JMP's keys), into `model` as load_jmp_checkpoint
    does (load_heads, the force branch, the checks); returns model."""
    if not any(k.startswith(("embedding.", "backbone.")) for k in state):
        raise ValueError(f"checkpoint has no embedding.* or backbone.* weights, the keys of JMP's network (its "
                         f"{len(state)} keys begin {', '.join(list(state)[:5])})")
    if not load_heads:
        state = {k: v for k, v in state.items() if k.startswith(("embedding.", "backbone."))}
    if not model.backbone.config.has_force_branch:
        state = {k: v for k, v in state.items() if not is_force_branch_key(k)}

    expected = {k: v for k, v in model.state_dict().items() if load_heads or not k.startswith("output.")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                 for name, keys in [("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatch", [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                                                        for k in wrong_shape])] if keys]
        backbone_differs = any(k.startswith("backbone.") and not is_force_branch_key(k)
                               for k in missing + unexpected + wrong_shape)
        fits = backbone_preset_of(state) if backbone_differs else None
        cause = (f"its backbone has the shapes of BackboneConfig.{fits}() (model.backbone={fits} with no "
                 f"backbone_overrides), the model's differ; " if fits else "")
        if missing and all(is_force_branch_key(k) for k in missing) and not unexpected and not wrong_shape:
            cause = ("it has no direct-force branch (it was trained with gradient forces), which this model's "
                     "direct forces need: train with forces: gradient, or start from a checkpoint with direct "
                     "forces (a pretraining one); ")
        raise ValueError(f"checkpoint does not match the model: {cause}" + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def backbone_preset_of(weights: dict) -> str | None:
    """The BackboneConfig preset whose backbone has exactly the keys and shapes of `weights`'
    backbone.* (the direct-force branch aside), or None. Built on the meta device: no memory."""
    from jmp_ext.models.gemnet_oc import BackboneConfig, GemNetOCBackbone

    def shapes(state: dict) -> dict:
        return {k: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.") and not is_force_branch_key(k)}

    theirs = shapes(weights)
    for name in ("tiny", "jmp_s", "jmp_l"):
        with torch.device("meta"):
            backbone = GemNetOCBackbone(getattr(BackboneConfig, name)())
        ours = shapes({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
        if ours == theirs:
            return name
    return None
