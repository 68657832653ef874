"""Data loading: entries/s read and collated from a 100k-entry OC20-sized dataset, jmp_ext's
pickle-free format against the OC20/JMP way (an LMDB of pickled dicts of torch tensors).

Run (the datasets are written once per run to a temp dir: ~1 min, ~0.35 GB per format):

    PYTHONPATH=python pytest bench/bench_data.py --benchmark-enable -m slow \
        --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

JMP_BENCH_DATA_ENTRIES overrides the size for a quick look. Entries/s per benchmark are in
its extra_info (and in the --benchmark-json output); bench/README.md has the numbers.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from jmp_ext.data import DatasetWriter, LmdbDataset, collate

pytestmark = pytest.mark.slow

ENTRIES = int(os.environ.get("JMP_BENCH_DATA_ENTRIES", 100_000))
SHARD = 5000
BATCH = 32  # a JMP-S step's batch, roughly
READS = 1000


def oc20_like(rng: np.random.Generator, index: int) -> dict[str, np.ndarray]:
    """A random OC20-S2EF-sized structure (20-130 atoms, mean ~75), float32 like OC20."""
    n = int(rng.integers(20, 131))
    return {
        "pos": rng.normal(size=(n, 3)).astype(np.float32) * 5,
        "atomic_numbers": rng.integers(1, 84, n),
        "cell": np.diag([12.0, 12.0, 30.0]).astype(np.float32),
        "pbc": np.ones(3, bool),
        "tags": rng.integers(0, 3, n),
        "fixed": rng.random(n) < 0.4,
        "energy": np.float32(rng.normal()),
        "forces": rng.normal(size=(n, 3)).astype(np.float32),
        "sid": np.int64(index),
    }


class PickleLmdb(Dataset):
    """The OC20/JMP layout: shards data.NNNN.lmdb, key str(i), value pickle of the entry."""

    def __init__(self, path: Path, sizes: list[int]):
        self.files = sorted(path.glob("*.lmdb"))
        self.offsets = np.cumsum([0] + sizes)
        self.envs = None

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if self.envs is None:  # opened lazily, per worker, as fairchem does
            self.envs = [lmdb.open(str(f), subdir=False, readonly=True, lock=False,
                                   readahead=False, meminit=False) for f in self.files]
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        with self.envs[shard].begin() as txn:
            return pickle.loads(txn.get(str(index - self.offsets[shard]).encode()))

    def __getstate__(self):
        return {**self.__dict__, "envs": None}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    # 1000 distinct structures, repeated: generating and pickling 100k fresh ones would take
    # longer than the benchmark; reads still hit 100k distinct keys spread over 20 shards.
    templates = [oc20_like(rng, i) for i in range(1000)]
    pickled = [pickle.dumps({k: torch.from_numpy(np.asarray(v)) for k, v in t.items()},
                            protocol=-1) for t in templates]
    (root / "pickle").mkdir()
    sizes = []
    with DatasetWriter(root / "jmp", float_dtype=np.float32, shard_size=SHARD) as writer:
        for start in range(0, ENTRIES, SHARD):
            env = lmdb.open(str(root / "pickle" / f"data.{len(sizes):04d}.lmdb"), subdir=False,
                            map_size=1 << 32)
            with env.begin(write=True) as txn:
                for i in range(start, min(start + SHARD, ENTRIES)):
                    writer.add(templates[i % len(templates)])
                    txn.put(str(i - start).encode(), pickled[i % len(templates)])
            env.close()
            sizes.append(min(SHARD, ENTRIES - start))
    return {"jmp_ext": LmdbDataset(root / "jmp"), "pickle": PickleLmdb(root / "pickle", sizes)}


FORMATS = ["jmp_ext", "pickle"]


def _record(benchmark, entries):
    benchmark.extra_info["entries"] = entries
    benchmark.extra_info["entries_per_s"] = entries / benchmark.stats.stats.mean


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_reads(benchmark, datasets, fmt):
    benchmark.group = "read (random index, one process)"
    ds = datasets[fmt]
    indices = np.random.default_rng(1).integers(0, len(ds), READS).tolist()
    benchmark.pedantic(lambda: [ds[i] for i in indices], rounds=3, warmup_rounds=1)
    _record(benchmark, READS)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_loader(benchmark, datasets, fmt, workers):
    benchmark.group = f"read + collate, DataLoader batch {BATCH}, {workers} workers"
    ds = datasets[fmt]
    batches = 50 if workers == 0 else 100
    sampler = RandomSampler(ds, num_samples=batches * BATCH,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, collate_fn=collate,
                        num_workers=workers, persistent_workers=workers > 0)

    def run():
        return sum(int(b["natoms"].shape[0]) for b in loader)

    assert benchmark.pedantic(run, rounds=2, warmup_rounds=1) == batches * BATCH
    _record(benchmark, batches * BATCH)
