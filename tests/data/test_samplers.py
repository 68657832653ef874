from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import random_entry

from jmp_ext.data import LmdbDataset, write_dataset
from jmp_ext.data.dataset import MultiDataset
from jmp_ext.data.samplers import AtomBalancedBatchSampler, TemperatureSampler

NATOMS = np.random.default_rng(0).integers(1, 60, size=257)


def test_batches_respect_caps_and_cover_every_entry_once():
    sampler = AtomBalancedBatchSampler(NATOMS, max_atoms=200, max_structures=9, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(NATOMS)))
    for k, batch in enumerate(batches):
        assert NATOMS[batch].sum() <= 200 and len(batch) <= 9
        if k + 1 < len(batches):  # greedy: the next structure did not fit
            nxt = batches[k + 1][0]
            assert NATOMS[batch].sum() + NATOMS[nxt] > 200 or len(batch) == 9


def test_oversized_structure_gets_its_own_batch():
    natoms = np.array([5, 500, 5, 5])
    batches = list(AtomBalancedBatchSampler(natoms, max_atoms=100, shuffle=False))
    assert batches == [[0], [1], [2, 3]]
    assert list(AtomBalancedBatchSampler(natoms, max_structures=3, shuffle=False)) == [[0, 1, 2], [3]]


def test_seeded_and_epoch_dependent():
    a = AtomBalancedBatchSampler(NATOMS, max_atoms=300, seed=5)
    b = AtomBalancedBatchSampler(NATOMS, max_atoms=300, seed=5)
    first = list(a)
    assert first == list(b)
    assert a.epoch == 1 and list(a) != first  # next epoch, new order
    b.set_epoch(1)
    assert list(b) == a.batches(1)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_ranks_partition_the_epoch(drop_last):
    world = 3
    ranks = [AtomBalancedBatchSampler(NATOMS, max_atoms=150, seed=2, rank=r, world_size=world,
                                      drop_last=drop_last) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1  # equal step counts: no rank waits forever
    single = AtomBalancedBatchSampler(NATOMS, max_atoms=150, seed=2).batches(0)
    dealt = [b for step in zip(*per_rank) for b in step]
    if drop_last:
        assert dealt == single[:len(single) - len(single) % world]
    else:
        assert dealt[:len(single)] == single and dealt[len(single):] == single[:len(dealt) - len(single)]


def test_resume_mid_epoch():
    sampler = AtomBalancedBatchSampler(NATOMS, max_atoms=200, seed=3)
    sampler.set_epoch(4)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state == {"epoch": 4, "position": 5, "seed": 3}
    rest = list(it)
    resumed = AtomBalancedBatchSampler(NATOMS, max_atoms=200, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # what a trainer's epoch loop does: must not reset the position
    assert list(resumed) == rest and head + rest == sampler.batches(4)
    with pytest.raises(ValueError, match="seed"):
        AtomBalancedBatchSampler(NATOMS, max_atoms=200, seed=4).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_atoms"):
        AtomBalancedBatchSampler(NATOMS)
    with pytest.raises(ValueError, match="non-empty"):
        AtomBalancedBatchSampler([], max_atoms=10)
    with pytest.raises(ValueError, match="rank"):
        AtomBalancedBatchSampler(NATOMS, max_atoms=10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureSampler([3, 4], temperature=0)
    with pytest.raises(ValueError, match="positive"):
        TemperatureSampler([3, 0])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_temperature_proportions(temperature):
    sizes = [1000, 100, 10]
    sampler = TemperatureSampler(sizes, temperature=temperature, seed=0)
    indices = np.array(list(sampler))
    which = np.searchsorted(np.cumsum(sizes), indices, side="right")
    counts = np.bincount(which, minlength=3)
    weights = np.array([s ** (1 / temperature) for s in sizes])
    # JMP's epoch: the largest dataset once, the others in proportion to it.
    expected = weights / weights[0] * sizes[0]
    assert counts[0] == sizes[0] and np.all(counts[1:] >= np.array(sizes[1:]))
    assert np.abs(counts - expected).max() <= 0.5 + 1e-9
    for d, (size, offset) in enumerate(zip(sizes, [0, 1000, 1100])):
        local = Counter((indices[which == d] - offset).tolist())
        # every entry is drawn floor or ceil(count/size) times: repeated evenly, never skewed
        assert max(local.values()) - min(local.values()) <= 1
        if counts[d] >= size:
            assert len(local) == size


def test_temperature_sampler_epochs_and_batching():
    sampler = TemperatureSampler([50, 20], temperature=2.0, num_samples=40, seed=1)
    assert len(sampler) == 40
    sampler.set_epoch(0)
    e0 = list(sampler)
    assert e0 == list(sampler) and len(e0) == 40
    sampler.set_epoch(1)
    assert list(sampler) != e0
    natoms = np.arange(1, 71)
    batches = AtomBalancedBatchSampler(natoms, max_atoms=100, sampler=sampler, seed=1)
    flat = [i for b in batches.batches(0) for i in b]
    assert flat == TemperatureSampler([50, 20], 2.0, 40, seed=1).indices(0).tolist()


def test_temperature_sampler_draws_the_order_of_one_permutation_per_repeat():
    """The epochs of runs already under way (resume=true) keep their order: a dataset's entries
    are a fresh permutation per repeat, from the epoch's generator, datasets in order, then the
    merged list is permuted. (Drawn with a loop, upsampling [1M, 1] took seconds an epoch.)"""
    sizes, temperature, num_samples = [700, 3, 1, 40], 1.5, 5000
    sampler = TemperatureSampler(sizes, temperature=temperature, num_samples=num_samples, seed=7)
    for epoch in (0, 5):
        rng = np.random.default_rng([7, epoch])
        parts = []
        for size, offset, count in zip(sizes, np.cumsum([0, *sizes[:-1]]), sampler.counts):
            local = np.concatenate([rng.permutation(size) for _ in range(-(-count // size))])[:count]
            parts.append(offset + local)
        merged = np.concatenate(parts)
        assert np.array_equal(sampler.indices(epoch), merged[rng.permutation(len(merged))])


def test_temperature_sampler_share_rounding_to_zero():
    sampler = TemperatureSampler([1000, 2], temperature=1.0, num_samples=100, seed=0)
    assert sampler.counts.tolist() == [100, 0]
    indices = sampler.indices(0)
    assert len(indices) == len(sampler) == 100 and indices.max() < 1000
    with pytest.raises(ValueError, match="num_samples=1 rounds to no samples .* at least 2"):
        TemperatureSampler([5, 5], temperature=1.0, num_samples=1)


def test_multi_dataset(tmp_path):
    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "a", [random_entry(rng) for _ in range(3)])
    write_dataset(tmp_path / "b", [random_entry(rng, periodic=False) for _ in range(4)])
    a, b = LmdbDataset(tmp_path / "a"), LmdbDataset(tmp_path / "b")
    multi = MultiDataset([a, b])
    assert len(multi) == 7 and multi.sizes.tolist() == [3, 4]
    np.testing.assert_array_equal(multi.natoms, np.concatenate([a.natoms, b.natoms]))
    entry = multi[4]
    assert entry["dataset"].item() == 1 and torch.equal(entry["pos"], b[1]["pos"])
    assert multi[2]["dataset"].item() == 0
