"""Exponential moving average of a model's parameters (JMP pretraining: decay 0.99 every step)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after every optimizer step.

    Buffers (scale factors, RBF constants) are not averaged: `swap` uses the model's own. The
    shadow lives on the model's device in the parameters' dtype."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        # Every name of each parameter: a module registered under two names (JMP's
        # seq_energy_pre alias of layers) appears twice in state_dict and both must get the EMA.
        aliases: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        self.names = [aliases[id(p)] for _, p in model.named_parameters()]
        # (listed once: named_parameters() walks every module, ~2 ms a step on the CPU)
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay)

    @contextlib.contextmanager
    def swap(self):
        """Runs the block with the EMA weights in the model, then puts the trained weights back."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: EMA value} under every name the model's state_dict uses."""
        return {n: s for names, s in zip(self.names, self.shadow) for n in names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [names[0] for names in self.names if names[0] not in state]
        if missing:
            raise ValueError(f"EMA state lacks parameters: {missing[:5]}")
        with torch.no_grad():
            for names, s in zip(self.names, self.shadow):
                s.copy_(state[names[0]])
