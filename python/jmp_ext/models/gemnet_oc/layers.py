"""GemNet-OC's basic layers: Dense (bias-free Linear + activation), ScaledSiLU, ResidualLayer,
and the HeOrthogonal initialisation every weight of the backbone starts from."""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

# A sum of two unit-variance terms, scaled back to unit variance (GemNet's residual connections).
INV_SQRT_2 = 1 / math.sqrt(2.0)
_ONE_THREAD = threading.Lock()


@torch.no_grad()
def he_orthogonal_init(weight: torch.Tensor) -> torch.Tensor:
    """Orthogonal init, standardised to zero mean / unit variance per output unit, then scaled by
    fan_in^-1/2. For 3-D BasisEmbedding weights (R, S, I) the output axis is the last one and
    fan_in = R*S; for 2-D Linear weights (out, in) fan_in = in."""
    # On one thread: the QR decomposition's rounding depends on the number of threads, and a
    # seed should give the same weights whatever loop.threads or OMP_NUM_THREADS is. (The lock:
    # two threads building models must not restore each other's thread count.)
    with _ONE_THREAD:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            nn.init.orthogonal_(weight)
        finally:
            torch.set_num_threads(threads)
    if weight.dim() == 3:
        axis, fan_in = [0, 1], weight.shape[0] * weight.shape[1]
    else:
        axis, fan_in = 1, weight.shape[1]
    var, mean = torch.var_mean(weight, dim=axis, unbiased=True, keepdim=True)
    weight.copy_((weight - mean) / (var + 1e-6).sqrt() / math.sqrt(fan_in))
    return weight


class _DivideGrad(torch.autograd.Function):
    """Identity forward; the gradient divided by `users` backward (differentiable: gradient
    forces differentiate through it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, users: int) -> torch.Tensor:
        ctx.users = users
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.users, None


def shared_weight(weight: torch.Tensor, users: int) -> torch.Tensor:
    """`weight` for a forward pass, its gradient divided by `users`: JMP divides the gradients
    of projections shared by n blocks by n after backward. Done in the graph, the division is
    part of the module (an int attribute), so it survives deepcopy, pickling and
    load_state_dict(assign=True), which drop tensor hooks."""
    return weight if users == 1 else _DivideGrad.apply(weight, users)


class ScaledSiLU(nn.Module):
    """silu(x) / 0.6: keeps unit-variance inputs at roughly unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: silu's backward reads its input, not this fresh output (one pass less).
        return nn.functional.silu(x).mul_(1 / 0.6)


class Dense(nn.Module):
    """x -> act(x @ W.T) [-> dropout]; never a bias in the backbone. Key: `<name>.linear.weight`.
    users: how many blocks share this projection (its gradient is divided: shared_weight)."""

    def __init__(self, in_features: int, out_features: int, *, activation: bool = False,
                 dropout: float | None = None):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        he_orthogonal_init(self.linear.weight)
        self.activation = ScaledSiLU() if activation else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.users = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.linear(x, shared_weight(self.linear.weight, self.users))
        return self.dropout(self.activation(x))


class ResidualLayer(nn.Module):
    """(x + Dense(Dense(x))) / sqrt(2), both Dense with scaled SiLU. Key: `dense_mlp.{0,1}`."""

    def __init__(self, units: int, dropout: float | None = None):
        super().__init__()
        self.dense_mlp = nn.Sequential(Dense(units, units, activation=True, dropout=dropout),
                                       Dense(units, units, activation=True, dropout=dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dense_mlp's output is a fresh tensor that no backward reads: updated in place.
        return self.dense_mlp(x).add_(x).mul_(INV_SQRT_2)


def residual_stack(units_in: int, units: int, num_residual: int, dropout: float | None) -> nn.ModuleList:
    """[Dense(units_in -> units, act) if the sizes differ] + num_residual ResidualLayers
    (GemNet-OC's `get_mlp`, used by the atom update and output blocks)."""
    layers = [Dense(units_in, units, activation=True, dropout=dropout)] if units_in != units else []
    layers += [ResidualLayer(units, dropout) for _ in range(num_residual)]
    return nn.ModuleList(layers)
