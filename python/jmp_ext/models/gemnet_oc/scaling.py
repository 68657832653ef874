"""ScaleFactor: GemNet-OC's fitted output scales, and the procedure that fits them.

Each ScaleFactor multiplies its input by a 0-dim buffer `scale_factor`. The value 0 means
"not fitted yet" and then the input passes unchanged. Fitting follows fairchem/JMP: the factors
are fitted one at a time in the order the forward pass reaches them, each as
sqrt(Var[ref] / Var[x]) over the given batches with every later factor still unfitted, so each
one restores the variance its block had before the operation it follows.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from jmp_ext.warn import warn_user


class ScaleFactor(nn.Module):
    """x -> x * scale_factor (x unchanged while scale_factor == 0). State: `scale_factor` ()."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale_factor", torch.tensor(0.0))
        self._stats: dict[str, float] | None = None  # set while this factor is being fitted
        self._on_call: Callable[[], None] | None = None  # set while the call order is recorded

    def forward(self, x: torch.Tensor, ref: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """ref: the tensor whose variance the fit restores, or a function that makes it (called
        only while this factor is being fitted, so a ref the model never needs otherwise, such
        as gathered rows, costs nothing in training)."""
        if self._on_call is not None:
            self._on_call()
        scale = self.scale_factor
        # torch.where rather than `if fitted`: no host sync, torch.compile-friendly.
        x = x * torch.where(scale != 0, scale, torch.ones_like(scale))
        if self._stats is not None:
            ref = ref() if callable(ref) else ref
            self._observe(x.detach(), None if ref is None else ref.detach())
        return x

    def _observe(self, x: torch.Tensor, ref: torch.Tensor | None) -> None:
        n = x.shape[0]
        self._stats["variance_out"] += torch.var(x, dim=0).mean().item() * n
        self._stats["variance_in"] += n if ref is None else torch.var(ref, dim=0).mean().item() * n
        self._stats["n_samples"] += n


def backbone_pass(model: nn.Module, batch_and_graphs: tuple[dict, dict]) -> dict:
    """The backbone's pass of a PretrainModel / FinetuneModel on (batch, graphs), which reaches
    every ScaleFactor: fitting them needs no heads, and no gradient forces."""
    if not (isinstance(batch_and_graphs, tuple) and len(batch_and_graphs) == 2):
        raise TypeError(f"fit_scale_factors' default forward takes (batch, graphs) pairs (jmp_ext.data.collate, "
                        f"jmp_ext.graphs.build_graphs), got a {type(batch_and_graphs).__name__}; or give forward=")
    batch, graphs = batch_and_graphs
    return model.backbone(model.embedding(batch["atomic_numbers"]), graphs)


def fit_scale_factors(model: nn.Module, batches: Iterable, forward: Callable | None = None) -> dict[str, float]:
    """Fits every ScaleFactor of `model` on `batches`, in forward order; returns {name: value}.
    A network trained from scratch needs this first (JMP fits them on 16 batches); a loaded
    checkpoint has them.

    batches: (batch, graphs) pairs (jmp_ext.data.collate, jmp_ext.graphs.build_graphs) for the
    default forward (None: backbone_pass); forward(model, item) runs one forward pass of an
    item of `batches`. All factors are reset first. Runs in eval mode (no dropout, no edge
    dropout) and restores the training flag.
    """
    forward = forward or backbone_pass
    batches = list(batches)
    if not batches:
        raise ValueError("fit_scale_factors needs at least one batch")
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, ScaleFactor) and all(module is not f for f in factors.values()):
            factors[name] = module
    if not factors:
        raise ValueError("the model has no ScaleFactor to fit")

    was_training = model.training
    model.eval()
    try:
        for factor in factors.values():
            factor.scale_factor.zero_()
        # One pass to learn the order in which the forward pass reaches the factors.
        order: list[str] = []
        for name, factor in factors.items():
            factor._on_call = lambda name=name: order.append(name) if name not in order else None
        try:
            forward(model, batches[0])
        finally:
            for factor in factors.values():
                factor._on_call = None
        missing = sorted(set(factors) - set(order))
        if missing:
            raise ValueError(f"these ScaleFactors are never reached by the forward pass: {missing}")

        fitted = {}
        for name in order:
            factor = factors[name]
            factor._stats = {"variance_in": 0.0, "variance_out": 0.0, "n_samples": 0}
            try:
                for batch in batches:
                    forward(model, batch)
                stats = factor._stats
            finally:
                factor._stats = None
            if not (math.isfinite(stats["variance_in"]) and math.isfinite(stats["variance_out"])):
                raise ValueError(f"cannot fit ScaleFactor {name}: too few samples for a variance ({stats}); use "
                                 "more or larger batches")
            if stats["variance_in"] > 0 and stats["variance_out"] > 0:
                value = math.sqrt(stats["variance_in"] / stats["variance_out"])
            else:
                # Nothing varies: e.g. in a single-element dataset every atom embedding is the
                # same, so the rows that the first atom-to-edge interaction starts from are too.
                # There is no variance to restore; the factor stays 1 (fairchem's fit leaves it
                # unscaled as well).
                warn_user(f"ScaleFactor {name}: zero variance on the fitting batches ({stats}), e.g. data of "
                          "a single element; it is left at 1")
                value = 1.0
            factor.scale_factor.fill_(value)
            fitted[name] = value
        return fitted
    finally:
        model.train(was_training)
