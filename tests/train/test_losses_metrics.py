import math

import numpy as np
import pytest
import torch

from jmp_ext.train.losses import classification_loss, force_l2mae, l1_loss
from jmp_ext.train import distributed
from jmp_ext.train.metrics import Metrics


def _brute_swl(pred, target, natoms, weight):
    total, start = 0.0, 0
    for b, n in enumerate(natoms.tolist()):
        errs = [math.dist(pred[i].tolist(), target[i].tolist()) for i in range(start, start + n)]
        total += weight[b].item() * sum(errs) / n
        start += n
    return total / len(natoms)


def test_force_l2mae_structure_wise_and_atom_mean():
    g = torch.Generator().manual_seed(0)
    natoms = torch.tensor([1, 4, 2])
    batch = torch.repeat_interleave(torch.arange(3), natoms)
    pred, target = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    swl = force_l2mae(pred, target, batch, natoms, weight, structure_wise=True)
    assert swl.item() / 3 == pytest.approx(_brute_swl(pred, target, natoms, weight), rel=1e-12)
    per_atom = [weight[batch[i]].item() * math.dist(pred[i].tolist(), target[i].tolist()) for i in range(7)]
    flat = force_l2mae(pred, target, batch, natoms, weight, structure_wise=False)
    assert flat.item() == pytest.approx(sum(per_atom), rel=1e-12)


def test_l1_and_classification():
    pred, target = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0])
    assert l1_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx(1 + 1)
    assert l1_loss(pred[:, None].repeat(1, 3), target[:, None].repeat(1, 3), torch.ones(2)).item() == pytest.approx(3.0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    want = (-torch.log_softmax(logits, -1)[torch.arange(2), y]).sum()
    assert classification_loss(logits, y, torch.ones(2), None).item() == pytest.approx(want.item())


def test_metrics_against_brute_force():
    m = Metrics()
    natoms = torch.tensor([2, 3])
    m.update_energy("t", torch.tensor([1.0, 5.0]), torch.tensor([0.0, 2.0]), natoms)
    assert m.compute() == {"t/energy_mae": pytest.approx(2.0), "t/energy_per_atom_mae": pytest.approx((0.5 + 1.0) / 2),
                           "t/energy_rmse": pytest.approx(math.sqrt((1 + 9) / 2)),
                           "t/energy_per_atom_rmse": pytest.approx(math.sqrt((0.25 + 1.0) / 2))}
    pred = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [5.0, 5, 5]])
    true = torch.tensor([[2.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]])
    free = torch.tensor([True, True, False])  # the fixed atom's huge error is not counted
    m.update_forces("t", pred, true, free)
    out = m.compute()
    assert out["t/forces_mae"] == pytest.approx((1 + 1 + 1) / 6)
    assert out["t/forces_rmse"] == pytest.approx(math.sqrt((1 + 1 + 1) / 6))
    assert out["t/forces_cos"] == pytest.approx((1.0 + 0.0) / 2)
    m.update_accuracy("t", "cls", torch.tensor([[1.0, 0], [0, 1.0], [1, 0]]), torch.tensor([0, 0, 0]))
    assert m.compute()["t/cls_accuracy"] == pytest.approx(2 / 3)


def test_mae_and_rmse_are_exact_over_batches_and_ranks(monkeypatch):
    """Batches of different sizes on two ranks (all_reduce's collectives replaced by sums over
    the ranks' own tables): every MAE and RMSE equals numpy's over all the errors at once, as a
    mean of per-batch or per-rank values would not. Only rank 0 sees the scalar target."""
    rng = np.random.default_rng(0)
    ranks, errors = [Metrics(), Metrics()], {}
    for b, size in enumerate([1, 5, 2, 7, 3]):
        rank = ranks[b % 2]
        pred, true, natoms = rng.normal(size=size), rng.normal(size=size), rng.integers(1, 9, size)
        rank.update_energy("t", torch.tensor(pred), torch.tensor(true), torch.tensor(natoms))
        errors.setdefault("energy", []).extend(pred - true)
        errors.setdefault("energy_per_atom", []).extend((pred - true) / natoms)
        n = int(natoms.sum())
        fp, ft, free = rng.normal(size=(n, 3)), rng.normal(size=(n, 3)), rng.random(n) < 0.7
        rank.update_forces("t", torch.tensor(fp), torch.tensor(ft), torch.tensor(free))
        errors.setdefault("forces", []).extend((fp - ft)[free].ravel())
        if rank is ranks[0]:
            sp, st = rng.normal(size=size), rng.normal(size=size)
            rank.update_scalar("t", "gap", torch.tensor(sp), torch.tensor(st))
            errors.setdefault("gap", []).extend(sp - st)

    tables = [(dict(m.sums), dict(m.counts)) for m in ranks]
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [sorted(sums) for sums, _ in tables])

    def all_reduce_sum(values):
        names = sorted(set().union(*(sums for sums, _ in tables)))
        return sum(torch.tensor([[sums.get(n, 0.0), counts.get(n, 0.0)] for n in names], dtype=torch.float64)
                   for sums, counts in tables)

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    results = []
    for m in ranks:
        m.all_reduce()
        results.append(m.compute())
    assert results[0] == results[1]
    for name, err in errors.items():
        err = np.asarray(err)
        assert results[0][f"t/{name}_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-12), name
        assert results[0][f"t/{name}_rmse"] == pytest.approx(np.sqrt(np.square(err).mean()), rel=1e-12), name
