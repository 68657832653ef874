"""Whole JMP networks: atom embedding + GemNet-OC backbone + heads, with JMP's checkpoint keys.

PretrainModel: `embedding.atom_embedding.weight`, `backbone.*`, `output.out_energy.{i}.*`,
    `output.out_forces.{i}.*` (i = index of the task, as in JMP's TypedModuleList): per-task
    energy and direct-force heads.
FinetuneModel: the same embedding and backbone, `output.heads.{target}.mlp.*` scalar /
    classification heads, and forces that are direct (`output.out_forces.*`, from the backbone's
    force branch) or gradients F = -dE/dpos, with the stress (1/V) dE/dstrain.

Both take (batch, graphs): batch as jmp_ext.data.collate makes it, graphs from
jmp_ext.graphs.build_graphs(batch, graph_config, edge_dropout=backbone.config.edge_dropout while
training). Units are the data's (eV, Å). A network built from scratch has unfitted ScaleFactors:
fit them first, jmp_ext.models.fit_scale_factors(model, [(batch, graphs), ...]), as JMP does
(a loaded checkpoint has them). The attributes embedding (AtomEmbedding) and backbone
(GemNetOCBackbone) are the parts JMP's checkpoints share.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from jmp_ext import ops
from jmp_ext.graphs import with_geometry
from jmp_ext.models.force_scaler import ForceScaler
from jmp_ext.models.gemnet_oc import BackboneConfig, GemNetOCBackbone
from jmp_ext.models.heads import HeadConfig, SpatialExtentHead, StructureHead, direct_forces, jmp_mlp, reduce_atoms


class AtomEmbedding(nn.Module):
    """Atomic numbers Z [N] (1..num_elements) -> embeddings [N, emb_size_atom] = atom_embedding(Z - 1)."""

    def __init__(self, num_elements: int, emb_size: int):
        super().__init__()
        self.atom_embedding = nn.Embedding(num_elements, emb_size)

    def forward(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        num_elements = self.atom_embedding.num_embeddings
        bad = (atomic_numbers < 1) | (atomic_numbers > num_elements)
        if bad.any():
            raise ValueError(f"unknown element(s) {sorted(set(atomic_numbers[bad].tolist()))}: the embedding knows "
                             f"atomic numbers 1..{num_elements}")
        return self.atom_embedding(atomic_numbers - 1)


class PretrainOutput(nn.Module):
    """JMP's pretraining `Output`: per task an energy MLP on atom features (summed per structure)
    and a force MLP on edge features (direct forces)."""

    def __init__(self, config: BackboneConfig, num_tasks: int):
        super().__init__()
        self.out_energy = nn.ModuleList([jmp_mlp(config.emb_size_atom, 1) for _ in range(num_tasks)])
        self.out_forces = nn.ModuleList([jmp_mlp(config.emb_size_edge, 1) for _ in range(num_tasks)])


class PretrainModel(nn.Module):
    """JMP pretraining network. forward -> {"energy": [B, T] eV, "forces": [N, 3, T] eV/Å,
    "energy_atoms": [N, T], each atom's term of the energy sum}, column t for task tasks[t] (every
    head runs on every structure; the loss masks by task, as JMP does)."""

    def __init__(self, config: BackboneConfig, tasks: list[str]):
        super().__init__()
        if not config.has_force_branch:
            raise ValueError("pretraining uses direct forces: BackboneConfig needs regress_forces=direct_forces=True")
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {tasks}")
        self.tasks = list(tasks)
        self.embedding = AtomEmbedding(config.num_elements, config.emb_size_atom)
        self.backbone = GemNetOCBackbone(config)
        self.output = PretrainOutput(config, len(tasks))

    def forward(self, batch: dict, graphs: dict) -> dict[str, torch.Tensor]:
        out = self.backbone(self.embedding(batch["atomic_numbers"]), graphs)
        num_atoms = batch["pos"].shape[0]
        energy_atoms = torch.cat([mlp(out["energy"]) for mlp in self.output.out_energy], dim=1)  # [N, T]
        forces = [direct_forces(mlp(out["forces"]), out["V_st"], out["idx_t"], num_atoms)
                  for mlp in self.output.out_forces]
        return {"energy": reduce_atoms(energy_atoms, batch["natoms"], "sum"), "forces": torch.stack(forces, dim=-1),
                "energy_atoms": energy_atoms}


class FinetuneOutput(nn.Module):
    """JMP's fine-tuning heads: one per target on atom features (StructureHead, or
    SpatialExtentHead for R²), and with direct forces an MLP on edge features."""

    def __init__(self, config: BackboneConfig, heads: list[HeadConfig], forces: str | None):
        super().__init__()
        # JMP's EnergyForcesModelBase builds the energy head of a model with forces without biases.
        self.heads = nn.ModuleDict({
            h.target: SpatialExtentHead(h, config.emb_size_atom) if h.reduction == "spatial_extent"
            else StructureHead(h, config.emb_size_atom, bias=not (forces and h.target == "energy"))
            for h in heads})
        if forces == "direct":
            self.out_forces = jmp_mlp(config.emb_size_edge, 1)


class FinetuneModel(nn.Module):
    """JMP fine-tuning network: one head per target, plus forces and stress.

    forces: None, "direct" (edge MLP on the backbone's force branch, JMP's direct forces) or
    "gradient" (F = -dE/dpos of the "energy" head; the backbone is then built without its force
    branch, as JMP does). With forces, the "energy" head has no biases (JMP's energy + forces
    models). stress=True adds stress [B, 3, 3] = (1/V) dE/dstrain (eV/Å^3, ASE's sign):
    a symmetric strain of the cell applied to positions and cell; NaN for a structure without a
    cell (zero volume: a molecule), where it is undefined, so that one batch may mix both.
    Gradients are taken with create_graph while training, so a force / stress loss trains the
    weights, and under float16 autocast through `force_scaler` (JMP's ForceScaler; None without
    gradients), whose adaptive scale is training state to save and restore beside the weights.

    forward -> {target: [B] or [B, C], "forces": [N, 3], "stress": [B, 3, 3], "energy_atoms": [N],
    each atom's term of the "energy" head's sum}."""

    def __init__(self, config: BackboneConfig, heads: list[HeadConfig],
                 forces: Literal["direct", "gradient"] | None = None, stress: bool = False):
        super().__init__()
        targets = [h.target for h in heads]
        if len(set(targets)) != len(targets) or {"forces", "stress", "energy_atoms"} & set(targets):
            raise ValueError(f"head targets must be distinct and not 'forces'/'stress'/'energy_atoms', got {targets}")
        if forces not in (None, "direct", "gradient"):
            raise ValueError(f"forces must be None, 'direct' or 'gradient', got {forces!r}")
        if (forces == "gradient" or stress) and "energy" not in targets:
            raise ValueError("gradient forces and stress need an 'energy' head")
        if stress and forces == "direct":
            raise ValueError("stress is a gradient of the energy: use forces='gradient' with stress=True")
        # The force branch exists exactly when direct forces are predicted (JMP drops it otherwise).
        config = BackboneConfig.from_dict({**config.to_dict(), "regress_forces": forces == "direct",
                                           "direct_forces": forces == "direct"})
        self.forces, self.stress = forces, stress
        self.force_scaler = ForceScaler() if forces == "gradient" or stress else None
        self.embedding = AtomEmbedding(config.num_elements, config.emb_size_atom)
        self.backbone = GemNetOCBackbone(config)
        self.output = FinetuneOutput(config, heads, forces)

    def _heads(self, batch: dict, graphs: dict) -> dict[str, torch.Tensor]:
        out = self.backbone(self.embedding(batch["atomic_numbers"]), graphs)
        preds = {}
        for name, head in self.output.heads.items():
            if name == "energy" and head.config.reduction == "sum":  # (its atoms' terms: ASE's per-atom energies)
                atom_outputs = head.atom_outputs(out["energy"])
                preds[name], preds["energy_atoms"] = head.reduce(atom_outputs, batch), atom_outputs[:, 0]
            else:
                preds[name] = head(out["energy"], batch)
        if self.forces == "direct":
            preds["forces"] = direct_forces(self.output.out_forces(out["forces"]), out["V_st"], out["idx_t"],
                                            batch["pos"].shape[0])
        return preds

    def forward(self, batch: dict, graphs: dict, derivatives: bool = True) -> dict[str, torch.Tensor]:
        """The heads' outputs, with gradient forces and stress when the model has them, unless
        `derivatives` is False (an energy alone, for Monte Carlo, costs a third as much)."""
        if not derivatives or (self.forces != "gradient" and not self.stress):
            return self._heads(batch, graphs)
        with torch.enable_grad():
            pos = batch["pos"] if batch["pos"].requires_grad else batch["pos"].detach().requires_grad_(True)
            structure, cell = batch["batch"], batch.get("cell")
            cell = cell.to(pos.dtype) if cell is not None else None  # (as jmp_ext.graphs casts it)
            inputs = [pos]
            if self.stress:
                if cell is None:
                    raise ValueError("stress needs batch['cell']")
                volume = torch.linalg.det(cell).abs()
                strain = torch.zeros_like(cell, requires_grad=True)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                # r -> r (1 + eps) for positions and lattice vectors (rows) alike, in full
                # precision under autocast too.
                with torch.autocast(pos.device.type, enabled=False):
                    pos = pos + torch.einsum("ni,nij->nj", pos, ops.gather(sym, structure))  # (deterministic gradient)
                    cell = cell + torch.bmm(cell, sym)
                inputs.append(strain)
            preds = self._heads(batch, with_geometry(graphs, pos, cell, structure))
            grads = self.force_scaler.gradients(preds["energy"].sum(), inputs, create_graph=self.training)
        if self.forces == "gradient":
            preds["forces"] = -grads[0]
        if self.stress:
            has_volume = (volume > 0)[:, None, None]
            # (1 for the zero volumes: a 0 / 0 would put NaN into the gradients of the others too)
            stress = grads[1] / torch.where(has_volume, volume[:, None, None], 1.0)
            preds["stress"] = torch.where(has_volume, stress, torch.nan)
        return preds
