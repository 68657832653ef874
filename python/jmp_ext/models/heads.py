"""Output heads on top of the GemNet-OC backbone features (JMP's pretraining and fine-tuning heads).

Every head is JMP's `mlp`: num_mlps Linear layers, the first num_mlps - 1 of the feature width
each followed by a scaled SiLU, the last one to the outputs (bias everywhere except a
single-output last layer). As an nn.Sequential its keys are `0.weight, 0.bias, 2.weight, ...,
8.weight` for num_mlps = 5, exactly the keys of JMP's `output.out_energy.{task}` /
`output.out_forces.{task}`. QM9's R² has its own head (SpatialExtentHead, JMP's
SpatialExtentOutputHead), one layer deeper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ase.data import atomic_masses

from jmp_ext import ops
from jmp_ext.models.gemnet_oc.layers import ScaledSiLU


def jmp_mlp(features: int, out_features: int, num_mlps: int = 5, bias: bool = True) -> nn.Sequential:
    """num_mlps Linear layers, features -> features with a scaled SiLU after each but the last,
    which maps to out_features (JMP's Base.mlp); bias=False: no layer has one (JMP's energy head of
    an energy + forces model)."""
    layers: list[nn.Module] = []
    for i in range(num_mlps):
        last = i == num_mlps - 1
        layers.append(nn.Linear(features, out_features if last else features,
                                bias=bias and not (last and out_features == 1)))
        if not last:
            layers.append(ScaledSiLU())
    return nn.Sequential(*layers)


def structure_ptr(natoms: torch.Tensor) -> torch.Tensor:
    """CSR pointer [B+1] of the atoms of each structure (atoms are grouped by structure)."""
    return torch.cat([natoms.new_zeros(1), torch.cumsum(natoms, 0)])


def reduce_atoms(x: torch.Tensor, natoms: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-atom values x [N, k] -> per-structure [B, k] by sum, mean or max over each structure's atoms."""
    ptr = structure_ptr(natoms)
    if reduction == "sum":
        return ops.segment_sum(x, ptr)
    if reduction == "mean":
        return ops.segment_mean(x, ptr)
    if reduction == "max":
        return ops.segment_max(x, ptr)
    raise ValueError(f"reduction must be 'sum', 'mean' or 'max', got {reduction!r}")


