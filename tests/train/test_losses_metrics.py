import math

import numpy as np
import pytest
import torch

from jmp_ext.train.losses import classification_loss, force_l2mae, l1_loss
from jmp_ext.train import distributed
from jmp_ext.train.metrics import Metrics, roc_auc


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
    # A zero force vector (an atom at equilibrium) has no direction: it counts 0, as in
    # fairchem's evaluator, whose force cosines JMP reports.
    zero = Metrics()
    zero.update_forces("t", torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]), torch.tensor([[2.0, 0, 0], [0.0, 0, 0]]),
                       torch.tensor([True, True]))
    assert zero.compute()["t/forces_cos"] == pytest.approx((1.0 + 0.0) / 2)
    m.update_classification("t", "cls", torch.tensor([[1.0, 0], [0, 1.0], [1, 0]]), torch.tensor([0, 0, 0]))
    assert m.compute()["t/cls_accuracy"] == pytest.approx(2 / 3)


def _all_reduced(monkeypatch, ranks: list[Metrics]) -> list[dict]:
    """compute() of each rank's Metrics after all_reduce, its collectives replaced by what the
    ranks' tables (as they stand before any all_reduce) would give."""
    tables = [(dict(m.sums), dict(m.counts), dict(m.probabilities)) for m in ranks]
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [(sorted(sums), probs) for sums, _, probs in tables])

    def all_reduce_sum(values):
        names = sorted(set().union(*(sums for sums, _, _ in tables)))
        return sum(torch.tensor([[sums.get(n, 0.0), counts.get(n, 0.0)] for n in names], dtype=torch.float64)
                   for sums, counts, _ in tables)

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    results = []
    for m in ranks:
        m.all_reduce()
        results.append(m.compute())
    return results


def test_mae_and_rmse_are_exact_over_batches_and_ranks(monkeypatch):
    """Batches of different sizes on two ranks (all_reduce's collectives replaced by sums over
    the ranks' own tables): every MAE and RMSE, and forces_cos, equals numpy's over all the
    errors (atoms) at once, as a mean of per-batch or per-rank values would not. Only rank 0 sees the scalar target."""
    rng = np.random.default_rng(0)
    ranks, errors, cosines = [Metrics(), Metrics()], {}, []
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
        cosines.extend((fp * ft).sum(1)[free] / (np.linalg.norm(fp, axis=1) * np.linalg.norm(ft, axis=1))[free])
        if rank is ranks[0]:
            sp, st = rng.normal(size=size), rng.normal(size=size)
            rank.update_scalar("t", "gap", torch.tensor(sp), torch.tensor(st))
            errors.setdefault("gap", []).extend(sp - st)

    results = _all_reduced(monkeypatch, ranks)
    assert results[0] == results[1]
    for name, err in errors.items():
        err = np.asarray(err)
        assert results[0][f"t/{name}_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-12), name
        assert results[0][f"t/{name}_rmse"] == pytest.approx(np.sqrt(np.square(err).mean()), rel=1e-12), name
    assert results[0]["t/forces_cos"] == pytest.approx(np.mean(cosines), rel=1e-12)  # per free atom


def _brute_auc(scores, positive):
    """Fraction of (positive, negative) pairs ordered right, ties half."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize("num_classes", [2, 4])
def test_roc_auc_against_pair_counting(num_classes):
    """Random probabilities, rounded so that ties occur; every class one-vs-rest, averaged."""
    g = torch.Generator().manual_seed(num_classes)
    probabilities = (torch.rand(200, num_classes, generator=g, dtype=torch.float64) * 8).round() / 8
    labels = torch.randint(num_classes, (200,), generator=g)
    classes = [1] if num_classes == 2 else range(num_classes)
    want = np.mean([_brute_auc(probabilities[:, c].numpy(), (labels == c).numpy()) for c in classes])
    assert roc_auc(probabilities, labels) == pytest.approx(want, rel=1e-12)
    perfect = torch.nn.functional.one_hot(labels, num_classes).double()
    assert roc_auc(perfect, labels) == 1.0 and roc_auc(1 - perfect, labels) == 0.0
    assert roc_auc(torch.full((5, 2), 0.5, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])) == 0.5
    assert roc_auc(probabilities[:3], torch.zeros(3, dtype=torch.int64)) is None  # one class: undefined


def test_classification_metrics_over_batches_and_ranks(monkeypatch):
    """ROC-AUC is no mean of batch values: the probabilities of every batch on every rank are
    gathered, and both ranks report the area of all of them."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(30, 2, generator=g, dtype=torch.float64), torch.randint(2, (30,), generator=g)
    ranks = [Metrics(), Metrics()]
    for k, (lo, hi) in enumerate([(0, 4), (4, 15), (15, 30)]):
        ranks[k % 2].update_classification("t", "metal", logits[lo:hi], labels[lo:hi])
    results = _all_reduced(monkeypatch, ranks)
    assert results[0] == results[1]
    p1 = logits.softmax(-1)[:, 1].numpy()
    assert results[0]["t/metal_rocauc"] == pytest.approx(_brute_auc(p1, labels.numpy() == 1), rel=1e-12)
    assert results[0]["t/metal_accuracy"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())


def test_energy_and_forces_within_threshold_against_a_loop():
    """OC20's S2EF headline metric, EFwT: the share of structures with |dE| < 0.02 eV and every
    force component of every free atom within 0.03 eV/Å (fixed atoms' errors do not count)."""
    from types import SimpleNamespace

    from jmp_ext.train.tasks import update_metrics

    natoms = torch.tensor([2, 3, 1, 2, 4])
    structure = torch.repeat_interleave(torch.arange(5), natoms)
    fixed = torch.zeros(12, dtype=torch.bool)
    fixed[[7, 9]] = True  # (one atom of structure 3, one of structure 4)
    g = torch.Generator().manual_seed(0)
    energy = torch.randn(5, generator=g, dtype=torch.float64)
    forces = torch.randn(12, 3, generator=g, dtype=torch.float64)
    pred_forces = forces + 0.01 * torch.rand(12, 3, generator=g, dtype=torch.float64)
    pred_forces[7, 1] += 0.2  # a fixed atom's error: structure 3 passes still
    pred_forces[10, 2] -= 0.05  # a free atom's: structure 4 fails
    preds = {"energy": energy + torch.tensor([0.01, -0.5, 0.03, 0.0, 0.019], dtype=torch.float64),
             "forces": pred_forces}
    batch = {"task": torch.tensor([0, 1, 0, 0, 0]), "batch": structure, "natoms": natoms, "fixed": fixed,
             "energy": energy, "forces": forces}
    model = SimpleNamespace(tasks=[SimpleNamespace(name="a"), SimpleNamespace(name="b")],
                            targets={"energy": SimpleNamespace(kind="energy"), "forces": SimpleNamespace(kind="forces")})
    metrics = Metrics()
    update_metrics(metrics, model, preds, batch)
    out = metrics.compute()
    for t, name in enumerate(("a", "b")):
        passed = []
        for b in range(5):
            if batch["task"][b] != t:
                continue
            free = (structure == b) & ~fixed
            force_error = (pred_forces[free] - forces[free]).abs().max().item()
            passed.append(abs(preds["energy"][b] - energy[b]).item() < 0.02 and force_error < 0.03)
        assert out[f"{name}/efwt"] == pytest.approx(sum(passed) / len(passed))
    assert out["a/efwt"] == pytest.approx(2 / 4) and out["b/efwt"] == 0.0
