"""Validation / test metrics, accumulated as float64 sums so they can be all-reduced across ranks.

Metric names: `{task}/energy_mae` (eV per structure), `{task}/energy_per_atom_mae` (eV/atom),
`{task}/forces_mae` (eV/Å, per component, free atoms only), `{task}/forces_cos` (cosine of
predicted and true force vectors, free atoms; torch's cosine_similarity, as in fairchem's
evaluator: a zero vector counts 0, one under 1e-8 eV/Å less than its cosine),
`{task}/stress_mae` (eV/Å^3), `{task}/{name}_mae`
for scalars, `{task}/{name}_accuracy` and `{task}/{name}_rocauc` for classification. Every `_mae`
has an `_rmse` over the same errors (its sum is one of squares; the root is taken after the
all-reduce, in compute(), so it is exact over batches and ranks). All are in physical units.
ROC-AUC (MatBench's metric for mp_is_metal) is no sum: the class probabilities and labels are
kept and gathered from every rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jmp_ext.train import distributed


# OC20's thresholds of energy and forces within threshold (EFwT): eV and eV/Å.
EFWT_ENERGY, EFWT_FORCE = 0.02, 0.03


class Metrics:
    """sum and count per metric name; `compute()` divides them (and takes the root for _rmse)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.probabilities: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        """rocauc name -> (class probabilities [M, C] float64, labels [M]) per batch, on the CPU."""

    def add(self, name: str, total: torch.Tensor | float, count: int | float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def add_errors(self, name: str, err: torch.Tensor) -> None:
        """`{name}_mae` and `{name}_rmse` over every element of the errors `err` (float64)."""
        self.add(f"{name}_mae", err.abs().sum(), err.numel())
        self.add(f"{name}_rmse", err.square().sum(), err.numel())

    def update_energy(self, task: str, pred: torch.Tensor, target: torch.Tensor, natoms: torch.Tensor,
                      name: str = "energy") -> None:
        """pred, target [B] eV (total); natoms [B]."""
        err = pred.detach().double() - target.double()
        self.add_errors(f"{task}/{name}", err)
        self.add_errors(f"{task}/{name}_per_atom", err / natoms.double())

    def update_forces(self, task: str, pred: torch.Tensor, target: torch.Tensor, free: torch.Tensor) -> None:
        """pred, target [N, 3] eV/Å; free [N] bool (JMP's metrics skip fixed atoms)."""
        p, t = pred.detach().double()[free], target.double()[free]
        self.add_errors(f"{task}/forces", p - t)
        self.add(f"{task}/forces_cos", F.cosine_similarity(p, t, dim=-1).sum(), p.shape[0])

    def update_within_threshold(self, task: str, energy_error: torch.Tensor, force_error: torch.Tensor,
                                structure: torch.Tensor) -> None:
        """`{task}/efwt`, OC20's energy and forces within threshold: the share of structures whose
        energy is within EFWT_ENERGY of its label and every force component of its free atoms within
        EFWT_FORCE (a structure without free atoms: on its energy alone). energy_error [B] eV;
        force_error [N', 3] eV/Å of the free atoms; structure [N'] their structure's index in 0..B-1."""
        largest = torch.zeros_like(energy_error, dtype=torch.float64).scatter_reduce(
            0, structure, force_error.detach().double().abs().amax(dim=-1), reduce="amax")
        within = (energy_error.detach().double().abs() < EFWT_ENERGY) & (largest < EFWT_FORCE)
        self.add(f"{task}/efwt", within.sum(), within.numel())

    def update_scalar(self, task: str, name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.add_errors(f"{task}/{name}", pred.detach().double() - target.double())

    def update_classification(self, task: str, name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits [M, C]; target [M] class indices."""
        correct = (logits.detach().argmax(-1) == target).sum()
        self.add(f"{task}/{name}_accuracy", correct, target.numel())
        probabilities = logits.detach().double().softmax(-1).cpu()
        self.probabilities.setdefault(f"{task}/{name}_rocauc", []).append((probabilities, target.cpu()))

    def all_reduce(self) -> None:
        """Sums every metric over ranks (a rank that saw no structure of a task contributes zeros)
        and gathers the classification probabilities, in rank order (so that every rank computes
        the same ROC-AUC from the same concatenation)."""
        if not distributed.is_distributed():
            return
        gathered = distributed.all_gather_object((sorted(self.sums), self.probabilities))
        names = sorted(set().union(*(rank_names for rank_names, _ in gathered)))
        values = torch.tensor([[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names],
                              dtype=torch.float64)
        values = distributed.all_reduce_sum(values)
        self.sums = {n: v[0].item() for n, v in zip(names, values)}
        self.counts = {n: v[1].item() for n, v in zip(names, values)}
        self.probabilities = {}
        for _, table in gathered:
            for n, batches in table.items():
                self.probabilities.setdefault(n, []).extend(batches)

    def compute(self) -> dict[str, float]:
        means = {n: self.sums[n] / self.counts[n] for n in sorted(self.sums) if self.counts[n] > 0}
        # Every name ends in its metric (_mae, _rmse, _cos, _accuracy, _rocauc, /efwt), so a target's own
        # name cannot make another metric's mean a root.
        out = {n: math.sqrt(v) if n.endswith("_rmse") else v for n, v in means.items()}
        for n, batches in self.probabilities.items():
            auc = roc_auc(torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches]))
            if auc is not None:
                out[n] = auc
        return dict(sorted(out.items()))


def roc_auc(probabilities: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve: for two classes, of class 1's probability; for more, the mean of
    each class's one-vs-rest area over the classes that occur and do not make up every label
    (scikit-learn's roc_auc_score, multi_class='ovr', average='macro', when all classes occur).
    None when no class has both positives and negatives. probabilities [M, C]; labels [M] ints.

    Mann-Whitney: the area is the probability that a random positive scores above a random
    negative (ties count half), from the positives' mean rank among all scores."""
    areas = []
    classes = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    for c in classes:
        positive = labels == c
        n_pos = int(positive.sum())
        n_neg = labels.numel() - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        areas.append((_average_ranks(probabilities[:, c])[positive].sum().item() - n_pos * (n_pos + 1) / 2)
                     / (n_pos * n_neg))
    return float(sum(areas) / len(areas)) if areas else None


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M of x [M] in ascending order, tied values sharing their mean rank."""
    values, order = torch.sort(x, stable=True)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    last = torch.cumsum(counts, 0).double()  # rank of each group's last member
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(last - (counts - 1) / 2, counts)
    return ranks
