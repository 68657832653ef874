import json

import numpy as np
import pytest
from data_helpers import random_entry

from jmp_ext.data import LmdbDataset, compute_stats, load_stats, write_dataset

REFS = {1: -3.5, 6: -150.25, 8: -430.0, 29: -1200.5, 78: -5.0}


def linear_entries(rng, count, noise=0.0):
    entries = []
    for _ in range(count):
        entry = random_entry(rng)
        entry["energy"] = np.float64(sum(REFS[z] for z in entry["atomic_numbers"])
                                     + noise * rng.normal())
        entry["gap"] = np.float64(rng.uniform(0, 5))
        entry["dipole"] = rng.normal(size=3)
        entries.append(entry)
    return entries


def test_linear_references_recover_element_energies(tmp_path):
    entries = linear_entries(np.random.default_rng(0), 60)
    write_dataset(tmp_path / "ds", entries)
    stats = compute_stats(LmdbDataset(tmp_path / "ds"))
    linref = stats["linref"]
    assert linref.shape == (119,)
    for z, ref in REFS.items():
        assert linref[z] == pytest.approx(ref, abs=1e-8)
    assert np.count_nonzero(linref) == len(REFS)
    assert stats["targets"]["energy"]["std"] < 1e-8  # nothing left after exact references


def test_moments_force_rms_and_histogram(tmp_path):
    entries = linear_entries(np.random.default_rng(1), 40, noise=0.3)
    write_dataset(tmp_path / "ds", entries)
    stats = compute_stats(LmdbDataset(tmp_path / "ds"))
    gaps = np.array([e["gap"] for e in entries])
    assert stats["targets"]["gap"]["mean"] == pytest.approx(gaps.mean(), rel=1e-12)
    assert stats["targets"]["gap"]["std"] == pytest.approx(gaps.std(), rel=1e-12)
    dipoles = np.stack([e["dipole"] for e in entries])
    np.testing.assert_allclose(stats["targets"]["dipole"]["mean"], dipoles.mean(0), rtol=1e-12)
    forces = np.concatenate([e["forces"] for e in entries])
    assert stats["force_rms"] == pytest.approx(np.sqrt((forces**2).mean()), rel=1e-12)
    natoms = [len(e["pos"]) for e in entries]
    np.testing.assert_array_equal(stats["natoms_hist"], np.bincount(natoms))
    assert stats["avg_natoms"] == pytest.approx(np.mean(natoms))
    # Residual energies: noise only, so their spread is near the noise level, not the totals'.
    assert 0.15 < stats["targets"]["energy"]["std"] < 0.45


def test_load_stats_caches(tmp_path):
    write_dataset(tmp_path / "ds", linear_entries(np.random.default_rng(2), 20, noise=0.1))
    assert not (tmp_path / "ds" / "stats.json").exists()
    first = load_stats(tmp_path / "ds")
    cached = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert cached["num_entries"] == 20
    second = load_stats(tmp_path / "ds")  # from the file
    np.testing.assert_array_equal(first["linref"], second["linref"])
    assert isinstance(second["linref"], np.ndarray) and second["linref"].dtype == np.float64
    np.testing.assert_array_equal(first["targets"]["dipole"]["std"],
                                  second["targets"]["dipole"]["std"])
    assert first["force_rms"] == second["force_rms"]
    assert first["targets"]["energy"]["mean"] == second["targets"]["energy"]["mean"]


def test_cli_stats_and_info(tmp_path, capsys):
    from jmp_ext.data.__main__ import main

    write_dataset(tmp_path / "ds", linear_entries(np.random.default_rng(3), 12, noise=0.1),
                  units={"gap": "eV"})
    assert main(["stats", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "12 entries" in out and "energy after linear references" in out and "force RMS" in out
    assert (tmp_path / "ds" / "stats.json").is_file()
    assert main(["info", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "12 entries in 1 shard(s)" in out
    assert any(line.split() == ["gap", "float64", "[]", "eV"] for line in out.splitlines())
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert "not a jmp_ext dataset" in capsys.readouterr().err
