"""Losses of JMP's recipes, as sums: the loop divides by the global number of structures (or atoms)
of the step, so that DDP ranks holding different shares of a batch reproduce the one-process mean.

Every function takes a per-structure `weight` [B] (loss coefficient / target scale of the task the
structure belongs to), so one batch can mix tasks with different coefficients and normalisers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_b weight_b * |pred_b - target_b| (averaged over the k columns of [B, k] / [B, 3, 3] targets).

    JMP: the energy (pretraining) and every scalar (fine-tuning); here the stress too. Divide by B."""
    err = (pred - target).abs()
    if err.dim() > 1:
        err = err.flatten(1).mean(1)
    return (weight * err).sum()


def force_l2mae(pred: torch.Tensor, target: torch.Tensor, batch: torch.Tensor, natoms: torch.Tensor,
                weight: torch.Tensor, structure_wise: bool) -> torch.Tensor:
    """L2MAE of forces: per-atom Euclidean error ||F_pred - F||_2, weighted by its structure's weight.

    structure_wise (JMP pretraining's SWL): each structure's sum over its atoms / its natoms, summed
    over structures (divide by B), so small molecules count as much as big slabs. Otherwise
    (fine-tuning): the sum over atoms (divide by N). pred, target [N, 3]; batch [N]; natoms [B]."""
    err = torch.linalg.vector_norm(pred - target, dim=-1) * weight[batch]
    if not structure_wise:
        return err.sum()
    per_structure = torch.zeros_like(weight, dtype=err.dtype).index_add_(0, batch, err)
    return (per_structure / natoms.to(err.dtype)).sum()


def classification_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        class_weights: torch.Tensor | None) -> torch.Tensor:
    """sum_b weight_b * cross-entropy; logits [B, C], target [B] int64 class index (JMP sums it
    over the batch, unlike the other losses, which are means)."""
    ce = F.cross_entropy(logits, target, weight=class_weights, reduction="none")
    return (weight * ce).sum()
