"""Speed of one training step on the CPU, tiny config and JMP-S: the trainer's whole step
(loss with normalisation and per-task weights, global-count reduction, NaN check, clipping,
AdamW, EMA) side by side with a bare step of the same network (forward, L1 energy + L2 force
loss, backward, AdamW) on the same batch, so the ratio is the trainer's overhead.

Batch: 8 EMT-labelled molecules (g2-size, non-periodic), 6 Å graphs, k = 30; graph construction
is included in both (graph preset oc20: periodicity from each structure's pbc flags). Run:

    PYTHONPATH=python pytest bench/bench_train.py --benchmark-enable -m "slow or not slow"
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.emt import EMT

from jmp_ext.data import DatasetWriter, LmdbDataset, compute_stats, save_stats
from jmp_ext.train.config import build_config
from jmp_ext.train.batches import to_device
from jmp_ext.train.loop import Trainer

NAMES = ["CH3OH", "C2H4", "CH3CHO", "C2H6", "CH3CN", "H2CO", "CH3NO2", "C3H8"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_train") / "train"
    rng = np.random.default_rng(0)
    with DatasetWriter(path) as writer:
        for name in NAMES * 2:
            atoms = molecule(name)
            atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
            atoms.calc = EMT()
            n = len(atoms)
            writer.add({"pos": atoms.positions, "atomic_numbers": atoms.numbers, "cell": np.zeros((3, 3)),
                        "pbc": np.zeros(3, bool), "tags": np.full(n, 2), "fixed": np.zeros(n, bool),
                        "energy": np.array(atoms.get_potential_energy()), "forces": atoms.get_forces()})
    save_stats(path, compute_stats(LmdbDataset(path)))
    return path


def trainer_for(dataset, backbone: str, tmp_path) -> tuple[Trainer, dict]:
    raw = {"mode": "pretrain", "tasks": [{"name": "mol", "train": str(dataset), "forces": "direct", "structure_wise_force_loss": True,
                      "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
           "run_dir": str(tmp_path), "threads": torch.get_num_threads(), "graph": {"preset": "oc20", "cutoff": 6.0},
           "model": {"backbone": backbone}, "data": {"batch_size": 8, "in_memory": True},
           "loop": {"max_steps": 10, "ema_decay": 0.99, "progress": False, "fit_scale_factors": 0}}
    trainer = Trainer(build_config(raw))
    return trainer, to_device(next(trainer._epoch_batches()), trainer.device)


def bare_step(model, optimizer, batch):
    """The same network, graphs and optimizer without the trainer around them."""
    preds = model(batch)
    loss = (preds["energy"] - batch["energy"]).abs().mean() + \
        torch.linalg.vector_norm(preds["forces"] - batch["forces"], dim=-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backbone", ["tiny", pytest.param("jmp_s", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", ["trainer", "bare"])
def test_train_step(benchmark, dataset, tmp_path, backbone, impl):
    trainer, batch = trainer_for(dataset, backbone, tmp_path)
    benchmark.group = f"train step {backbone} (8 molecules, {batch['pos'].shape[0]} atoms)"
    if impl == "trainer":
        benchmark.pedantic(trainer.train_step, args=(batch,), rounds=5, warmup_rounds=1)
    else:
        trainer.model.train()
        benchmark.pedantic(bare_step, args=(trainer.model, trainer.optimizer, batch), rounds=5, warmup_rounds=1)
