"""Speed of the whole GemNet-OC model on the CPU: forward, forward+backward with direct forces
(a pretraining step) and with gradient forces (double backward), for the tiny config and JMP-S.

Batches: OC20-like slabs (Pt(111) 4x4x4 + CO, 66 atoms, periodic, 12 Å, k = 30) and molecules
(ASE's g2 set, 8 Å, k = 30). Graph construction and interaction indices are included in every
timed call, as in training. Run:

    PYTHONPATH=python pytest bench/bench_model.py --benchmark-enable -m "slow or not slow"

Side by side: impl "jmp_ext" (our kernels) and "torch" (the same model with the pure-torch
twins of the reductions, jmp_ext.ops.reference_reductions: indexing gathers, index_put padding,
index_add sums).
Peak memory of one case in a fresh process (ru_maxrss):

    PYTHONPATH=python python bench/bench_model.py tiny slabs 32 direct [compile]

"compile" times the network under torch.compile(dynamic=True) (the trainer's loop.compile),
after two compiling steps.

Results go to bench/README.md (Model section). Atoms/s = atoms in the batch / mean time.
"""

from __future__ import annotations

import functools
import resource
import sys
import time

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.collections import g2

from jmp_ext import ops
from jmp_ext.cpu import keep_freed_memory
from jmp_ext.graphs import GraphConfig, build_graphs
from jmp_ext.models import BackboneConfig, FinetuneModel, HeadConfig, PretrainModel
from jmp_ext.ops import reference_reductions


def slab(seed: int):
    atoms = fcc111("Pt", (4, 4, 4), vacuum=8.0)
    tags = np.where(atoms.get_tags() == 1, 1, 0)  # ase: 1 = top layer; OC20: 1 surface, 0 below
    add_adsorbate(atoms, molecule("CO"), 1.85, "ontop", mol_index=1)
    atoms.set_tags(np.concatenate([tags, [2, 2]]))
    atoms.rattle(0.05, seed=seed)
    return atoms


def molecules(count: int):
    names = [n for n in g2.names if len(g2[n]) >= 8][:count]
    out = []
    for i, name in enumerate(names):
        atoms = g2[name]
        atoms.set_tags(np.full(len(atoms), 2))
        atoms.rattle(0.02, seed=i)
        out.append(atoms)
    return out


def collate(structures, periodic: bool) -> dict:
    natoms = torch.tensor([len(a) for a in structures])
    return {
        "pos": torch.tensor(np.concatenate([a.positions for a in structures]), dtype=torch.float32),
        "atomic_numbers": torch.tensor(np.concatenate([a.numbers for a in structures])),
        "natoms": natoms,
        "batch": torch.repeat_interleave(torch.arange(len(structures)), natoms),
        "cell": torch.tensor(np.stack([a.cell.array for a in structures]), dtype=torch.float32),
        "pbc": torch.full((len(structures), 3), periodic),
        "tags": torch.tensor(np.concatenate([a.get_tags() for a in structures])),
    }


@functools.cache
def batch_and_config(kind: str, size: int):
    if kind == "slabs":
        structures, config = [slab(i) for i in range(size)], GraphConfig.preset("oc20")
    else:
        structures, config = molecules(size), GraphConfig.preset("ani1x")
    return collate(structures, config.pbc), config


def step(model, batch, config, mode: str):
    graphs = build_graphs(batch, config)
    if mode == "forward":
        with torch.no_grad():
            return model(batch, graphs)
    out = model(batch, graphs)
    loss = out["energy"].abs().sum() + out["forces"].square().sum()
    loss.backward()
    return loss


def make_model(size: str, mode: str):
    config = {"tiny": BackboneConfig.tiny(), "jmp_s": BackboneConfig.jmp_s(), "jmp_l": BackboneConfig.jmp_l()}[size]
    torch.manual_seed(0)
    if mode == "gradient":
        return FinetuneModel(config, [HeadConfig(target="energy")], forces="gradient").train()
    return PretrainModel(config, ["oc20"]).train()


CASES = [
    ("tiny", "slabs", 4), ("tiny", "molecules", 16),
    pytest.param("tiny", "slabs", 32, marks=pytest.mark.slow),  # the target batch (2112 atoms)
    pytest.param("jmp_s", "slabs", 4, marks=pytest.mark.slow), pytest.param("jmp_s", "molecules", 16, marks=pytest.mark.slow),
]


def use_torch_reductions(monkeypatch):
    for name in ("gather", "ragged_to_padded", "scatter_sum", "segment_sum", "segment_mean", "segment_max"):
        monkeypatch.setattr(ops, name, getattr(reference_reductions, name))


@pytest.mark.parametrize("impl", ["jmp_ext", "torch"])
@pytest.mark.parametrize("mode", ["forward", "direct", "gradient"])
@pytest.mark.parametrize(("size", "kind", "count"), CASES)
def test_model_step(benchmark, monkeypatch, size, kind, count, mode, impl):
    torch.set_num_threads(1)
    if impl == "torch":
        use_torch_reductions(monkeypatch)
    batch, config = batch_and_config(kind, count)
    model = make_model(size, mode)
    benchmark.extra_info["atoms"] = int(batch["natoms"].sum())
    benchmark.pedantic(step, args=(model, batch, config, mode), rounds=2, warmup_rounds=2)


if __name__ == "__main__":
    size, kind, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    compiled = sys.argv[5:] == ["compile"]
    keep_freed_memory()  # as the trainer and bench/conftest.py do
    torch.set_num_threads(1)
    batch, config = batch_and_config(kind, count)
    model = make_model(size, mode)
    if compiled:
        model.compile(dynamic=True)
        for _ in range(2):
            step(model, batch, config, mode)
    # CPU time as well as wall time: on a shared machine the wall time includes waiting for a core.
    wall, cpu = [], []
    for _ in range(5):  # the allocator's heap settles over the first steps
        start, start_cpu = time.perf_counter(), time.process_time()
        step(model, batch, config, mode)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    atoms = int(batch["natoms"].sum())
    print(f"{size} {kind} x{count} ({atoms} atoms) {mode}{' compiled' if compiled else ''}: wall {min(wall):.2f} s, cpu {min(cpu):.2f} s, "
          f"{atoms / min(cpu):.0f} atoms/cpu-s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
