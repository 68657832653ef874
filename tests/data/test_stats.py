import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from data_helpers import random_entry

from jmp_ext.data import LmdbDataset, compute_stats, load_stats, write_dataset
from jmp_ext.data import stats as stats_module
from jmp_ext.data.split import split_dataset

REFS = {1: -3.5, 6: -150.25, 8: -430.0, 29: -1200.5, 78: -5.0}


def linear_entries(rng, count, noise=0.0):
    entries = []
    for _ in range(count):
        entry = random_entry(rng)
        entry["energy"] = np.float64(sum(REFS[z] for z in entry["atomic_numbers"])
                                     + noise * rng.normal())
        entry["gap"] = np.float64(rng.uniform(0, 5))
        # An extensive property other than energy (QM9's U_0, ZPVE, ...): its own references.
        entry["zpve"] = np.float64(sum(0.01 * z for z in entry["atomic_numbers"]) + noise * rng.normal())
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
    assert list(stats["elements"]) == sorted({int(z) for e in entries for z in e["atomic_numbers"]})
    assert stats["targets"]["energy"]["std"] < 1e-8  # nothing left after exact references
    # zpve = sum(0.01 Z): its references make the residual exact.
    zpve = stats["linrefs"]["zpve"]
    counts = [np.bincount(e["atomic_numbers"], minlength=119) for e in entries]
    np.testing.assert_allclose([c @ zpve["linref"] for c in counts], [float(e["zpve"]) for e in entries], rtol=1e-12)
    assert abs(zpve["mean"]) < 1e-10 and zpve["std"] < 1e-10
    assert stats["targets"]["zpve"]["std"] > 0.1  # the plain statistics stay as they were


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
    np.testing.assert_array_equal(first["linrefs"]["zpve"]["linref"], second["linrefs"]["zpve"]["linref"])
    assert second["linrefs"]["zpve"]["std"] == first["linrefs"]["zpve"]["std"]
    assert isinstance(second["linref"], np.ndarray) and second["linref"].dtype == np.float64
    np.testing.assert_array_equal(first["targets"]["dipole"]["std"],
                                  second["targets"]["dipole"]["std"])
    assert first["force_rms"] == second["force_rms"]
    assert first["targets"]["energy"]["mean"] == second["targets"]["energy"]["mean"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("natoms_hist"), r"KeyError: 'natoms_hist'"),
    (lambda s: s.pop("targets"), r"KeyError: 'targets'"),
    (lambda s: s.pop("avg_natoms"), r"ValueError: no 'avg_natoms'"),
    (lambda s: s.update(linref=s["linref"][:5]), r"linref must be 119 numbers, got \(5,\)"),
    (lambda s: s["targets"]["energy"].pop("std"), r"targets.energy must have a mean and a std"),
    (lambda s: s["linrefs"]["zpve"].update(mean="x"), r"could not convert string to float"),
    (lambda s: s.update(linrefs=None), r"AttributeError"),
    (lambda s: s.update(targets={"energy": 3.0}), r"AttributeError"),
    (lambda s: s.update(outliers={"energy": {"entry": "3"}}), r"outliers.energy must have an int entry and a "
                                                                r"numeric share and value"),
])
def test_a_damaged_stats_file_is_named(tmp_path, edit, message):
    """A hand-edited or damaged stats.json raised KeyError / torch's RuntimeError in training,
    and a NaN std was silently taken as 1."""
    from jmp_ext.data import DataError

    write_dataset(tmp_path / "ds", linear_entries(np.random.default_rng(2), 20, noise=0.1))
    load_stats(tmp_path / "ds")
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text().replace("NaN", "null"))
    edit(stats)
    (tmp_path / "ds" / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(DataError, match=rf"stats.json: .*{message}.*; recompute with `python -m jmp_ext.data stats "):
        load_stats(tmp_path / "ds")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (numpy's, on the way)
def test_statistics_that_are_not_finite_are_named_where_they_are_used(tmp_path):
    """Labels of ~1e300 (a placeholder for 'missing') overflow their std: training on them
    skipped every step; a NaN std edited into stats.json was taken as 1. An unused label may
    hold anything (split and stats must not fail on it)."""
    from jmp_ext.train.config import build_config
    from jmp_ext.train import TrainError
    from jmp_ext.train.tasks import normalizers

    entries = linear_entries(np.random.default_rng(3), 10)
    entries[4]["gap"] = np.float64(1e300)  # (its square, in the std, is inf)
    write_dataset(tmp_path / "ds", entries)
    stats = load_stats(tmp_path / "ds")

    def config(target):
        return build_config({"mode": "finetune", "tasks": [{"name": "t", "train": str(tmp_path / "ds"),
                                                             "targets": [target]}]})

    normalizers(config({"name": "energy", "kind": "energy"}).tasks, [stats])
    with pytest.raises(TrainError, match=r"tasks.0 \(t\): .*ds/stats.json gives a non-finite or negative gap_std "
                                         r"\(inf\): labels so large \(~1e300"):
        normalizers(config({"name": "gap", "kind": "scalar"}).tasks, [stats])
    stats["targets"]["energy"]["std"] = np.float64(np.nan)
    with pytest.raises(TrainError, match=r"non-finite or negative energy_std \(nan\)"):
        normalizers(config({"name": "energy", "kind": "energy"}).tasks, [stats])
    stats["targets"]["energy"]["std"] = np.float64(-2.0)
    with pytest.raises(TrainError, match=r"non-finite or negative energy_std \(-2.0\)"):
        normalizers(config({"name": "energy", "kind": "energy"}).tasks, [stats])


def test_cli_stats_and_info(tmp_path, capsys):
    from jmp_ext.data.__main__ import main

    write_dataset(tmp_path / "ds", linear_entries(np.random.default_rng(3), 12, noise=0.1),
                  units={"gap": "eV"},
                  info={"source": "gaps.xyz", "skipped": [f"frame {k}: one atom" for k in range(30)]})
    assert main(["stats", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "12 entries" in out and "energy after linear references" in out and "force RMS" in out
    # A float property's per-element fit (what a target with linref: true trains on) is shown too.
    fit = json.loads((tmp_path / "ds" / "stats.json").read_text())["linrefs"]["gap"]
    assert (f"gap after linear references (if trained with linref: true, a sum over atoms): mean {fit['mean']:.6g}, "
            f"std {fit['std']:.6g}") in out
    assert main(["info", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "12 entries in 1 shard(s)" in out
    assert any(line.split() == ["gap", "float64", "[]", "eV"] for line in out.splitlines())
    assert '  source: "gaps.xyz"' in out.splitlines()
    skipped = '  skipped: ["frame 0: one atom", "frame 1: one atom", "frame 2: one atom", "frame 3: one atom", '
    assert skipped + '"frame 4: o ...' in out.splitlines()
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert f"dataset {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    (tmp_path / "mols.extxyz").write_text("")
    assert main(["info", str(tmp_path / "mols.extxyz")]) == 2
    assert "is not a jmp_ext dataset (no meta.json). It is a file: `python -m jmp_ext.data convert`" in \
        capsys.readouterr().err
    # `info DIR | head -1`: a reader that stops early is no error ("error: [Errno 32] Broken pipe")
    import os
    import subprocess
    import sys

    import jmp_ext

    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # (block-buffered, as usual)
           "PYTHONPATH": str(Path(jmp_ext.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "jmp_ext.data", "info", str(tmp_path / "ds")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # (before it writes a byte)
    with child.stderr:
        assert child.wait(timeout=60) == 0 and child.stderr.read() == b""


# --- compute_stats streams: equal to the dense computation it replaced, in bounded memory ---

ELEMENTS = (1, 6, 7, 8, 13, 26, 29, 78)


def labelled_entries(rng, count, offset=0.0, noise=1.0, composition=None):
    """Structures with energy (linear in the element counts, plus `offset` eV per atom and
    noise), a scalar, an integer class, a vector and stress [3,3]."""
    refs = {z: rng.uniform(-500, -1) for z in ELEMENTS}
    entries = []
    for _ in range(count):
        if composition is None:
            entry = random_entry(rng, stress=True, elements=ELEMENTS)
        else:
            entry = random_entry(rng, natoms=len(composition), stress=True)
            entry["atomic_numbers"] = np.array(composition, dtype=np.int64)
        z = entry["atomic_numbers"]
        entry["energy"] = np.float64(sum(refs[a] + offset for a in z) + noise * rng.normal())
        entry["gap"] = np.float64(rng.uniform(0, 5))
        entry["charge_class"] = np.int64(rng.integers(0, 4))
        entry["dipole"] = rng.normal(size=3) * 2 + 100.0
        entries.append(entry)
    return entries


def dense_reference(dataset):
    """compute_stats as it was: dense [entries, 119] counts, np.linalg.lstsq, np.mean/np.std of
    every stacked label. Also returns the counts and energies."""
    labels = [name for name in dataset.schema if name not in stats_module._NOT_TARGETS]
    entries = [dataset.read(i) for i in range(len(dataset))]
    counts = np.stack([np.bincount(e["atomic_numbers"], minlength=119) for e in entries]
                      ).astype(np.float64)
    arrays = {name: np.stack([e[name].astype(np.float64) for e in entries]) for name in labels}
    energy = arrays["energy"]
    present = counts.any(axis=0)
    linref = np.zeros(119)
    linref[present] = np.linalg.lstsq(counts[:, present], energy, rcond=None)[0]
    arrays["energy"] = energy - counts @ linref
    linrefs = {}
    for name in labels:  # the other float scalars get references of their own
        if name != "energy" and arrays[name].ndim == 1 and dataset.schema[name]["dtype"].endswith("f8"):
            fit = np.zeros(119)
            fit[present] = np.linalg.lstsq(counts[:, present], arrays[name], rcond=None)[0]
            residual = arrays[name] - counts @ fit
            linrefs[name] = {"linref": fit, "mean": residual.mean(), "std": residual.std(), "residual": residual}
    forces = np.concatenate([e["forces"].astype(np.float64) for e in entries])
    ref = {"version": stats_module.STATS_VERSION, "num_entries": len(dataset),
           "targets": {name: {"mean": a.mean(axis=0), "std": a.std(axis=0)}
                       for name, a in arrays.items()},
           "linref": linref, "linrefs": linrefs, "force_rms": float(np.sqrt(np.square(forces).mean())),
           "natoms_hist": np.bincount(dataset.natoms), "avg_natoms": float(dataset.natoms.mean())}
    # One entry (atom, for forces) holding over half a float label's sum of squared deviations
    # (energy's and the float scalars' residuals after their references; forces' about 0).
    values = {name: linrefs[name]["residual"] if name in linrefs else a for name, a in arrays.items()
              if dataset.schema[name]["dtype"].endswith("f8") or dataset.schema[name]["dtype"].endswith("f4")}
    atom_entry = np.repeat(np.arange(len(entries)), [len(e["forces"]) for e in entries])
    candidates = {name: (v.reshape(len(v), -1), np.arange(len(v))) for name, v in values.items()}
    candidates["forces"] = (forces, atom_entry)
    ref["outliers"] = {}
    for name, (v, entry_of_row) in candidates.items():
        deviation = np.square(v - (0.0 if name == "forces" else v.mean(axis=0)))
        # (per component; forces: over all of them, as force_rms)
        share = deviation / (deviation.sum() if name == "forces" else deviation.sum(axis=0))
        row, column = np.unravel_index(np.argmax(share), share.shape)
        if len(v) * (v.shape[1] if name == "forces" else 1) >= 100 and share[row, column] > 0.5:
            value = abs(v[row, column]) if name == "forces" else v[row, column]
            ref["outliers"][name] = {"entry": int(entry_of_row[row]), "share": share[row, column], "value": value}
    return ref, counts, energy


def assert_stats_match(stats, ref, rtol):
    """Same keys (in order), types, shapes and values; the residual energy mean, which sits near
    zero, is compared relative to the residual spread."""
    assert list(stats) == ["version", "num_entries", "targets", "linref", "linrefs", "elements", "force_rms",
                           "natoms_hist", "avg_natoms", "outliers", "dataset_id"]
    assert list(stats["outliers"]) == list(ref["outliers"])
    for name, outlier in ref["outliers"].items():
        assert stats["outliers"][name]["entry"] == outlier["entry"], name
        assert stats["outliers"][name]["share"] == pytest.approx(outlier["share"], rel=1e-9), name
        assert stats["outliers"][name]["value"] == pytest.approx(outlier["value"], rel=1e-9), name
    assert list(stats["elements"]) == np.flatnonzero(ref["linref"] != 0).tolist()  # (every element has a reference)
    assert stats["version"] == ref["version"] and stats["num_entries"] == ref["num_entries"]
    assert list(stats["targets"]) == list(ref["targets"])
    for name, target in ref["targets"].items():
        for key in ("mean", "std"):
            got, want = stats["targets"][name][key], target[key]
            assert type(got) is type(want), (name, key, type(got), type(want))
            assert np.shape(got) == np.shape(want)
            if name == "energy" and key == "mean":
                assert abs(got - want) <= rtol * target["std"] + 1e-9
            else:
                np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=f"{name} {key}")
    assert stats["linref"].dtype == np.float64 and stats["linref"].shape == (119,)
    np.testing.assert_array_equal(stats["linref"] != 0, ref["linref"] != 0)
    np.testing.assert_allclose(stats["linref"], ref["linref"], rtol=rtol, atol=0)
    assert list(stats["linrefs"]) == list(ref["linrefs"]) == ["gap"]  # not the int class, not vectors
    for name, fit in ref["linrefs"].items():
        np.testing.assert_allclose(stats["linrefs"][name]["linref"], fit["linref"], rtol=rtol, atol=1e-12)
        assert abs(stats["linrefs"][name]["mean"] - fit["mean"]) <= rtol * fit["std"] + 1e-12
        assert stats["linrefs"][name]["std"] == pytest.approx(fit["std"], rel=rtol)
    assert stats["force_rms"] == pytest.approx(ref["force_rms"], rel=1e-12)
    assert stats["natoms_hist"].dtype == np.int64
    np.testing.assert_array_equal(stats["natoms_hist"], ref["natoms_hist"])
    assert stats["avg_natoms"] == ref["avg_natoms"]


@pytest.mark.parametrize("seed", [0, 1])
def test_compute_stats_equals_dense_reference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_dataset(tmp_path / "ds", labelled_entries(rng, 257, noise=0.5))
    dataset = LmdbDataset(tmp_path / "ds")
    ref, _, _ = dense_reference(dataset)
    stats = compute_stats(dataset)
    assert_stats_match(stats, ref, rtol=1e-10)
    assert np.count_nonzero(stats["linref"]) == len(ELEMENTS)
    assert stats["targets"]["stress"]["std"].shape == (3, 3)
    assert stats["targets"]["dipole"]["mean"].shape == (3,)
    # The cached file is the same as before: JSON round trip of the same structure.
    json.dumps(stats_module._to_json(stats))


def test_compute_stats_collinear_single_composition(tmp_path):
    """One composition (an MD trajectory): the counts are collinear; the references are the
    minimum-norm fit and the residual is exact on the data (mean 0, std the noise's)."""
    rng = np.random.default_rng(3)
    write_dataset(tmp_path / "ds", labelled_entries(rng, 150, offset=-1e4,
                                                    composition=[8, 1, 1, 6, 6]))
    dataset = LmdbDataset(tmp_path / "ds")
    ref, _, energy = dense_reference(dataset)
    stats = compute_stats(dataset)
    assert abs(stats["targets"]["energy"]["mean"]) < 1e-9
    assert stats["targets"]["energy"]["std"] == pytest.approx(energy.std(), rel=1e-9)
    assert stats["targets"]["energy"]["std"] == pytest.approx(ref["targets"]["energy"]["std"],
                                                              rel=1e-9)
    np.testing.assert_array_equal(np.flatnonzero(stats["linref"]), [1, 6, 8])
    np.testing.assert_allclose(stats["linref"], ref["linref"], rtol=1e-12)  # minimum norm
    # E_ref of the composition is the mean energy.
    assert stats["linref"] @ np.bincount([8, 1, 1, 6, 6], minlength=119) == pytest.approx(
        energy.mean(), rel=1e-14)


def test_compute_stats_residual_std_survives_large_energy_offsets(tmp_path):
    """DFT total energies (~-1e5 eV per atom) with ~1 eV residuals: the residual spread must not
    come from differences of huge sums of squares."""
    rng = np.random.default_rng(4)
    write_dataset(tmp_path / "ds", labelled_entries(rng, 300, offset=-1e5, noise=1.0))
    dataset = LmdbDataset(tmp_path / "ds")
    ref, counts, energy = dense_reference(dataset)
    stats = compute_stats(dataset)
    std = stats["targets"]["energy"]["std"]
    assert std == pytest.approx(ref["targets"]["energy"]["std"], rel=1e-6)
    assert abs(stats["targets"]["energy"]["mean"] - ref["targets"]["energy"]["mean"]) < 1e-6
    assert 0.7 < std < 1.3
    # This data set defeats the naive formula sum(y^2) - 2 w.b + w.G.w: its error is above the
    # tolerance checked above.
    linref = ref["linref"]
    gram, rhs = counts.T @ counts, counts.T @ energy
    mean = ref["targets"]["energy"]["mean"]
    naive_var = ((energy @ energy - 2 * linref @ rhs + linref @ gram @ linref) / len(energy)
                 - mean**2)
    naive_std = np.sqrt(naive_var) if naive_var > 0 else 0.0
    assert abs(naive_std / ref["targets"]["energy"]["std"] - 1) > 1e-5


def test_compute_stats_independent_of_chunk_size(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    write_dataset(tmp_path / "ds", labelled_entries(rng, 101, offset=-1e3))
    dataset = LmdbDataset(tmp_path / "ds")
    results = []
    for chunk in (1, 7, 4096):
        monkeypatch.setattr(stats_module, "_CHUNK_SIZE", chunk)
        results.append(compute_stats(dataset))
    for other in results[1:]:
        assert_stats_match(other, results[0], rtol=1e-10)
    assert_stats_match(results[-1], dense_reference(dataset)[0], rtol=1e-10)


def test_residual_stats_of_given_references_equal_dense_fit(tmp_path, monkeypatch):
    """Given (isolated-atom-like) references leave a residual tens of eV per atom from zero,
    on ~-1e5 eV per-atom totals: its shift per atom and spread equal numpy's dense float64 fit,
    chunk by chunk as in one piece; an element without a reference is named."""
    rng = np.random.default_rng(6)
    write_dataset(tmp_path / "ds", labelled_entries(rng, 203, offset=-1e5, noise=1.0))
    dataset = LmdbDataset(tmp_path / "ds")
    references = np.full(119, np.nan)
    references[list(ELEMENTS)] = rng.uniform(-1e5, -1e5 + 100, len(ELEMENTS))
    entries = [dataset.read(i) for i in range(len(dataset))]
    natoms = np.array([len(e["atomic_numbers"]) for e in entries], dtype=np.float64)
    residual = np.array([float(e["energy"]) - references[e["atomic_numbers"]].sum() for e in entries])
    ((shift,),), *_ = np.linalg.lstsq(natoms[:, None], residual[:, None], rcond=None)
    shifted = residual - shift * natoms
    for chunk in (1, 7, 4096):
        monkeypatch.setattr(stats_module, "_CHUNK_SIZE", chunk)
        fit = stats_module.residual_stats(dataset, "energy", references)
        assert fit["shift"] == pytest.approx(shift, rel=1e-12)
        assert fit["std"] == pytest.approx(shifted.std(), rel=1e-8)
        assert abs(fit["mean"] - shifted.mean()) < 1e-6 * shifted.std()
    references[78] = np.nan
    with pytest.raises(stats_module.fmt.DataError, match=r"ds: entry \d+ holds Pt, which the references of "
                                                         r"'energy' do not give"):
        stats_module.residual_stats(dataset, "energy", references)


def test_compute_stats_memory_does_not_grow_with_entries(tmp_path, monkeypatch):
    """Peak memory of compute_stats on 16x more entries grows by far less than the dense
    [entries, 119] counts matrix alone would (3.8 MB for 4000 entries)."""
    monkeypatch.setattr(stats_module, "_CHUNK_SIZE", 64)
    rng = np.random.default_rng(6)
    peaks = []
    for count in (250, 4000):
        write_dataset(tmp_path / f"ds{count}", labelled_entries(rng, count))
        dataset = LmdbDataset(tmp_path / f"ds{count}")
        compute_stats(dataset)  # warm up caches and LMDB handles
        tracemalloc.start()
        try:
            compute_stats(dataset)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] - peaks[0] < 1.5e6, peaks


@pytest.mark.parametrize("name, entry, value", [("energy", 37, 1e30), ("gap", 5, -2e4), ("dipole", 80, 1e6),
                                               ("forces", 100, 1e4), ("charge_class", 3, 9)])
def test_one_entry_that_sets_a_labels_spread_is_named(tmp_path, name, entry, value):
    """A finite but absurd label (a unit or data error: 1e30 eV passed every check, and the
    training it normalised had validation errors of 1e26) holds nearly all its label's spread:
    the statistics name it, as numpy's dense computation does, and every load of them warns. A
    rare class of an integer label is no outlier."""
    entries = labelled_entries(np.random.default_rng(7), 150)
    if name == "forces":
        entries[entry]["forces"][0, 2] = value
    elif name == "dipole":
        entries[entry]["dipole"][1] = value
    else:
        entries[entry][name] = np.asarray(value, dtype=entries[entry][name].dtype)
    write_dataset(tmp_path / "ds", entries)
    dataset = LmdbDataset(tmp_path / "ds")
    stats = compute_stats(dataset)
    assert_stats_match(stats, dense_reference(dataset)[0], rtol=1e-9)
    if name == "charge_class":
        assert stats["outliers"] == {}
        return
    assert list(stats["outliers"]) == [name] and stats["outliers"][name]["entry"] == entry
    assert stats["outliers"][name]["share"] > 0.9
    stats_module.save_stats(tmp_path / "ds", stats)
    with pytest.warns(UserWarning, match=rf"ds: entry {entry}'s '{name}' \(.*\) holds \d+% of the spread of '{name}' "
                                         r"over the training split: its std, which normalises every entry's target, "
                                         r"is mostly this one entry's \(a unit or data error\?\)"):
        load_stats(tmp_path / "ds")
    if name == "energy":  # (split's statistics, computed in a staging directory, name the part where it is)
        with pytest.warns(UserWarning, match=r"parts/train: entry \d+'s 'energy'"):
            split_dataset(tmp_path / "ds", tmp_path / "parts", {"train": np.arange(140), "val": np.arange(140, 150)})
    # Fewer values than _OUTLIER_MIN_COUNT: a single one may dominate legitimately (forces count
    # every atom's components).
    write_dataset(tmp_path / "few", entries[entry - 5:entry + 5])
    few = compute_stats(LmdbDataset(tmp_path / "few"))["outliers"]
    assert few == {} if name != "forces" else list(few) == ["forces"] and few["forces"]["entry"] == 5


@pytest.mark.parametrize("name", ["energy", "gap", "dipole", "forces"])
def test_a_non_finite_label_is_named_not_averaged(tmp_path, name):
    """The writer refuses NaN labels; a dataset written elsewhere may hold one, and it would make
    every statistic NaN (and with them the normalised loss)."""
    entries = linear_entries(np.random.default_rng(3), 12)
    for entry in entries:
        entry["forces"] = np.random.default_rng(0).normal(size=(len(entry["atomic_numbers"]), 3))
    write_dataset(tmp_path / "ds", entries)
    dataset = LmdbDataset(tmp_path / "ds")
    read = dataset.read

    def read_with_a_nan(i):
        entry = read(i)
        if i == 7:
            entry[name] = entry[name] * np.nan
        return entry

    dataset.read = read_with_a_nan
    with pytest.raises(ValueError, match=f"entry 7 has a non-finite '{name}'"):
        compute_stats(dataset)


def test_stats_of_a_read_only_dataset_are_computed_with_a_warning(tmp_path, monkeypatch, capsys):
    """A shared dataset the user may not write to: training still starts."""
    write_dataset(tmp_path / "ds", linear_entries(np.random.default_rng(4), 10))

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(stats_module, "write_bytes_atomic", read_only)
    with pytest.warns(UserWarning, match="could not cache the statistics of .*Read-only file system"):
        stats = load_stats(tmp_path / "ds")
    assert stats["num_entries"] == 10 and not (tmp_path / "ds" / "stats.json").exists()
    # The stats command does not name a stats.json it could not write.
    from jmp_ext.data.__main__ import main

    with pytest.warns(UserWarning, match="could not cache"):
        assert main(["stats", str(tmp_path / "ds")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'ds'} (not cached): 10 entries")


def test_statistics_of_an_earlier_dataset_in_the_directory_are_recomputed(tmp_path):
    """A dataset rewritten in place (convert --overwrite) while its statistics were being
    computed got the old data's stats.json, and every later load used them: the mean, std and
    references of other data (a unit fixed by the rewrite was still in them)."""
    rng = np.random.default_rng(5)
    write_dataset(tmp_path / "ds", linear_entries(rng, 30))
    old = load_stats(tmp_path / "ds")
    write_dataset(tmp_path / "new", [{**e, "energy": e["energy"] * 27.2} for e in linear_entries(rng, 40)])
    (tmp_path / "new" / "stats.json").unlink(missing_ok=True)
    stats_module.save_stats(tmp_path / "new", old)  # (the old dataset's, saved into the new one)
    with pytest.warns(UserWarning, match=r"new/stats.json holds the statistics of an earlier dataset written to "
                                         r".*new, not of the one there now: computing them again"):
        stats = load_stats(tmp_path / "new")
    assert stats["num_entries"] == 40 and stats["dataset_id"] == LmdbDataset(tmp_path / "new").id
    assert load_stats(tmp_path / "new")["num_entries"] == 40  # (and cached)
    # A split's parts hold the training part's statistics, which are not theirs to recompute.
    split_dataset(tmp_path / "new", tmp_path / "parts", {"train": np.arange(30), "val": np.arange(30, 40)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        val = load_stats(tmp_path / "parts" / "val")
    train = load_stats(tmp_path / "parts" / "train")
    assert val["num_entries"] == 30 and "dataset_id" not in val and train["dataset_id"] != stats["dataset_id"]
    np.testing.assert_array_equal(val["linref"], train["linref"])


def test_statistics_cached_before_outliers_were_checked_are_recomputed_once(tmp_path):
    """A stats.json written before the check for outlying labels had no "outliers": its
    dataset's absurd label was never warned of, by `stats` or by training on it."""
    entries = labelled_entries(np.random.default_rng(7), 150)
    entries[37]["energy"] = np.asarray(1e30, dtype=entries[37]["energy"].dtype)
    write_dataset(tmp_path / "ds", entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_stats(tmp_path / "ds")
        split_dataset(tmp_path / "ds", tmp_path / "parts", {"train": np.arange(140), "val": np.arange(140, 150)})
    for directory in ("ds", "parts/train", "parts/val"):
        file = tmp_path / directory / "stats.json"
        older = {key: value for key, value in json.loads(file.read_text()).items()
                 if key not in ("outliers", "dataset_id")}
        file.write_text(json.dumps(older))
    for directory in ("ds", "parts/train"):
        with pytest.warns(UserWarning) as caught:
            stats = load_stats(tmp_path / directory)
        assert len(caught) == 2
        assert str(caught[0].message) == (f"{tmp_path / directory / 'stats.json'} predates the check for outlying "
                                          "labels: computing the statistics again")
        assert str(caught[1].message).startswith(f"{tmp_path / directory}: entry 37's 'energy' (9.")
        assert list(stats["outliers"]) == ["energy"]
        assert "outliers" in json.loads((tmp_path / directory / "stats.json").read_text())
        with pytest.warns(UserWarning, match=r"entry 37's 'energy'") as caught:  # (cached: not computed again)
            load_stats(tmp_path / directory)
        assert len(caught) == 1
    # A split's val part holds its train part's statistics: not its own to recompute.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        assert "outliers" not in load_stats(tmp_path / "parts" / "val")