def direct_forces(edge_scalar: torch.Tensor, V_st: torch.Tensor, idx_t: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """JMP's direct forces: sum over the edges s->t of edge_scalar [E, 1] * V_st [E, 3] onto t -> [N, 3] (eV/Å)."""
    return ops.scatter_sum(edge_scalar * V_st, idx_t, num_atoms)


def head_name_problem(name: str) -> str | None:
    """Why a target (label) named `name` could not have a head, None when it can: the heads sit
    in an nn.ModuleDict under their targets' names, and torch refuses a module name with a '.'
    or one that is an attribute of the ModuleDict ('train', 'to', 'training', ...)."""
    if not isinstance(name, str) or not name or "." in name:
        return "a target's name must be non-empty and without '.' (it names the model's head, a torch module)"
    if hasattr(nn.ModuleDict(), name):
        return (f"{name!r} is an attribute of torch's nn.ModuleDict, which holds the heads by their targets' "
                "names; store the label under another name (python -m jmp_ext.data convert --property NEW=KEY)")
    return None


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """One fine-tuning target predicted from the per-atom features.

    kind "scalar": num_outputs values per structure ([B] when 1, else [B, num_outputs]), the
    per-atom MLP outputs reduced by `reduction` (JMP: sum for extensive targets such as energy,
    mean for MatBench / QMOF, max for phonons; "spatial_extent": sum_i s_i |r_i - COM|^2, QM9's
    R² in Bohr^2 or Å^2 as labelled, see SpatialExtentHead). kind "classification": logits [B, num_outputs]
    from the reduced per-atom outputs (JMP's mp_is_metal: 2 classes). dropout: on the per-atom
    features, before the MLP, while training (JMP's mp_is_metal: 0.5)."""

    target: str
    kind: Literal["scalar", "classification"] = "scalar"
    reduction: Literal["sum", "mean", "max", "spatial_extent"] = "sum"
    num_outputs: int = 1
    num_mlps: int = 5
    """JMP's OutputConfig.num_mlps: the head's Linear layers (see jmp_mlp); the spatial-extent
    head has num_mlps + 1, as JMP's."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        problem = head_name_problem(self.target)
        if problem:
            raise ValueError(f"HeadConfig {self.target!r}: {problem}")
        if self.kind not in ("scalar", "classification"):
            raise ValueError(f"HeadConfig.kind must be 'scalar' or 'classification', got {self.kind!r}")
        if self.reduction not in ("sum", "mean", "max", "spatial_extent"):
            raise ValueError(f"HeadConfig.reduction must be 'sum', 'mean', 'max' or 'spatial_extent', "
                             f"got {self.reduction!r}")
        if self.reduction == "spatial_extent" and (self.kind, self.num_outputs) != ("scalar", 1):
            raise ValueError(f"HeadConfig {self.target!r}: reduction spatial_extent predicts one scalar, not "
                             f"{self.kind} with num_outputs={self.num_outputs}")
        if self.num_outputs < 1 or (self.kind == "classification" and self.num_outputs < 2):
            raise ValueError(f"HeadConfig {self.target!r}: num_outputs={self.num_outputs} is too small for {self.kind}")
        if self.num_mlps < 1:
            raise ValueError(f"HeadConfig.num_mlps must be >= 1, got {self.num_mlps}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"HeadConfig.dropout must be in [0, 1), got {self.dropout}")


class StructureHead(nn.Module):
    """Per-atom features [N, A] -> per-structure predictions (see HeadConfig). Key: `mlp.*`."""

    def __init__(self, config: HeadConfig, features: int, bias: bool = True, num_layers: int | None = None):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.mlp = jmp_mlp(features, config.num_outputs, num_layers or config.num_mlps, bias)

    def atom_outputs(self, atom_features: torch.Tensor) -> torch.Tensor:
        """[N, A] -> [N, num_outputs], before the reduction over each structure's atoms."""
        return self.mlp(self.dropout(atom_features))

    def forward(self, atom_features: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.reduce(self.atom_outputs(atom_features), batch)

    def reduce(self, atom_outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """atom_outputs [N, num_outputs] -> the per-structure predictions."""
        out = reduce_atoms(atom_outputs, batch["natoms"], self.config.reduction)
        return out[:, 0] if self.config.kind == "scalar" and self.config.num_outputs == 1 else out


class SpatialExtentHead(StructureHead):
    """JMP's QM9 R² head: R² = sum_i s_i |r_i - COM|^2 over each structure's atoms, s_i [N] a
    per-atom MLP output and COM the centre of mass (ASE's atomic masses) -> [B], in the squared
    length unit of the positions times that of s (JMP trains it unnormalised). The MLP is JMP's
    `scalar_mlp`: bias-free, num_mlps hidden layers before the output one (keys `mlp.0.weight,
    mlp.2.weight, ..., mlp.{2 num_mlps}.weight`). Meant for molecules: positions are taken as
    given, not unwrapped across periodic boundaries."""

    def __init__(self, config: HeadConfig, features: int):
        super().__init__(config, features, bias=False, num_layers=config.num_mlps + 1)
        # ASE's masses (the float64 table; the network's dtype once the model is cast, as JMP's
        # float32 buffer), cast to the positions' dtype.
        self.register_buffer("atomic_masses", torch.from_numpy(atomic_masses), persistent=False)

    def forward(self, atom_features: torch.Tensor, batch: dict) -> torch.Tensor:
        pos = batch["pos"]
        ptr = structure_ptr(batch["natoms"])
        mass = self.atomic_masses[batch["atomic_numbers"]].to(pos.dtype)[:, None]  # [N, 1]
        com = ops.segment_sum(mass * pos, ptr) / ops.segment_sum(mass, ptr)  # [B, 3]
        r2 = (pos - com[batch["batch"]]).square().sum(-1, keepdim=True)  # [N, 1]
        # (in the positions' precision: under fp16 autocast s is half, and s r^2 of a large molecule nears its range)
        s = self.atom_outputs(atom_features).to(r2.dtype)
        return ops.segment_sum(s * r2, ptr)[:, 0]
