"""Gradient forces under fp16 autocast: JMP's ForceScaler (after torch's GradScaler).

F = -dE/dpos is a backward pass, and under float16 autocast it runs in half precision, where the
small per-edge contributions to the forces fall below float16's normal range (6e-5) and lose
their digits, or flush to zero. As GradScaler does for the loss, the energy is multiplied by a
scale before its gradients are taken and they are divided by it afterwards; a non-finite result
(the scale overflowed) halves the scale and takes them again, and `growth_interval` finite
results in a row double it. Outside float16 autocast the gradients are taken as they are.
"""

from __future__ import annotations

import torch


class ForceScaler:
    """Scale of the energy whose gradients (forces, stress) are taken under float16 autocast.

    JMP's settings: 2^8 at first, x0.5 on a non-finite result, x2 after 2000 finite results in a
    row, at most 50 tries for one batch. Unlike JMP's, a batch that no scale can help (its energy
    is not finite, or every try fails) leaves the scale as it was: halving it 50 times would make
    every later force underflow to a finite zero. Its non-finite gradients are returned, and the
    training loop skips the step.

    Each rank of a DDP run keeps its own scale (it cancels out of the forces, so the ranks need
    not agree); last.pt saves rank 0's."""

    def __init__(self, init_scale: float = 2.0**8, growth_interval: int = 2000, max_tries: int = 50):
        if init_scale <= 0 or growth_interval < 1 or max_tries < 1:
            raise ValueError(f"ForceScaler needs init_scale > 0, growth_interval >= 1 and max_tries >= 1, got "
                             f"{init_scale}, {growth_interval}, {max_tries}")
        self.scale = init_scale
        self.growth_interval = growth_interval
        self.max_tries = max_tries
        self.finite_in_a_row = 0

    def gradients(self, energy: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, ...]:
        """d energy / d inputs (energy a scalar), as torch.autograd.grad; scaled under float16 autocast."""
        device = energy.device.type
        fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        if not fp16:
            return torch.autograd.grad(energy, inputs, create_graph=create_graph)
        scale = self.scale
        for tries in range(1, self.max_tries + 1):
            # retain_graph: a retry takes the gradients of the same graph again.
            grads = tuple(g / scale for g in torch.autograd.grad(energy * scale, inputs, create_graph=create_graph,
                                                                  retain_graph=True))
            if torch.stack([torch.isfinite(g).all() for g in grads]).all():  # (one host sync, as GradScaler's)
                # (a batch that needed a smaller scale starts the count of finite ones in a row again)
                finite = self.finite_in_a_row + 1 if tries == 1 else 1
                if finite == self.growth_interval:
                    scale, finite = scale * 2.0, 0
                self.scale, self.finite_in_a_row = scale, finite
                return grads
            # Hopeless: a non-finite energy, the last try, or a scale below float16's smallest
            # number, under which every scaled force would underflow anyway.
            if tries == self.max_tries or scale < 2.0**-24 or not torch.isfinite(energy):
                return grads
            del grads  # (its double-backward graph, before the next one is built)
            scale *= 0.5

    def state_dict(self) -> dict:
        return {"scale": self.scale, "finite_in_a_row": self.finite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.finite_in_a_row = float(state["scale"]), int(state["finite_in_a_row"])
