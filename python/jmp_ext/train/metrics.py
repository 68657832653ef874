"""Validation / test metrics, accumulated as float64 sums so they can be all-reduced across ranks.

Metric names: `{task}/energy_mae` (eV per structure), `{task}/energy_per_atom_mae` (eV/atom),
`{task}/forces_mae` (eV/Å, per component, free atoms only), `{task}/forces_cos` (cosine of
predicted and true force vectors, free atoms), `{task}/stress_mae` (eV/Å^3), `{task}/{name}_mae`
for scalars, `{task}/{name}_accuracy` for classification. Every `_mae` has an `_rmse` over the
same errors (its sum is one of squares; the root is taken after the all-reduce, in compute(), so
it is exact over batches and ranks). All are in physical units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jmp_ext.train import distributed


class Metrics:
    """sum and count per metric name; `compute()` divides them (and takes the root for _rmse)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

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

    def update_scalar(self, task: str, name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.add_errors(f"{task}/{name}", pred.detach().double() - target.double())

    def update_accuracy(self, task: str, name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        correct = (logits.detach().argmax(-1) == target).sum()
        self.add(f"{task}/{name}_accuracy", correct, target.numel())

    def all_reduce(self) -> None:
        """Sums every metric over ranks (a rank that saw no structure of a task contributes zeros)."""
        if not distributed.is_distributed():
            return
        names = sorted(set().union(*distributed.all_gather_object(sorted(self.sums))))
        values = torch.tensor([[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names],
                              dtype=torch.float64)
        values = distributed.all_reduce_sum(values)
        self.sums = {n: v[0].item() for n, v in zip(names, values)}
        self.counts = {n: v[1].item() for n, v in zip(names, values)}

    def compute(self) -> dict[str, float]:
        means = {n: self.sums[n] / self.counts[n] for n in sorted(self.sums) if self.counts[n] > 0}
        # Every name ends in its metric (_mae, _rmse, _cos, _accuracy), so a target's own name
        # cannot make another metric's mean a root.
        return {n: math.sqrt(v) if n.endswith("_rmse") else v for n, v in means.items()}
