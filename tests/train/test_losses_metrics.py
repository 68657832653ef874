import math

import pytest
import torch

from jmp_ext.train.losses import classification_loss, force_l2mae, l1_loss
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
    assert m.compute() == {"t/energy_mae": pytest.approx(2.0), "t/energy_per_atom_mae": pytest.approx((0.5 + 1.0) / 2)}
    pred = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [5.0, 5, 5]])
    true = torch.tensor([[2.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]])
    free = torch.tensor([True, True, False])  # the fixed atom's huge error is not counted
    m.update_forces("t", pred, true, free)
    out = m.compute()
    assert out["t/forces_mae"] == pytest.approx((1 + 1 + 1) / 6)
    assert out["t/forces_cos"] == pytest.approx((1.0 + 0.0) / 2)
    m.update_accuracy("t", "cls", torch.tensor([[1.0, 0], [0, 1.0], [1, 0]]), torch.tensor([0, 0, 0]))
    assert m.compute()["t/cls_accuracy"] == pytest.approx(2 / 3)
