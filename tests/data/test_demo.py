import re

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from data_helpers import random_entry

from jmp_ext.data import LmdbDataset, load_stats, make_demo, write_dataset
from jmp_ext.data.demo import DOMAINS, GENERATORS, SPLITS

SCALE = 0.03  # 10-12 entries per domain: seconds, not minutes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=3, scale=SCALE)


def load(root, domain):
    return {split: LmdbDataset(root / domain / split) for split in SPLITS}


def all_entries(root, domain):
    return [ds[i] for ds in load(root, domain).values() for i in range(len(ds))]


def test_layout_and_stats(demo):
    for domain in DOMAINS:
        splits = load(demo, domain)
        assert all(len(ds) > 0 for ds in splits.values())
        train_stats = load_stats(demo / domain / "train")
        assert np.isfinite(train_stats["linref"]).all() and train_stats["force_rms"] > 0
        for split in ("val", "test"):  # val/test are normalised with the train statistics
            assert load_stats(demo / domain / split)["num_entries"] == len(splits["train"])


@pytest.mark.parametrize("domain", DOMAINS)
def test_labels_are_emt(demo, domain):
    """Every stored label is what EMT gives for the stored structure."""
    for entry in all_entries(demo, domain)[::3]:
        atoms = Atoms(numbers=entry["atomic_numbers"].numpy(), positions=entry["pos"].numpy(),
                      cell=entry["cell"].numpy(), pbc=entry["pbc"].numpy())
        atoms.calc = EMT()
        assert entry["energy"].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(entry["forces"].numpy(), atoms.get_forces(), atol=1e-9)
        if domain == "materials":
            np.testing.assert_allclose(entry["stress"].numpy(), atoms.get_stress(voigt=False),
                                       atol=1e-9)
            assert entry["energy_per_atom"] * len(atoms) == pytest.approx(entry["energy"].item())


def test_domain_conventions(demo):
    for entry in all_entries(demo, "catalysis"):
        tags, fixed = entry["tags"], entry["fixed"]
        assert entry["pbc"].all() and 20 <= len(tags) <= 40
        assert set(tags.tolist()) == {0, 1, 2}
        assert not fixed[tags == 2].any() and not fixed[tags == 1].any()
        assert fixed[tags == 0].sum() == 18  # the bottom two 3x3 layers
        assert entry["atomic_numbers"][tags == 2].max() <= 8  # H, C, N, O adsorbates
    for entry in all_entries(demo, "molecules"):
        assert not entry["pbc"].any() and (entry["cell"] == 0).all()
        assert (entry["tags"] == 2).all() and len(entry["tags"]) < 15
        assert entry["atomic_numbers"].max() <= 8
    for entry in all_entries(demo, "materials"):
        assert entry["pbc"].all() and 4 <= len(entry["tags"]) <= 32
        assert torch.linalg.det(entry["cell"]) > 0
    compositions = {tuple(e["atomic_numbers"].tolist()) for e in all_entries(demo, "md")}
    assert len(compositions) == 1  # one molecule's trajectory


def test_catalysis_trajectories_stay_in_one_split(demo):
    sids = {split: {int(ds[i]["sid"]) for i in range(len(ds))}
            for split, ds in load(demo, "catalysis").items()}
    assert not sids["train"] & sids["val"] and not sids["train"] & sids["test"]
    assert not sids["val"] & sids["test"]


def test_idempotent(demo):
    def stamps():
        return {path: path.stat().st_mtime_ns for path in demo.rglob("*") if path.is_file()}

    before = stamps()
    make_demo(demo, seed=3, scale=SCALE)
    assert stamps() == before  # nothing made or written again


@pytest.mark.slow
def test_deterministic(demo, tmp_path):
    """Same seed -> bit-identical data; another seed -> different data."""
    again = make_demo(tmp_path / "again", seed=3, scale=SCALE)
    other = make_demo(tmp_path / "other", seed=4, scale=SCALE)
    for domain in DOMAINS:
        a, b, c = (all_entries(root, domain) for root in (demo, again, other))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for key in x:
                assert torch.equal(x[key], y[key]), (domain, key)
        assert not torch.equal(a[0]["pos"], c[0]["pos"]) or len(a) != len(c)


@pytest.mark.parametrize("domain", ["molecules", "materials", "md"])
def test_generators_deterministic(domain):
    first, second = (GENERATORS[domain](np.random.default_rng(7), 4) for _ in range(2))
    for x, y in zip(first, second, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_interrupted_regeneration_is_redone(demo, tmp_path, monkeypatch):
    """A run for another seed that dies midway must not leave the old marker vouching for it."""
    import shutil

    import jmp_ext.data.demo as demo_module

    root = tmp_path / "copy"
    shutil.copytree(demo, root)

    def boom(rng, size):
        raise RuntimeError("killed")

    monkeypatch.setitem(demo_module.GENERATORS, "materials", boom)
    with pytest.raises(RuntimeError, match="killed"):
        make_demo(root, seed=99, scale=SCALE)  # catalysis and molecules already replaced
    assert not (root / "demo.json").exists()


def test_data_it_did_not_make_are_not_replaced(tmp_path):
    """make-demo DIR once replaced the user's DIR/md/train. (Its own data it does replace:
    test_interrupted_regeneration_is_redone.)"""
    mine = tmp_path / "mine"
    write_dataset(mine / "md" / "train", [random_entry(np.random.default_rng(0))])
    message = f"make_demo would replace {mine / 'md' / 'train'}, which it did not make"
    with pytest.raises(FileExistsError, match=re.escape(message)):
        make_demo(mine, seed=3, scale=SCALE)
    assert len(LmdbDataset(mine / "md" / "train")) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["md"]  # refused before writing anything


@pytest.mark.parametrize("scale", ["inf", "-5", "nan", "0"])
def test_scale_must_be_finite_and_positive(tmp_path, capsys, scale):
    """inf was an OverflowError traceback, nan left an empty directory, -5 was accepted."""
    from jmp_ext.data.__main__ import main

    assert main(["make-demo", str(tmp_path / "demo"), "--scale", scale]) == 2
    assert capsys.readouterr().err == (
        f"error: make_demo: scale must be a finite positive number, got {float(scale)}\n")
    assert not (tmp_path / "demo").exists()
