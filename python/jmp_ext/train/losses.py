"""Losses of JMP's recipes, on predictions and labels in the same (normalised) units.

Every function takes a per-structure `weight` [B] (loss coefficient / target std of the task the
structure belongs to), so one batch can mix tasks with different coefficients and normalisers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_b weight_b * |pred_b - target_b| (averaged over the k columns of [B, k] targets).

    pred, target [B] or [B, k]; weight [B]. JMP: energy (pretraining) and every scalar (fine-tuning)."""
    err = (pred - target).abs()
    if err.dim() > 1:
        err = err.flatten(1).mean(1)
    return (weight * err).mean()


def force_l2mae(pred: torch.Tensor, target: torch.Tensor, batch: torch.Tensor, natoms: torch.Tensor,
                weight: torch.Tensor, structure_wise: bool) -> torch.Tensor:
    """L2MAE of forces: per-atom Euclidean error ||F_pred - F||_2, weighted by its structure's weight.

    structure_wise (JMP pretraining's SWL): sum over a structure's atoms / its natoms, then mean over
    structures, so small molecules count as much as big slabs. Otherwise (fine-tuning): mean over
    all atoms. pred, target [N, 3] (eV/Å or normalised); batch [N] structure index; natoms [B]."""
    err = torch.linalg.vector_norm(pred - target, dim=-1) * weight[batch]
    if not structure_wise:
        return err.mean()
    per_structure = torch.zeros_like(weight, dtype=err.dtype).index_add_(0, batch, err)
    return (per_structure / natoms.to(err.dtype)).mean()


def stress_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over structures and the 9 components of weight_b * |ΔS|; pred, target [B, 3, 3]."""
    return l1_loss(pred, target, weight)


def classification_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        class_weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy averaged over structures; logits [B, C], target [B] int64 class index."""
    ce = F.cross_entropy(logits, target, weight=class_weights, reduction="none")
    return (weight * ce).mean()
