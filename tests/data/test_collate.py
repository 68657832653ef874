import numpy as np
import pytest
import torch
from data_helpers import random_entry

from jmp_ext.data import collate


def as_tensors(entry):
    return {k: torch.as_tensor(np.asarray(v)) for k, v in entry.items()}


def test_collate_matches_a_per_atom_loop():
    rng = np.random.default_rng(0)
    raw = [random_entry(rng, stress=True) for _ in range(5)]
    for i, entry in enumerate(raw):
        entry["dipole"] = rng.normal(size=3)
        entry["gap"] = np.float64(i)
    batch = collate([as_tensors(e) for e in raw], dtype=torch.float64)
    natoms = [len(e["pos"]) for e in raw]
    assert batch["natoms"].tolist() == natoms
    atom = 0
    for b, entry in enumerate(raw):
        for k in range(natoms[b]):  # every atom lands in its structure's slot, in order
            assert batch["batch"][atom] == b
            np.testing.assert_array_equal(batch["pos"][atom].numpy(), entry["pos"][k])
            np.testing.assert_array_equal(batch["forces"][atom].numpy(), entry["forces"][k])
            assert batch["atomic_numbers"][atom] == entry["atomic_numbers"][k]
            assert batch["tags"][atom] == entry["tags"][k]
            assert batch["fixed"][atom] == entry["fixed"][k]
            atom += 1
        np.testing.assert_array_equal(batch["cell"][b].numpy(), entry["cell"])
        np.testing.assert_array_equal(batch["stress"][b].numpy(), entry["stress"])
        np.testing.assert_array_equal(batch["dipole"][b].numpy(), entry["dipole"])
        assert batch["energy"][b] == entry["energy"] and batch["gap"][b] == entry["gap"]
        assert batch["pbc"][b].tolist() == entry["pbc"].tolist()
    assert atom == batch["pos"].shape[0]
    assert batch["energy"].shape == (5,) and batch["cell"].shape == (5, 3, 3)
    assert batch["dipole"].shape == (5, 3) and batch["pbc"].dtype == torch.bool


def test_dtype_and_common_keys():
    rng = np.random.default_rng(1)
    raw = [random_entry(rng, stress=(i != 1)) for i in range(3)]
    batch = collate([as_tensors(e) for e in raw])
    assert "stress" not in batch  # not present in every entry
    assert batch["pos"].dtype == torch.get_default_dtype()
    assert batch["atomic_numbers"].dtype == torch.int64 and batch["fixed"].dtype == torch.bool
    assert collate([as_tensors(raw[0])], dtype=torch.float64)["energy"].dtype == torch.float64


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        collate([])
    rng = np.random.default_rng(2)
    a, b = random_entry(rng), random_entry(rng)
    a["dipole"], b["dipole"] = np.zeros(3), np.zeros(2)
    with pytest.raises(ValueError, match="dipole"):
        collate([as_tensors(a), as_tensors(b)])
