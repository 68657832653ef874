"""GemNet-OC's output blocks (one before the first interaction and one after each) and the final
MLPs that merge their outputs. Parameter names are JMP's."""

from __future__ import annotations

import torch
from torch import nn

from jmp_ext.models.gemnet_oc.interaction import AtomUpdateBlock
from jmp_ext.models.gemnet_oc.layers import INV_SQRT_2, Dense, ResidualLayer, residual_stack
from jmp_ext.models.gemnet_oc.scaling import ScaleFactor


class OutputBlock(AtomUpdateBlock):
    """Per-atom energy features x_E [N, A] and per-edge force features x_F [E, edge].

    Energy: the atom update's aggregation + MLP (`layers`, also registered as `seq_energy_pre`:
    JMP keeps both names for the same module, so both appear in the state_dict), then
    (x_E + h)/sqrt(2) and `seq_energy2`. Forces (only with the direct-force branch):
    scale(MLP(m) * W rbf)."""

    def __init__(self, emb_size_atom, emb_size_edge, emb_size_rbf, num_hidden, num_hidden_afteratom,
                 force_branch: bool, dropout=None):
        super().__init__(emb_size_atom, emb_size_edge, emb_size_rbf, num_hidden, dropout)
        self.seq_energy_pre = self.layers
        self.seq_energy2 = residual_stack(emb_size_atom, emb_size_atom, num_hidden_afteratom, dropout)
        self.force_branch = force_branch
        if force_branch:
            self.scale_rbf_F = ScaleFactor()
            self.seq_forces = residual_stack(emb_size_edge, emb_size_edge, num_hidden, dropout)
            self.dense_rbf_F = Dense(emb_size_rbf, emb_size_edge)

    def forward(self, h, m, rbf, idx_t, energy_boost: float = 1.0):
        """h [N, A], m [E, edge], rbf [E, rbf], idx_t [E]. energy_boost rescales the edge sum
        (1/(1-p) while training with edge dropout p, so the expected sum is unchanged)."""
        x_E = self.aggregate(m, rbf, idx_t, h.shape[0]) * energy_boost
        for layer in self.seq_energy_pre:
            x_E = layer(x_E)
        x_E = (x_E + h) * INV_SQRT_2
        for layer in self.seq_energy2:
            x_E = layer(x_E)
        if not self.force_branch:
            return x_E, None
        x_F = m
        for layer in self.seq_forces:
            x_F = layer(x_F)
        x_F = self.scale_rbf_F(x_F * self.dense_rbf_F(rbf), ref=x_F)
        return x_E, x_F


class FinalMLP(nn.Module):
    """Dense(in -> units, act) + residual layers, on the concatenated outputs of all blocks."""

    def __init__(self, in_features: int, units: int, num_residual: int, dropout=None):
        super().__init__()
        self.out_mlp = nn.Sequential(Dense(in_features, units, activation=True, dropout=dropout),
                                     *[ResidualLayer(units, dropout) for _ in range(num_residual)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_mlp(x)
