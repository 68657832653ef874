"""Converters: inputs are made here with ASE and with stand-ins for torch_geometric's Data."""

import json
import pickle
import re
import shutil
import sys
import types
import warnings

import ase.db
import ase.io
import lmdb
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixCartesian
from ase.stress import voigt_6_to_full_3x3_stress

from jmp_ext.data import DataError, LmdbDataset
from jmp_ext.data.__main__ import main
from jmp_ext.data.convert import KeyMap, _extxyz_structures, convert, unpickle_data


def make_atoms(rng, n=None, periodic=True):
    n = n or int(rng.integers(2, 9))
    atoms = Atoms(numbers=rng.choice([1, 6, 8, 29], n), positions=rng.normal(size=(n, 3)) * 2,
                  cell=np.diag(rng.uniform(6, 9, 3)) if periodic else None, pbc=periodic)
    atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal() * 5),
                                       forces=rng.normal(size=(n, 3)),
                                       stress=rng.normal(size=6) * 0.01)
    return atoms


@pytest.fixture
def frames():
    rng = np.random.default_rng(0)
    frames = [make_atoms(rng) for _ in range(6)]
    frames[2].set_tags(np.arange(len(frames[2])) % 3)
    frames[2].set_constraint(FixAtoms(indices=[0]))
    return frames


def check_against(ds: LmdbDataset, frames, energy_factor=1.0, length_factor=1.0):
    assert len(ds) == len(frames)
    for i, atoms in enumerate(frames):
        entry = ds[i]
        np.testing.assert_allclose(entry["pos"], atoms.positions * length_factor, rtol=1e-12)
        np.testing.assert_array_equal(entry["atomic_numbers"], atoms.numbers)
        np.testing.assert_allclose(entry["cell"], atoms.cell.array * length_factor, rtol=1e-12)
        assert entry["pbc"].tolist() == atoms.pbc.tolist()
        assert entry["energy"].item() == pytest.approx(atoms.get_potential_energy() * energy_factor,
                                                       rel=1e-12)
        np.testing.assert_allclose(entry["forces"], atoms.get_forces(apply_constraint=False)
                                   * energy_factor / length_factor, rtol=1e-12)
        np.testing.assert_allclose(entry["stress"], atoms.get_stress(voigt=False)
                                   * energy_factor / length_factor**3, rtol=1e-12)
        assert entry["sid"].item() == i


def test_extxyz(tmp_path, frames):
    ase.io.write(tmp_path / "in.extxyz", frames)
    report = convert(tmp_path / "in.extxyz", tmp_path / "out")
    assert report.written == 6 and not report.skipped
    assert report.labels["energy"] == "calculator['energy']"
    ds = LmdbDataset(tmp_path / "out")
    check_against(ds, ase.io.read(tmp_path / "in.extxyz", ":"))
    assert ds[2]["tags"].tolist() == [0, 1, 2] * (len(frames[2]) // 3) + [0, 1][:len(frames[2]) % 3]
    assert ds[2]["fixed"].tolist() == [True] + [False] * (len(frames[2]) - 1)
    assert (ds[0]["tags"] == 2).all()  # no tags in the file: molecule/bulk convention


def test_only_the_command_line_shows_a_progress_bar(tmp_path, frames, capsys):
    """convert() drew a progress bar on stderr wherever it was called (a notebook, a test, a
    user's script), unlike write_dataset, split_dataset and compute_stats, which draw one when
    asked (progress=True), as the command lines do."""
    ase.io.write(tmp_path / "in.extxyz", frames)
    db = ase.db.connect(tmp_path / "in.db")
    for atoms in frames:
        db.write(atoms)
    capsys.readouterr()
    for source in ("in.extxyz", "in.db"):
        convert(tmp_path / source, tmp_path / source.replace(".", "_"))
        assert capsys.readouterr().err == ""
        convert(tmp_path / source, tmp_path / source.replace(".", "_"), overwrite=True, progress=True)
        assert f"{tmp_path / source}: " in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "cli")]) == 0
    assert "6structure" in capsys.readouterr().err.replace(" ", "")


def test_a_warning_during_the_progress_bar_starts_its_own_line(tmp_path, frames):
    """A warning raised while convert's bar was drawn continued the bar's line ("...structure/s]
    warning: ..."), so filtering a log for progress lines removed the warning too."""
    import subprocess

    frames[3].set_tags(np.full(len(frames[3]), 5))  # (tags outside OC20's: warned of mid-file)
    ase.io.write(tmp_path / "in.extxyz", frames)
    # (a process of its own: under pytest, warnings are recorded rather than printed)
    err = subprocess.run([sys.executable, "-m", "jmp_ext.data", "convert", str(tmp_path / "in.extxyz"),
                          str(tmp_path / "out")], capture_output=True, text=True, check=True).stderr
    assert "6structure" in err.replace(" ", "") and "warning: tags [5]" in err
    assert not re.findall(r"[^\r\n]warning:", err)


def test_mace_style_keys_and_units(tmp_path, frames):
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces(apply_constraint=False)
        atoms.info["free_energy"] = atoms.get_potential_energy() - 1.0
        atoms.calc = None
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    convert(tmp_path / "in.xyz", tmp_path / "out", keys=KeyMap(energy_unit="Hartree",
                                                               length_unit="Bohr"))
    ds = LmdbDataset(tmp_path / "out")
    assert "stress" not in ds.schema
    for i, atoms in enumerate(ase.io.read(tmp_path / "in.xyz", ":")):  # as written (rounded)
        assert ds[i]["energy"].item() == pytest.approx(atoms.info["REF_energy"] * units.Hartree)
        np.testing.assert_allclose(ds[i]["forces"], atoms.arrays["REF_forces"]
                                   * units.Hartree / units.Bohr, rtol=1e-12)
        np.testing.assert_allclose(ds[i]["pos"], atoms.positions * units.Bohr, rtol=1e-12)
    convert(tmp_path / "in.xyz", tmp_path / "free", keys=KeyMap(energy="free_energy"))
    assert LmdbDataset(tmp_path / "free")[0]["energy"].item() == pytest.approx(
        frames[0].info["free_energy"])


def test_explicit_key_must_be_found(tmp_path, frames):
    """A misspelled --energy-key once wrote a dataset without energies, silently."""
    for atoms in frames:
        atoms.info["free_energy"] = atoms.get_potential_energy() - 1.0
    del frames[3].info["free_energy"]
    ase.io.write(tmp_path / "in.extxyz", frames)
    with pytest.raises(DataError, match=r"structure 0: energy: key 'free_enrgy' not found"):
        convert(tmp_path / "in.extxyz", tmp_path / "out", keys=KeyMap(energy="free_enrgy"))
    with pytest.raises(DataError, match=r"structure 0: stress: key 'virial' not found"):
        convert(tmp_path / "in.extxyz", tmp_path / "out", keys=KeyMap(stress="virial"))
    report = convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True,
                     keys=KeyMap(energy="free_energy"))
    assert report.written == 5 and report.labels["energy"] == "calculator['free_energy']"
    assert len(report.skipped) == 1
    assert "structure 3: energy: key 'free_energy' not found" in report.skipped[0]


def test_a_missing_key_lists_the_keys_there_are(tmp_path, frames, capsys):
    """`--energy-key REF_E` said only "not found": the message lists each source's keys, so the
    right one (here REF_energy) is read off it."""
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
    ase.io.write(tmp_path / "in.extxyz", frames)
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "out"), "--energy-key", "REF_E"]) == 2
    err = capsys.readouterr().err
    assert "structure 0: energy: key 'REF_E' not found (available: info: REF_energy; arrays: numbers, positions; " \
           "calculator: " in err
    assert all(key in err.split("calculator: ")[1] for key in ("energy", "forces", "stress"))
    # On a line of its own: the progress bar has closed (it was left open, the message after it).
    assert any(line.startswith("error: ") for line in err.splitlines())
    with pytest.raises(DataError, match=r"property 'gap': key 'gap' not found \(available: info: REF_energy; "):
        convert(tmp_path / "in.extxyz", tmp_path / "out", keys=KeyMap(properties={"gap": "gap"}))


def test_a_gap_written_0_for_metals_converts(tmp_path, frames):
    """extxyz reads gap=0 as an integer and gap=1.2 as a float: a file whose first structure
    was a metal stopped at the first float ("field gap is <f8 [], the first entry's is <i8
    []"), and --skip-invalid kept the metals alone (std 0)."""
    gaps = [0, 1.2, 0, 2.5]
    for atoms, gap in zip(frames, gaps):
        atoms.info["gap"] = gap
    ase.io.write(tmp_path / "in.extxyz", frames[:4])
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "out"), "--property", "gap"]) == 0
    ds = LmdbDataset(tmp_path / "out")
    assert [ds[i]["gap"].item() for i in range(len(ds))] == [float(g) for g in gaps]


def test_a_full_disk_is_not_an_invalid_entry(tmp_path, frames, monkeypatch):
    """convert --skip-invalid skipped every entry the writer could not write for a full disk,
    as if invalid, and went on; then it blamed the entry ("structure 2: ... No space left")."""
    from jmp_ext.data import DatasetWriter

    ase.io.write(tmp_path / "in.extxyz", frames)
    add = DatasetWriter.add

    def disk_full_at_the_third(self, entry, where=None):
        if len(self) == 2:
            raise OSError(28, "No space left on device")
        return add(self, entry, where)

    monkeypatch.setattr(DatasetWriter, "add", disk_full_at_the_third)
    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device$"):
        convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.extxyz"]


def test_label_sources_do_not_mix(tmp_path):
    """Frame 0 has REF_energy, frame 1 only energy: both were stored as 'energy'."""
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]) for _ in range(3)]
    frames[0].info["REF_energy"] = -10.0
    frames[1].calc = SinglePointCalculator(frames[1], energy=-99.0)
    frames[2].info["REF_energy"] = -11.0
    frames[2].calc = SinglePointCalculator(frames[2], energy=-98.0)
    ase.io.write(tmp_path / "mix.xyz", frames, format="extxyz")
    with pytest.raises(DataError, match=r"structure 1: energy is in calculator\['energy'\], but "
                                        r"earlier entries took it from info\['REF_energy'\]"):
        convert(tmp_path / "mix.xyz", tmp_path / "out")
    report = convert(tmp_path / "mix.xyz", tmp_path / "out", skip_invalid=True)
    assert report.written == 2 and report.labels == {"energy": "info['REF_energy']"}
    assert [e["energy"].item() for e in LmdbDataset(tmp_path / "out")] == [-10.0, -11.0]
    report = convert(tmp_path / "mix.xyz", tmp_path / "calc", skip_invalid=True,
                     keys=KeyMap(energy="energy"))
    assert report.labels == {"energy": "calculator['energy']"} and len(report.skipped) == 1


def test_a_label_on_some_frames_only_can_be_dropped(tmp_path, frames, capsys):
    """Stress on some frames of an extxyz only: the error names --stress-key none, which drops it."""
    for atoms in frames[3:]:
        del atoms.calc.results["stress"]
    ase.io.write(tmp_path / "in.extxyz", frames)
    args = ["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(
        "structure 3: lacks stress, unlike the first entry written (every entry must carry the "
        "same labels): skip such entries with --skip-invalid, or drop stress with --stress-key "
        "none (from Python: KeyMap(stress='none'))")
    assert main([*args, "--stress-key", "none"]) == 0
    assert "stress" not in LmdbDataset(tmp_path / "out").schema
    ase.io.write(tmp_path / "rev.extxyz", frames[::-1])
    with pytest.raises(DataError, match=r"structure 3: has stress, which the entries written "
                                        r"before it lack \(3, from .*rev.extxyz structure 0\)"):
        convert(tmp_path / "rev.extxyz", tmp_path / "rev")
    report = convert(tmp_path / "in.extxyz", tmp_path / "some", skip_invalid=True)
    assert report.written == 3 and "stress" in LmdbDataset(tmp_path / "some").schema


def test_nine_number_stress(tmp_path, frames):
    """MACE writes REF_stress as 9 numbers, which extxyz reads back with shape (9,)."""
    for atoms in frames:
        atoms.info["REF_stress"] = atoms.get_stress(voigt=False).reshape(9)
        atoms.calc = None
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    assert ase.io.read(tmp_path / "in.xyz", 0).info["REF_stress"].shape == (9,)
    report = convert(tmp_path / "in.xyz", tmp_path / "out", keys=KeyMap(energy="none", forces="none"))
    assert report.labels == {"stress": "info['REF_stress']"}
    ds = LmdbDataset(tmp_path / "out")
    for i, atoms in enumerate(ase.io.read(tmp_path / "in.xyz", ":")):
        np.testing.assert_allclose(ds[i]["stress"], atoms.info["REF_stress"].reshape(3, 3))


def test_fixed_cartesian_atoms(tmp_path, frames):
    """extxyz stores constraints as move_mask, which reads back as FixCartesian: an atom with
    all three axes fixed is a fixed atom."""
    frames[1].set_constraint([FixCartesian([0, 1]), FixCartesian(2, mask=(True, False, True)),
                              FixCartesian(2, mask=(False, True, False))])  # together: all axes
    frames[3].set_constraint(FixCartesian(0, mask=(True, True, False)))
    ase.io.write(tmp_path / "in.xyz", frames, format="extxyz")
    assert any(isinstance(c, FixCartesian) for c in ase.io.read(tmp_path / "in.xyz", 1).constraints)
    convert(tmp_path / "in.xyz", tmp_path / "out")
    ds = LmdbDataset(tmp_path / "out")
    assert ds[1]["fixed"].tolist() == [True, True, True] + [False] * (len(frames[1]) - 3)
    assert not ds[3]["fixed"].any()


def test_a_fixed_column_marks_fixed_atoms(tmp_path, frames):
    """A per-atom 'fixed' array (fairchem's OC20 exports, instead of move_mask) was ignored: every
    atom read as free, and the force metrics then averaged the sub-surface in."""
    frames[1].arrays["fixed"] = np.arange(len(frames[1])) < 2  # written as a logical column
    frames[3].arrays["fixed"] = (np.arange(len(frames[3])) == 1).astype(int)  # as an integer one
    ase.io.write(tmp_path / "in.extxyz", frames)
    convert(tmp_path / "in.extxyz", tmp_path / "out")
    ds = LmdbDataset(tmp_path / "out")
    assert ds[1]["fixed"].tolist() == [True, True] + [False] * (len(frames[1]) - 2)
    assert ds[3]["fixed"].tolist() == [i == 1 for i in range(len(frames[3]))]
    assert ds[2]["fixed"].tolist() == [True] + [False] * (len(frames[2]) - 1)  # (its FixAtoms, as before)
    frames[3].arrays["fixed"][0] = 7
    ase.io.write(tmp_path / "bad.extxyz", frames)
    with pytest.raises(DataError, match=r"bad\.extxyz structure 3: its per-atom 'fixed' array \(shape \[\d\], values "
                                        r"\[1, 7\]\) is not one 0/1 or True/False per atom"):
        convert(tmp_path / "bad.extxyz", tmp_path / "bad")


def write_frame_log(path, frames: range, skip=()):
    """An OC20 S2EF frame log: random<sid>,frame<fid>,<reference energy> per frame (two per sid)."""
    lines = [f"random{500 + k // 2},frame{k % 2},{-2.5 * k - 0.125}\n" for k in frames if k not in skip]
    path.write_text("".join(lines))


def test_oc20_s2ef_extxyz_directories_with_their_frame_logs(tmp_path, frames):
    """OC20's S2EF comes as a directory of N.extxyz (or .extxyz.xz) with N.txt beside each, a line
    per frame: random<sid>,frame<fid>,<reference energy>. convert took one file at a time, and its
    sid was the frame index (the logs were not read), its energies total ones without a word."""
    import lzma

    folder = tmp_path / "s2ef"
    folder.mkdir()
    ase.io.write(folder / "10.extxyz", frames[3:])  # (natural order: 2 before 10)
    write_frame_log(folder / "10.txt", range(3, 6))
    with lzma.open(folder / "2.extxyz.xz", "wt") as f:  # (as downloaded, log and all)
        ase.io.write(f, frames[:3], format="extxyz")
    with lzma.open(folder / "2.txt.xz", "wt") as f:
        f.write("".join(f"random{500 + k // 2},frame{k % 2},{-2.5 * k - 0.125}\n" for k in range(3)))
    total = [atoms.get_potential_energy() for atoms in frames]
    with pytest.warns(UserWarning, match=r"the energies are the extxyz files' total DFT energies; OC20's S2EF .* "
                                         r"convert with --subtract-reference"):
        convert(folder, tmp_path / "total")
    ds = LmdbDataset(tmp_path / "total")
    assert [(int(e["sid"]), int(e["fid"])) for e in ds] == [(500 + k // 2, k % 2) for k in range(6)]
    assert [float(e["energy"]) for e in ds] == pytest.approx(total, rel=1e-12)
    assert ds.info["oc20_frame_logs"] == {"files": 2, "reference_energy": "kept"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (referenced: nothing to warn of)
        convert(folder, tmp_path / "referenced", subtract_reference=True)
    referenced = [float(e["energy"]) for e in LmdbDataset(tmp_path / "referenced")]
    assert referenced == pytest.approx([e + 2.5 * k + 0.125 for k, e in enumerate(total)], rel=1e-12)
    assert main(["convert", str(folder), str(tmp_path / "cli"), "--subtract-reference"]) == 0
    # (Windows line ends, a byte order mark and a blank line at the end, as an editor leaves them)
    (folder / "10.txt").write_text("\ufeff" + (folder / "10.txt").read_text().replace("\n", "\r\n") + "\r\n",
                                   encoding="utf-8")
    convert(folder, tmp_path / "crlf", subtract_reference=True)
    assert [float(e["energy"]) for e in LmdbDataset(tmp_path / "crlf")] == referenced
    # A log that does not match its file is an error naming both, not a sid off by a frame.
    write_frame_log(folder / "10.txt", range(3, 6), skip=(5,))
    with pytest.raises(DataError, match=r"10\.txt lists 2 frames, fewer than .*10\.extxyz holds"):
        convert(folder, tmp_path / "short")
    write_frame_log(folder / "10.txt", range(3, 7))
    with pytest.raises(DataError, match=r"10\.txt lists 4 frames, .*10\.extxyz holds 3"):
        convert(folder, tmp_path / "long", skip_invalid=True)
    (folder / "10.txt").write_text("random501,frame1,-1.0\nrandom5O2,frame0,-1.0\n")
    with pytest.raises(DataError, match=r"10\.txt: line 2 reads 'random5O2,frame0,-1\.0', not random<sid>,frame<fid>"):
        convert(folder, tmp_path / "bad")
    (folder / "10.txt").write_text("random501,frame1,\nrandom502,frame0\nrandom502,frame1\n")  # (a test split's)
    with pytest.raises(DataError, match=r"10\.txt has no reference energies"):
        convert(folder, tmp_path / "test", subtract_reference=True)
    # A .txt of another kind (notes, or a header line) is no log: said, and left out, which here
    # leaves 10.extxyz without one beside a file with one.
    (folder / "10.txt").write_text("system,frame,reference energy\n" + (folder / "10.txt").read_text())
    with pytest.warns(UserWarning, match=r"10\.txt beside 10\.extxyz is no OC20 frame log \(its first line reads "
                                         r"'system,frame,reference energy'\): left out"), \
            pytest.raises(DataError, match=r"2\.extxyz\.xz has an OC20 frame log and 10\.extxyz none"):
        convert(folder, tmp_path / "header")
    (folder / "10.txt").write_text("random501,frame1,-1.0\nrandom502,frame0,-1.0,\nrandom502,frame1\n")
    with pytest.raises(DataError, match=r"10\.txt: line 2 reads 'random502,frame0,-1\.0,', not random<sid>,frame<fid>"):
        convert(folder, tmp_path / "comma")
    (folder / "2.txt.xz").write_bytes((folder / "2.txt.xz").read_bytes()[:-20])  # (a download cut short)
    with pytest.raises(DataError, match=r"2\.txt\.xz: the frame log cannot be read \(EOFError"):
        convert(folder, tmp_path / "cut")
    with lzma.open(folder / "2.txt.xz", "wt") as f:
        f.write("".join(f"random{500 + k // 2},frame{k % 2},{-2.5 * k - 0.125}\n" for k in range(3)))
    # Some files with a log and some without: the others' frames got sid -1 (or the logs were
    # ignored, their ids said to be read).
    (folder / "10.txt").unlink()
    with pytest.raises(DataError, match=r"s2ef: 2\.extxyz\.xz has an OC20 frame log and 10\.extxyz none \(10\.txt, "
                                        r"10\.txt\.xz\): its frames would get no sid and fid"):
        convert(folder, tmp_path / "some")
    (folder / "2.txt.xz").unlink()
    with pytest.raises(DataError, match=r"2\.extxyz\.xz: no OC20 frame log beside it \(2\.txt, 2\.txt\.xz\)"):
        convert(folder, tmp_path / "nolog", subtract_reference=True)
    # Without logs: the sid counts the frames on from the earlier files'.
    convert(folder, tmp_path / "plain")
    ds = LmdbDataset(tmp_path / "plain")
    assert [int(e["sid"]) for e in ds] == list(range(6)) and "fid" not in ds.schema
    assert ds.info["index_offsets"] == {"2.extxyz.xz": 0, "10.extxyz": 3}
    # A file half decompressed: both are there, and its structures were read twice.
    ase.io.write(folder / "2.extxyz", frames[:3])
    with pytest.raises(DataError, match=r"s2ef holds 2\.extxyz twice \(2\.extxyz, 2\.extxyz\.xz\)"):
        convert(folder, tmp_path / "twice")
    (folder / "2.extxyz").unlink()
    # As untarred: the files one level down.
    shutil.copytree(folder, tmp_path / "untarred" / "s2ef")
    with pytest.raises(FileNotFoundError, match=r"no .lmdb, .aselmdb, extxyz or xyz files .*; it holds them in "
                                                r"subdirectories, such as .*untarred/s2ef: convert each"):
        convert(tmp_path / "untarred", tmp_path / "nested", allow_pickle=True)
    (folder / "0.lmdb").write_bytes(b"")
    with pytest.raises(DataError, match=r"s2ef holds .lmdb \(OC20/JMP's\) and extxyz or xyz files: put each kind"):
        convert(folder, tmp_path / "mixed")


def test_the_sources_sid_and_fid_are_kept(tmp_path, frames):
    """The stored sid was the frame index (the row id of an ASE db) even where the source gave
    OC20's sid and fid, which results are keyed by (sid_fid): predictions could not be mapped
    back to systems."""
    for i, atoms in enumerate(frames):
        atoms.info.update(sid=1000 + i // 2, fid=i % 2)
    del frames[4].info["fid"]
    frames[5].info["sid"] = "random123"  # (not an integer: -1, as a missing one, and said)
    ase.io.write(tmp_path / "in.extxyz", frames)
    with pytest.warns(UserWarning, match=r"out: the source's sid 'random123' is no integer, and jmp_ext stores "
                                         r"integer identifiers: an entry whose sid is no integer has sid -1"):
        convert(tmp_path / "in.extxyz", tmp_path / "out")
    ids = [(int(e["sid"]), int(e["fid"])) for e in LmdbDataset(tmp_path / "out")]
    assert ids == [(1000, 0), (1000, 1), (1001, 0), (1001, 1), (1002, -1), (-1, 1)]
    # The first entry written decides, for every entry: one skipped first (an isolated atom, as
    # MACE's E0 frames) decides nothing, and a first without ids numbers every sid by frame, so
    # that a sid never means a system in one entry and a frame in another.
    lone = Atoms("H", positions=[[0, 0, 0]])
    lone.calc = SinglePointCalculator(lone, energy=-13.6, forces=np.zeros((1, 3)), stress=np.zeros(6))
    ase.io.write(tmp_path / "e0.extxyz", [lone, *frames])
    with pytest.warns(UserWarning, match="sid 'random123' is no integer"):
        convert(tmp_path / "e0.extxyz", tmp_path / "e0", skip_invalid=True)
    assert [(int(e["sid"]), int(e["fid"])) for e in LmdbDataset(tmp_path / "e0")] == ids
    plain = frames[0].copy()
    plain.calc = frames[0].calc
    plain.info.clear()
    ase.io.write(tmp_path / "mixed.extxyz", [plain, *frames])
    with pytest.warns(UserWarning, match="sid 'random123' is no integer.*: the sids are frame indices or row ids"):
        convert(tmp_path / "mixed.extxyz", tmp_path / "mixed")
    ds = LmdbDataset(tmp_path / "mixed")
    assert [int(e["sid"]) for e in ds] == list(range(7)) and "fid" not in ds.schema
    with ase.db.connect(tmp_path / "in.db") as db:
        for i, atoms in enumerate(frames[:3]):
            db.write(atoms, sid=5000 + i, fid=i % 2)  # (key-value pairs: a db keeps no info)
    convert(tmp_path / "in.db", tmp_path / "db")
    assert [(int(e["sid"]), int(e["fid"])) for e in LmdbDataset(tmp_path / "db")] == [(5000, 0), (5001, 1), (5002, 0)]
    # Without them: the frame index, and no fid.
    for atoms in frames:
        atoms.info.clear()
    ase.io.write(tmp_path / "plain.extxyz", frames)
    convert(tmp_path / "plain.extxyz", tmp_path / "plain")
    ds = LmdbDataset(tmp_path / "plain")
    assert [int(e["sid"]) for e in ds] == list(range(6)) and "fid" not in ds.schema


def test_forces_with_the_constraint_applied_are_warned_of(tmp_path, frames):
    """Forces written as atoms.get_forces() returns them under FixAtoms (zero on every fixed
    atom) converted without a word: JMP's loss trains on every atom, so the model learnt zero
    forces on the sub-surface, which the free-atom metrics never show."""
    for atoms in frames:
        atoms.set_constraint(FixAtoms(indices=[0]))
    ase.io.write(tmp_path / "raw.extxyz", frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(tmp_path / "raw.extxyz", tmp_path / "raw")
    for atoms in frames:
        atoms.calc.results["forces"] = atoms.get_forces()  # (the constraint zeroes atom 0's)
    ase.io.write(tmp_path / "zeroed.extxyz", frames)
    with pytest.warns(UserWarning, match=r"zeroed: in 6 of the 6 structures with fixed atoms, every fixed atom's "
                                         r"force is exactly zero: forces with the constraint applied"):
        convert(tmp_path / "zeroed.extxyz", tmp_path / "zeroed")
    assert not LmdbDataset(tmp_path / "zeroed")[0]["forces"][0].any()  # (converted as they are)


def test_ase_db_with_property(tmp_path, frames):
    with ase.db.connect(tmp_path / "in.db") as db:
        for i, atoms in enumerate(frames):
            db.write(atoms, gap=float(i) / 2, data={"dipole": np.arange(3.0) + i})
    report = convert(tmp_path / "in.db", tmp_path / "out",
                     keys=KeyMap(properties={"gap": "gap", "dipole": "dipole"}))
    assert report.written == 6
    ds = LmdbDataset(tmp_path / "out")
    for i in range(6):
        assert ds[i]["gap"].item() == i / 2
        np.testing.assert_array_equal(ds[i]["dipole"], np.arange(3.0) + i)
        assert ds[i]["sid"].item() == i + 1  # the row id
    check = ase.db.connect(tmp_path / "in.db")
    with pytest.raises(DataError, match=r"row id=1: property 'homo': key 'homo' not found"):
        convert(tmp_path / "in.db", tmp_path / "bad", keys=KeyMap(properties={"homo": "homo"}))
    assert not (tmp_path / "bad").exists() and check.count() == 6
    assert convert(tmp_path / "in.db", tmp_path / "some", select="id<3").written == 2
    with pytest.raises(DataError, match=r"select 'natoms>>3': ase.db cannot read this query"):
        convert(tmp_path / "in.db", tmp_path / "bad", select="natoms>>3")


def write_aselmdb(path, frames, start=0):
    """fairchem's ASE LMDB (OMat24, OMol25), written by its own backend; rows carry `k`."""
    from ase_db_backends.aselmdb import LMDBDatabase

    db = LMDBDatabase(path)
    for k, atoms in enumerate(frames, start):
        db.write(atoms, k=k, data={"dipole": np.arange(3.0) + k})
    db.close()
    for lock in path.parent.glob("*-lock"):  # (as a downloaded dataset: no lock files)
        lock.unlink()


def test_fairchem_aselmdb_files_and_directories(tmp_path, frames, capsys):
    """OMat24 / OMol25 come as directories of .aselmdb files, which ase.db reads through
    fairchem's ase-db-backends: convert takes a file or a directory of them (in name order),
    read-only (no lock file beside a shared dataset), with --select as for an ASE db."""
    pytest.importorskip("ase_db_backends", reason="ase-db-backends is in the test extra")
    (tmp_path / "omat").mkdir()
    write_aselmdb(tmp_path / "omat" / "data.0001.aselmdb", frames[3:], start=3)
    write_aselmdb(tmp_path / "omat" / "data.0000.aselmdb", frames[:3])
    (tmp_path / "omat").chmod(0o555)  # (a lock file or a write would fail)
    try:
        report = convert(tmp_path / "omat", tmp_path / "out", keys=KeyMap(properties={"dipole": "dipole"}))
        assert report.written == 6 and report.labels["stress"] == "calculator['stress']"
        ds = LmdbDataset(tmp_path / "out")
        # Each file numbers its rows from 1: sids are shifted by the earlier files' rows, so that
        # no two structures share one (split --group-by sid, predictions mapped back).
        assert [int(e["sid"]) for e in ds] == [1, 2, 3, 4, 5, 6]
        assert ds.info["index_offsets"] == {"data.0000.aselmdb": 0, "data.0001.aselmdb": 3}
        convert(tmp_path / "omat", tmp_path / "selected", select="k!=2")  # (the same sids under a query)
        assert [int(e["sid"]) for e in LmdbDataset(tmp_path / "selected")] == [1, 2, 4, 5, 6]
        for k, atoms in enumerate(frames):
            entry = ds[k]
            np.testing.assert_array_equal(entry["pos"], atoms.positions)
            np.testing.assert_array_equal(entry["atomic_numbers"], atoms.numbers)
            assert entry["energy"].item() == atoms.get_potential_energy()
            np.testing.assert_array_equal(entry["forces"], atoms.get_forces(apply_constraint=False))
            np.testing.assert_allclose(entry["stress"], atoms.get_stress(voigt=False), rtol=1e-15)
            np.testing.assert_array_equal(entry["dipole"], np.arange(3.0) + k)
        assert main(["convert", str(tmp_path / "omat" / "data.0001.aselmdb"), str(tmp_path / "some"),
                     "--select", "k>3"]) == 0
        assert LmdbDataset(tmp_path / "some")[0]["energy"].item() == frames[4].get_potential_energy()
        assert sorted(p.name for p in (tmp_path / "omat").iterdir()) == ["data.0000.aselmdb", "data.0001.aselmdb"]
    finally:
        (tmp_path / "omat").chmod(0o755)
    # A truncated file (an interrupted download) is named, not a SIGBUS.
    data = (tmp_path / "omat" / "data.0000.aselmdb").read_bytes()
    (tmp_path / "omat" / "data.0000.aselmdb").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"data.0000.aselmdb is truncated"):
        convert(tmp_path / "omat", tmp_path / "bad")
    capsys.readouterr()


def test_aselmdb_without_its_backend_says_what_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "omat").mkdir()
    (tmp_path / "omat" / "data.0000.aselmdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ase_db_backends", None)  # (as when it is not installed)
    monkeypatch.setitem(sys.modules, "ase_db_backends.aselmdb", None)
    assert main(["convert", str(tmp_path / "omat"), str(tmp_path / "out")]) == 2
    assert ("data.0000.aselmdb: reading fairchem's ASE LMDB (.aselmdb) needs the ase-db-backends package: pip "
            "install ase-db-backends (import of ase_db_backends.aselmdb halted") in capsys.readouterr().err


def test_directories_of_lmdb_files_that_convert_cannot_take_whole(tmp_path):
    """A directory with both kinds converted the .aselmdb rows and left the .lmdb out; one whose
    files sit in subdirectories (OMat24's train/<subset>/) was said to have no .lmdb files."""
    (tmp_path / "mixed").mkdir()
    for name in ("a.aselmdb", "oc20.lmdb"):
        (tmp_path / "mixed" / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"mixed holds .aselmdb \(fairchem's ASE LMDBs\) and .lmdb \(OC20/JMP's\) files: put "):
        convert(tmp_path / "mixed", tmp_path / "out")
    (tmp_path / "omat" / "rattled-1000").mkdir(parents=True)
    (tmp_path / "omat" / "rattled-1000" / "data.0000.aselmdb").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"omat: no .lmdb, .aselmdb, extxyz or xyz files .*; it holds them in "
                                                r"subdirectories, such as .*omat/rattled-1000: convert each"):
        convert(tmp_path / "omat", tmp_path / "out", allow_pickle=True)
    with pytest.raises(FileNotFoundError, match=r"omat: a directory without .aselmdb files .*; it holds them in "
                                                r"subdirectories, such as .*omat/rattled-1000: convert each"):
        convert(tmp_path / "omat", tmp_path / "out", source_format="ase-db")
    assert not (tmp_path / "out").exists()


def test_bad_ase_inputs(tmp_path, frames):
    frames[3].calc.results["energy"] = float("nan")
    frames[4].numbers[0] = 0  # "X": not an element
    ase.io.write(tmp_path / "in.extxyz", frames)
    with pytest.raises(DataError, match=r"in.extxyz structure 3: label energy contains NaN"):
        convert(tmp_path / "in.extxyz", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    report = convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True)
    assert report.written == 4 and len(report.skipped) == 2
    assert "structure 4: unknown element with atomic number 0" in report.skipped[1]
    assert LmdbDataset(tmp_path / "out")[3]["sid"].item() == 5


def test_truncated_extxyz(tmp_path, frames):
    ase.io.write(tmp_path / "in.extxyz", frames)
    text = (tmp_path / "in.extxyz").read_text().splitlines()
    (tmp_path / "in.extxyz").write_text("\n".join(text[:-2]) + "\n")
    start = sum(len(a) + 2 for a in frames[:5]) + 1
    with pytest.raises(DataError, match=rf"in.extxyz structure 5: cut short: the file ends inside it \(it starts at "
                                        rf"line {start}, with an atom count of {len(frames[5])}\)"):
        convert(tmp_path / "in.extxyz", tmp_path / "out")
    assert convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True).written == 5
    # A wrong atom count far beyond the file's end: named at once, not read line by line to it.
    (tmp_path / "count.extxyz").write_text("1000000000000\n\nH 0 0 0\n")
    with pytest.raises(DataError, match=r"count.extxyz structure 0: cut short: .* atom count of 1000000000000\)"):
        convert(tmp_path / "count.extxyz", tmp_path / "out2")


def test_an_extxyz_is_read_whole_or_refused(tmp_path, frames):
    """ase.io's extxyz reader ends a file at a blank line between structures (`cat a; echo; cat
    b`), and reads nothing of one whose atom count is off: both were left out without a word
    (3 of 6 structures written), or blamed on structure 0."""
    ase.io.write(tmp_path / "half.extxyz", frames[:3])
    text = (tmp_path / "half.extxyz").read_text()
    (tmp_path / "joined.extxyz").write_text(text + "\n" + text)
    blank = text.count("\n") + 1
    with pytest.raises(DataError, match=rf"joined.extxyz: line {blank} is blank where a structure's first line .* "
                                        rf"reader ends the file there and would leave out the rest \(from line "
                                        rf"{blank + 1}\); remove the blank line"):
        convert(tmp_path / "joined.extxyz", tmp_path / "out", skip_invalid=True)
    (tmp_path / "joined.extxyz").write_text(text + text + "\n\n")  # (blank lines at the end are fine)
    assert convert(tmp_path / "joined.extxyz", tmp_path / "out").written == 6
    lines = text.splitlines()
    second = len(frames[0]) + 2  # (structure 1's atom count line, 0-based)
    lines[second] = str(len(frames[1]) - 1)
    (tmp_path / "count.extxyz").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"count.extxyz: line {second + len(frames[1]) + 2}, where structure 2 should "
                                        r"start with its atom count, reads '.*': structure 1's atom count does not "
                                        r"match its atom lines"):
        convert(tmp_path / "count.extxyz", tmp_path / "out2")
    (tmp_path / "notes.xyz").write_text("hello\n" + text)
    with pytest.raises(DataError, match=r"notes.xyz: line 1, where structure 0 should start with its atom count, "
                                        r"reads 'hello': the file does not start with an atom count"):
        convert(tmp_path / "notes.xyz", tmp_path / "out3")
    # A negative count: ase's scan falls out of step (it reads no atom line and stops at the
    # next blank one, leaving the frames after it out).
    (tmp_path / "negative.extxyz").write_text(text + "-1\n1\n\nH 0 0 0\n" + text)
    with pytest.raises(DataError, match=rf"negative.extxyz: line {blank}, where structure 3 should start with its "
                                        r"atom count, reads '-1'"):
        convert(tmp_path / "negative.extxyz", tmp_path / "out4", skip_invalid=True)
    # More than three VEC lines: ase reads nothing of the file (it blamed structure 0).
    lines = text.splitlines()
    lines.insert(len(frames[0]) + 2, "VEC1 1.0 0.0 0.0\nVEC2 0.0 1.0 0.0\nVEC3 0.0 0.0 1.0\nVEC4 1.0 1.0 1.0")
    (tmp_path / "vec.extxyz").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"vec.extxyz: line \d+: structure 0 has more than three VEC lines"):
        convert(tmp_path / "vec.extxyz", tmp_path / "out5", skip_invalid=True)
    # Each line read once: a seek back in a .gz decompresses it again from its start (ase.io's
    # extxyz reader seeks to every structure: 62 s for a 2 MB .gz of 2000 frames).
    import gzip

    from ase.io import formats

    (tmp_path / "joined.extxyz.gz").write_bytes(gzip.compress((text + text).encode()))
    opened = formats.open_with_compression

    class NoSeek:
        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            if name == "seek":
                raise AssertionError("seek in a compressed file")
            return getattr(self.file, name)

        def __iter__(self):
            return iter(self.file)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    with pytest.MonkeyPatch.context() as m:
        m.setattr(formats, "open_with_compression", lambda *args, **kwargs: NoSeek(opened(*args, **kwargs)))
        assert sum(1 for _ in _extxyz_structures(tmp_path / "joined.extxyz.gz")) == 6
        assert convert(tmp_path / "joined.extxyz.gz", tmp_path / "gz").written == 6


def test_a_structure_ase_cannot_parse_is_skipped_alone(tmp_path, frames, monkeypatch):
    """ase.io's reader stops at a parse error: --skip-invalid skipped the bad structure and lost
    every one after it, reported as one skipped entry. Then it read the file again from its
    start after each such structure (~2 s per GB): each structure is now parsed on its own."""
    ase.io.write(tmp_path / "in.extxyz", frames)
    lines = (tmp_path / "in.extxyz").read_text().splitlines()
    atom_line = sum(len(a) + 2 for a in frames[:2]) + 2  # (structure 2's first atom)
    lines[atom_line] = lines[atom_line].replace(".", ",", 1)
    (tmp_path / "in.extxyz").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"in.extxyz structure 2: cannot parse \(line {atom_line - 1} on; ValueError"):
        convert(tmp_path / "in.extxyz", tmp_path / "out")
    report = convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True)
    assert report.written == 5 and len(report.skipped) == 1 and "structure 2: cannot parse" in report.skipped[0]
    assert [int(e["sid"]) for e in LmdbDataset(tmp_path / "out")] == [0, 1, 3, 4, 5]
    # Twelve bad structures of fourteen: each skipped alone, the file opened three times (ase's
    # format detection, its check, its structures), however many are bad.
    many = [frames[0]] * 14
    ase.io.write(tmp_path / "bad.extxyz", many)
    lines = (tmp_path / "bad.extxyz").read_text().splitlines()
    for k in range(1, 13):
        lines[k * (len(frames[0]) + 2) + 2] = lines[k * (len(frames[0]) + 2) + 2].replace(".", ",", 1)
    (tmp_path / "bad.extxyz").write_text("\n".join(lines) + "\n")
    from ase.io import formats

    opened, opens = formats.open_with_compression, []
    monkeypatch.setattr(formats, "open_with_compression", lambda *a, **k: opens.append(a[0]) or opened(*a, **k))
    report = convert(tmp_path / "bad.extxyz", tmp_path / "out3", skip_invalid=True)
    assert report.written == 2 and len(report.skipped) == 12 and "structure 12: cannot parse" in report.skipped[-1]
    assert opens == [str(tmp_path / "bad.extxyz")] * 3


def test_a_reader_that_stops_at_a_parse_error_is_not_tried_to_the_end(tmp_path, frames):
    """Other formats go through ase.io's own readers, which end at a parse error; reading goes
    on after the structure, but a file unreadable from some structure on is not tried structure
    by structure to its end (XDATCAR's reader parses every structure before the first)."""
    cell = [[6.0, 0, 0], [0, 6.0, 0], [0, 0, 6.0]]
    structures = [Atoms("H2O", positions=[[1, 1, 1], [1.5, 1.5, 1], [2, 1, 1.5]], cell=cell, pbc=True)] * 14
    ase.io.write(tmp_path / "XDATCAR", structures, format="vasp-xdatcar")
    lines = (tmp_path / "XDATCAR").read_text().splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("Direct configuration")][2] + 1
    lines[first] = lines[first].replace(".", ",", 1)
    (tmp_path / "XDATCAR").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"XDATCAR: ase.io could not parse structures 0 to 10 in a row \(the last: "
                                        r"ValueError"):
        convert(tmp_path / "XDATCAR", tmp_path / "out", skip_invalid=True)


def test_files_ase_cannot_read_are_one_line_errors(tmp_path, capsys):
    """A .json that is no ASE database and a damaged SQLite file were tracebacks."""
    (tmp_path / "mptrj.json").write_text(json.dumps({"mp-1": {"structure": {}}}))
    ase.db.connect(tmp_path / "ok.db").write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), energy_label=1.0)
    (tmp_path / "cut.db").write_bytes((tmp_path / "ok.db").read_bytes()[:3000])
    (tmp_path / "empty.extxyz").write_text("")
    for name, problem in [("mptrj.json", "ase.db cannot read it"), ("cut.db", "ase.db cannot read it"),
                          ("empty.extxyz", "ase.io cannot read it")]:
        assert main(["convert", str(tmp_path / name), str(tmp_path / "out")]) == 2
        assert re.match(rf"error: {re.escape(str(tmp_path / name))}: {problem} \(\w+: .+\)$",
                        capsys.readouterr().err.strip().splitlines()[-1])
    # An extxyz named .out: ase.io takes it for Quantum ESPRESSO output and reads nothing ("no entries to write").
    ase.io.write(tmp_path / "run.extxyz", Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    (tmp_path / "run.extxyz").rename(tmp_path / "run.out")
    assert main(["convert", str(tmp_path / "run.out"), str(tmp_path / "out")]) == 2
    assert re.search(r"run.out: ase.io read no structure from it, reading it as format 'espresso-out' .* a file of "
                     r"another format needs that format's suffix: .extxyz", capsys.readouterr().err)


def test_charge_and_spin_states_are_warned_of(tmp_path):
    """The model takes neither: one geometry in four charge/spin states is four contradictory
    labels of one input (OMol25 keeps them in each row's data)."""
    water = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    db = ase.db.connect(tmp_path / "omol.db")
    for k, (charge, spin) in enumerate([(0, 1), (-1, 2), (1, 2), (0, 3)]):
        db.write(water, data={"charge": charge, "spin": spin, "energy": -10.0 - 3 * k})
    with pytest.warns(UserWarning, match=r"omol: the structures have several charge or spin states \(charge -1, 0, "
                                         r"1; spin 1, 2, 3\), which the model does not take"):
        convert(tmp_path / "omol.db", tmp_path / "omol")
    for charge in range(2, 5):  # (seven charges: five listed, and more said)
        db.write(water, data={"charge": charge, "spin": 1, "energy": -20.0 - charge})
    with pytest.warns(UserWarning, match=r"\(charge -1, 0, 1, 2, 3 ...; spin 1, 2, 3\)"):
        convert(tmp_path / "omol.db", tmp_path / "omol", overwrite=True)
    one = [water.copy() for _ in range(2)]
    for k, atoms in enumerate(one):
        atoms.info.update(charge=0, spin=1, REF_energy=-10.0 - k)
    ase.io.write(tmp_path / "one.extxyz", one)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        convert(tmp_path / "one.extxyz", tmp_path / "one")


def test_labels_the_trainer_would_stop_at_are_refused_or_warned_of(tmp_path, frames):
    """A stress on a molecule (MACE files give them zeros), a single atom in a periodic box larger
    than the cutoff (a periodic code's isolated atom), an energy beside a differing free energy,
    forces without an energy: accepted without a word, and training stopped at them later."""
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    molecule.calc = SinglePointCalculator(molecule, energy=-1.0, forces=np.zeros((3, 3)), stress=np.zeros(6))
    ase.io.write(tmp_path / "mol.extxyz", [frames[0], molecule])
    with pytest.raises(DataError, match=r"structure 1: has a stress label but no cell \(zero volume\) or no periodic"):
        convert(tmp_path / "mol.extxyz", tmp_path / "mol")
    # In a box but not periodic: the box is arbitrary (eval scored it, predict gave NaN).
    molecule.cell = 10 * np.eye(3)
    ase.io.write(tmp_path / "boxed.extxyz", [frames[0], molecule])
    with pytest.raises(DataError, match=r"structure 1: has a stress label but no cell \(zero volume\) or no periodic"):
        convert(tmp_path / "boxed.extxyz", tmp_path / "boxed")
    # An isolated atom with MACE's placeholder stress is an isolated atom still (its energy reported).
    oxygen = Atoms("O")
    oxygen.calc = SinglePointCalculator(oxygen, energy=-432.1, forces=np.zeros((1, 3)), stress=np.zeros(6))
    ase.io.write(tmp_path / "e0_stress.extxyz", [oxygen, frames[0]])
    report = convert(tmp_path / "e0_stress.extxyz", tmp_path / "e0_stress", skip_invalid=True)
    assert "is a single atom" in report.skipped[0] and report.isolated_atom_energies == {"O": -432.1}
    oxygen.calc.results["energy"] = np.nan  # (its labels are checked still: no NaN reference)
    ase.io.write(tmp_path / "e0_nan.extxyz", [oxygen, frames[0]])
    report = convert(tmp_path / "e0_nan.extxyz", tmp_path / "e0_nan", skip_invalid=True)
    assert "label energy contains NaN" in report.skipped[0] and report.isolated_atom_energies == {}
    boxed = [Atoms("O", cell=[15, 15, 15], pbc=True, info={"REF_energy": -432.1}),
             Atoms("O", cell=[15, 15, 0], pbc=[True, True, False], info={"REF_energy": -432.0}),
             Atoms("Cu", cell=[[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]], pbc=True, info={"REF_energy": -3.7}),
             Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"REF_energy": -31.0})]
    ase.io.write(tmp_path / "boxed.extxyz", boxed)
    report = convert(tmp_path / "boxed.extxyz", tmp_path / "boxed", skip_invalid=True)
    assert report.written == 2 and [int(e["sid"]) for e in LmdbDataset(tmp_path / "boxed")] == [2, 3]
    assert all("is a single atom without periodic images within 12.0 Å" in m for m in report.skipped)
    assert report.isolated_atom_energies == {"O": -432.1}
    # All skipped: why, and the energies, in the error (it said "no entries to write").
    ase.io.write(tmp_path / "e0.extxyz", boxed[:2])
    with pytest.raises(DataError, match=r"no entries to write: all 2 of .*e0.extxyz were skipped, the first as .*"
                                        r"structure 0: is a single atom .*isolated-atom energies \(eV\) met: "
                                        r"\{'O': -432.1\}"):
        convert(tmp_path / "e0.extxyz", tmp_path / "e0", skip_invalid=True)
    for k, atoms in enumerate(frames):
        atoms.calc.results["free_energy"] = atoms.calc.results["energy"] - 0.01 * k
    ase.io.write(tmp_path / "vasp.extxyz", frames)
    with pytest.warns(UserWarning, match=r"the energy is calculator\['energy'\], and the source's free_energy "
                                         r"differs from it \(by up to 0.05 eV\)"):
        convert(tmp_path / "vasp.extxyz", tmp_path / "vasp")
    with warnings.catch_warnings():  # (named: the user's choice)
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        convert(tmp_path / "vasp.extxyz", tmp_path / "vasp2", keys=KeyMap(energy="energy"))
    # A free_energy that is no number is not the entry's fault (it is looked at for the warning only).
    text = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"energy": -1.0, "free_energy": "n/a"})
    ase.io.write(tmp_path / "na.extxyz", [text])
    assert convert(tmp_path / "na.extxyz", tmp_path / "na").written == 1
    for atoms in frames:
        del atoms.calc.results["energy"]
    ase.io.write(tmp_path / "free.extxyz", frames)
    with pytest.warns(UserWarning, match=r"free has forces \(calculator\['forces'\]\) but no energy: .*calculator: "
                                         r".*free_energy.* --energy-key"):
        convert(tmp_path / "free.extxyz", tmp_path / "free")


# ----- pickled OC20 / JMP LMDBs -----


class OldData:  # torch_geometric 1.x: attributes in __dict__
    __module__, __qualname__ = "torch_geometric.data.data", "Data"

    def __init__(self, **fields):
        self.__dict__.update(fields)


class GlobalStorage:  # torch_geometric 2.x: Data._store._mapping, back-reference to the Data
    __module__ = "torch_geometric.data.storage"


class NewData:
    __module__, __qualname__ = "torch_geometric.data.data", "Data"

    def __init__(self, **fields):
        store = GlobalStorage()
        store.__dict__["_mapping"] = fields
        store.__dict__["_parent"] = self
        self.__dict__["_store"] = store


def oc20_fields(rng, n):
    return dict(pos=torch.tensor(rng.normal(size=(n, 3))),
                atomic_numbers=torch.tensor(rng.choice([1.0, 8.0, 78.0], n)),  # float, as OC20
                cell=torch.tensor(np.diag([8.0, 8.0, 20.0]))[None], natoms=n,
                tags=torch.tensor(rng.integers(0, 3, n)), fixed=torch.tensor(rng.random(n) < 0.5),
                y=float(rng.normal()), force=torch.tensor(rng.normal(size=(n, 3))),
                sid=int(rng.integers(1000)), fid=3, edge_index=torch.zeros(2, 5, dtype=torch.long),
                cell_offsets=torch.zeros(5, 3), x=None)


@pytest.fixture
def fake_pyg(monkeypatch):
    """Register the stand-ins under torch_geometric's module paths so pickle names them so."""
    for path, classes in [("torch_geometric", {}), ("torch_geometric.data", {}),
                          ("torch_geometric.data.data", {"Data": None}),
                          ("torch_geometric.data.storage", {"GlobalStorage": GlobalStorage})]:
        module = types.ModuleType(path)
        for name, cls in classes.items():
            setattr(module, name, cls)
        monkeypatch.setitem(sys.modules, path, module)

    def pickle_as_data(cls, fields):
        module = sys.modules["torch_geometric.data.data"]
        monkeypatch.setattr(module, "Data", cls, raising=False)
        return pickle.dumps(cls(**fields), protocol=-1)

    return pickle_as_data


def write_pickled_lmdb(file, values, length=True):
    env = lmdb.open(str(file), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(str(i).encode("ascii"), value)
        if length:
            txn.put(b"length", pickle.dumps(len(values)))
    env.close()


@pytest.mark.parametrize("layout", ["old", "new"])
def test_pickled_lmdb_layouts(tmp_path, fake_pyg, monkeypatch, layout):
    rng = np.random.default_rng(1)
    fields = [oc20_fields(rng, n) for n in (4, 7, 5, 6, 3)]
    cls = OldData if layout == "old" else NewData
    src = tmp_path / "oc20"
    src.mkdir()
    write_pickled_lmdb(src / "data.0000.lmdb", [fake_pyg(cls, f) for f in fields[:3]])
    write_pickled_lmdb(src / "data.0001.lmdb", [fake_pyg(cls, f) for f in fields[3:]], length=False)
    assert "torch_geometric" in sys.modules  # written with the stand-ins...
    for name in [m for m in sys.modules if m.startswith("torch_geometric")]:
        monkeypatch.delitem(sys.modules, name)  # ...and read without any torch_geometric at all
    with pytest.raises(PermissionError, match="allow_pickle"):
        convert(src, tmp_path / "out")
    report = convert(src, tmp_path / "out", allow_pickle=True)
    assert report.written == 5 and report.labels == {"energy": "y", "forces": "force"}
    ds = LmdbDataset(tmp_path / "out")
    assert set(ds.schema) == {"pos", "atomic_numbers", "cell", "pbc", "tags", "fixed", "energy",
                              "forces", "sid", "fid"}
    for i, f in enumerate(fields):
        entry = ds[i]
        assert torch.equal(entry["pos"], f["pos"])
        assert entry["atomic_numbers"].tolist() == f["atomic_numbers"].long().tolist()
        assert torch.equal(entry["cell"], f["cell"][0]) and entry["pbc"].all()
        # All-zero tags (entry 2 here) read as 2 everywhere, as from ASE sources (oc20_tags).
        tags = f["tags"] if f["tags"].any() else torch.full_like(f["tags"], 2)
        assert torch.equal(entry["tags"], tags) and torch.equal(entry["fixed"], f["fixed"])
        assert entry["energy"].item() == f["y"] and torch.equal(entry["forces"], f["force"])
        assert entry["sid"].item() == f["sid"] and entry["fid"].item() == 3


def test_pickled_lmdb_stress_and_label_keys(tmp_path, fake_pyg):
    """Voigt (6,) stresses are converted as in the ASE path; label sources do not mix."""
    rng = np.random.default_rng(3)
    fields = [oc20_fields(rng, 4) for _ in range(3)]
    voigt = [rng.normal(size=6) * 0.01 for _ in fields]  # (eV/Å^3: a few GPa)
    for f, v in zip(fields, voigt):
        f["stress"] = torch.tensor(v)
    fields[2]["energy"] = fields[2].pop("y")
    write_pickled_lmdb(tmp_path / "x.lmdb", [fake_pyg(OldData, f) for f in fields])
    report = convert(tmp_path / "x.lmdb", tmp_path / "out", allow_pickle=True, skip_invalid=True)
    assert report.labels == {"energy": "y", "forces": "force", "stress": "stress"}
    assert report.written == 2 and "entry 2: energy is in energy, but earlier entries took it from y" in report.skipped[0]
    ds = LmdbDataset(tmp_path / "out")
    for i in range(2):
        np.testing.assert_array_equal(ds[i]["stress"], voigt_6_to_full_3x3_stress(voigt[i]))
    fields_listed = r"\(available: pos, atomic_numbers, cell, natoms, tags, fixed, y, force, sid, fid, " \
                    r"edge_index, cell_offsets, stress\)"  # (x is None: not a field)
    with pytest.raises(DataError, match=r"x.lmdb entry 0: energy: key 'energy' not found " + fields_listed):
        convert(tmp_path / "x.lmdb", tmp_path / "o2", allow_pickle=True, keys=KeyMap(energy="energy"))
    with pytest.raises(DataError, match=r"x.lmdb entry 0: property 'gap': key 'gap' not found " + fields_listed):
        convert(tmp_path / "x.lmdb", tmp_path / "o2", allow_pickle=True, keys=KeyMap(properties={"gap": "gap"}))


def test_pickled_lmdb_bad_entries(tmp_path, fake_pyg):
    rng = np.random.default_rng(2)
    good = [oc20_fields(rng, 4) for _ in range(6)]
    good[2]["force"] = good[2]["force"][:-1]  # mismatched lengths
    del good[3]["pos"]  # missing field
    good[4]["natoms"] = 9  # metadata disagrees with the arrays
    values = [fake_pyg(OldData, f) for f in good]
    values[1] = values[1][: len(values[1]) // 2]  # truncated pickle
    write_pickled_lmdb(tmp_path / "x.lmdb", values)
    with pytest.raises(DataError, match=r"x.lmdb entry 1: "):
        convert(tmp_path / "x.lmdb", tmp_path / "out", allow_pickle=True)
    report = convert(tmp_path / "x.lmdb", tmp_path / "out", allow_pickle=True, skip_invalid=True)
    assert report.written == 2
    assert [m.split(": ")[0].rsplit(" ", 1)[1] for m in report.skipped] == ["1", "2", "3", "4"]
    assert "forces has shape (3, 3), expected (4, 3)" in report.skipped[1]
    assert "missing field(s) pos" in report.skipped[2]
    assert "natoms is 9" in report.skipped[3]


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_hostile_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pickled_lmdb(tmp_path / "x.lmdb", [pickle.dumps(Exploit())])
    with pytest.raises(DataError, match="refusing to load global posix.system"):
        convert(tmp_path / "x.lmdb", tmp_path / "out", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def _global(module: str, name: str) -> bytes:
    """Protocol-4 opcodes that push module.name (STACK_GLOBAL), with a dotted name if asked."""
    text = lambda s: pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()  # noqa: E731
    return text(module) + text(name) + pickle.STACK_GLOBAL


@pytest.mark.parametrize("module, name", [("numpy", "dtypes.__builtins__.get"),
                                          ("numpy.dtypes", "__builtins__.get"), ("numpy", "dtype_exec")])
def test_dotted_or_foreign_names_are_refused(tmp_path, module, name):
    """Protocol 4 resolves a dotted global name attribute by attribute: numpy.dtypes.__builtins__.get
    would hand the pickle builtins' exec. Only numpy dtype classes pass, by exact name."""
    marker = tmp_path / "ran"
    payload = (pickle.PROTO + b"\x04" + _global(module, name)
               + pickle.SHORT_BINUNICODE + b"\x04exec" + pickle.TUPLE1 + pickle.REDUCE
               + pickle.BINUNICODE + len(code := f"open({str(marker)!r}, 'w')").to_bytes(4, "little")
               + code.encode() + pickle.TUPLE1 + pickle.REDUCE + pickle.POP + pickle.EMPTY_DICT + pickle.STOP)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        unpickle_data(payload)
    assert not marker.exists()
    # numpy's own dtype pickles still load, under numpy 1 and 2 names alike.
    assert unpickle_data(pickle.dumps({"x": np.arange(3, dtype=np.float32)}))["x"].dtype == np.float32


def test_a_pickle_cannot_call_torch_tensor_or_expand_shared_lists(tmp_path):
    """torch.Tensor was an allowed global, so a pickle could call torch.Tensor(4, 3), an
    uninitialised tensor of process memory, as positions; a 245-byte list nested in itself ten
    times took minutes for numpy to expand. A tensor with attributes (pickled through
    _rebuild_from_type_v2 and torch.Tensor) still loads."""
    from jmp_ext.data.convert import _numbers

    called = (pickle.PROTO + b"\x04" + _global("torch", "Tensor") + pickle.BININT1 + b"\x04" + pickle.BININT1
              + b"\x03" + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)
    with pytest.raises(TypeError, match="_TensorClass"):
        unpickle_data(called)
    tensor = torch.arange(3.0)
    tensor.note = "an attribute"
    assert torch.equal(unpickle_data(pickle.dumps({"pos": tensor}))["pos"], torch.arange(3.0))
    nested = [1.0] * 10
    for _ in range(9):
        nested = [nested] * 10
    with pytest.raises(DataError, match=r"pos is a nested list of more than 100000000 values"):
        _numbers("pos", nested)
    loop = []
    loop.append(loop)
    with pytest.raises(DataError, match=r"holds itself"):
        _numbers("pos", unpickle_data(pickle.dumps({"x": loop}))["x"])


def test_all_zero_tags_read_as_unset_as_in_the_calculator(tmp_path):
    """A tags column of zeros (ASE's default, written out) is not 'all sub-surface': convert and
    the ASE calculator both give molecules and bulk tags 2 (one rule, data.convert.oc20_tags)."""
    from ase.build import molecule

    from jmp_ext.data import atoms_to_entry

    atoms = molecule("CH3OH")
    atoms.set_tags(np.zeros(len(atoms), int))
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    ase.io.write(tmp_path / "in.extxyz", [atoms])
    assert "tags" in ase.io.read(tmp_path / "in.extxyz").arrays
    convert(tmp_path / "in.extxyz", tmp_path / "out")
    stored = LmdbDataset(tmp_path / "out")[0]["tags"]
    assert stored.tolist() == [2] * len(atoms)
    assert torch.equal(atoms_to_entry(atoms)["tags"], stored)


def test_ase_build_layer_tags_are_kept_with_a_warning(tmp_path):
    """ase.build's slabs tag layers 1 (top), 2, 3 and the adsorbate 0; stored as they are, only
    the top layer would count as surface and the adsorbate as sub-surface, with no word said.
    Convert and the calculator warn (and keep the tags); OC20 tags pass silently."""
    import warnings

    from ase.build import add_adsorbate, fcc111

    from jmp_ext.data import atoms_to_entry

    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    del slab.info["adsorbate_info"]  # (a dict, which extxyz skips with a warning of its own)
    slab.calc = SinglePointCalculator(slab, energy=-1.0, forces=np.zeros((len(slab), 3)))
    layers = slab.get_tags().copy()
    assert set(layers) == {0, 1, 2, 3}
    ase.io.write(tmp_path / "slab.extxyz", [slab])
    message = r"tags \[3\] are not OC20 tags \(0 sub-surface, 1 surface, 2 adsorbate.*atoms.set_tags"
    with pytest.warns(UserWarning, match=message):
        convert(tmp_path / "slab.extxyz", tmp_path / "out")
    assert LmdbDataset(tmp_path / "out")[0]["tags"].tolist() == layers.tolist()
    with pytest.warns(UserWarning, match=message):
        assert atoms_to_entry(slab)["tags"].tolist() == layers.tolist()

    t = slab.get_tags()  # the fix the warning suggests
    slab.set_tags(np.select([t == 1, t == 0], [1, 2], 0))
    ase.io.write(tmp_path / "oc20.extxyz", [slab])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        convert(tmp_path / "oc20.extxyz", tmp_path / "out2")
        atoms_to_entry(slab)
    assert LmdbDataset(tmp_path / "out2")[0]["tags"].tolist() == [0] * 8 + [1] * 4 + [2]


def test_ase_build_layer_tags_of_a_two_layer_slab_are_told_by_height():
    """Two layers give tags 2 (bottom), 1 (top), 0 (adsorbate): all valid OC20 tags, read as an
    adsorbate under the surface and the adsorbate as sub-surface. The heights give them away."""
    import warnings

    from ase.build import add_adsorbate, fcc111

    from jmp_ext.data import atoms_to_entry

    slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    assert slab.get_tags().tolist() == [2] * 4 + [1] * 4 + [0]
    with pytest.warns(UserWarning, match=r"the atoms tagged 2 \(adsorbate\) lie below those tagged 1 \(surface\), "
                                         r"as many of them as of a layer: these tags look like ase.build's layer "
                                         r"numbers.*set_tags"):
        atoms_to_entry(slab)
    bare = fcc111("Cu", (2, 2, 2), vacuum=6.0, periodic=True)  # (no adsorbate: tags 2 and 1 alone)
    with pytest.warns(UserWarning, match=r"these tags look like ase.build's layer numbers"):
        atoms_to_entry(bare)
    t = slab.get_tags()
    slab.set_tags(np.select([t == 1, t == 0], [1, 2], 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        atoms_to_entry(slab)
        slab.set_cell(slab.cell[[1, 0, 2]], scale_atoms=False)  # left-handed: the normal follows the third vector
        atoms_to_entry(slab)
        # OC20 tags with as many adsorbate atoms as surface ones (an H on every top site), the
        # adsorbate wrapped across the periodic c axis to the bottom of the cell: its nearest
        # image is above the surface
        covered = fcc111("Cu", (2, 2, 2), vacuum=6.0, periodic=True)
        top = covered.get_tags() == 1
        covered += Atoms("H4", positions=covered.positions[top] + [0.0, 0.0, 1.5])
        covered.set_tags([0] * 4 + [1] * 4 + [2] * 4)
        atoms_to_entry(covered)
        covered.positions[-4:, 2] -= covered.cell[2, 2]
        atoms_to_entry(covered)


def test_cli_convert(tmp_path, frames, capsys):
    ase.io.write(tmp_path / "in.extxyz", frames)
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "out"), "--float32"]) == 0
    assert "wrote 6 entries" in capsys.readouterr().out
    assert LmdbDataset(tmp_path / "out")[0]["pos"].dtype == torch.float32
    write_pickled_lmdb(tmp_path / "x.lmdb", [b"\x80\x05K\x01."])
    assert main(["convert", str(tmp_path / "x.lmdb"), str(tmp_path / "o2")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    # The units converted from are said (no file records them), and kept in the provenance.
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "o3"), "--energy-unit", "kcal/mol",
                 "--length-unit", "Bohr"]) == 0
    out = capsys.readouterr().out
    assert ("  energy <- calculator['energy'], kcal/mol converted to eV\n"
            "  forces <- calculator['forces'], kcal/mol/Bohr converted to eV/Å\n"
            "  stress <- calculator['stress'], kcal/mol/Bohr^3 converted to eV/Å^3\n"
            "  positions and cell: Bohr converted to Å\n") in out
    assert LmdbDataset(tmp_path / "o3").info["source_units"] == {"energy": "kcal/mol", "length": "Bohr"}
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "o4"), "--length-unit", "A"]) == 0
    assert "  forces <- calculator['forces']\n" in capsys.readouterr().out
    assert LmdbDataset(tmp_path / "o4").info["source_units"] == {"energy": "eV", "length": "Å"}  # (one name for Å)


def test_cli_overwrite_keeps_a_project_directory(tmp_path, frames, capsys):
    """`convert proj/raw/train.xyz proj --overwrite` once deleted the project and its source."""
    (tmp_path / "proj" / "raw").mkdir(parents=True)
    ase.io.write(tmp_path / "proj" / "raw" / "train.xyz", frames)
    assert main(["convert", str(tmp_path / "proj" / "raw" / "train.xyz"), str(tmp_path / "proj"),
                 "--overwrite"]) == 2
    assert f"{tmp_path / 'proj'} exists and is not a jmp_ext dataset" in capsys.readouterr().err
    assert len(ase.io.read(tmp_path / "proj" / "raw" / "train.xyz", ":")) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["proj"]


def test_provenance_in_meta(tmp_path, frames):
    frames[1].numbers[0] = 0
    ase.io.write(tmp_path / "in.extxyz", frames)
    convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True)
    info = json.loads((tmp_path / "out" / "meta.json").read_text())["info"]
    assert info["converted_from"] == str(tmp_path / "in.extxyz") and info["source_format"] == "ase"
    assert info["labels"]["forces"] == "calculator['forces']"
    assert len(info["skipped"]) == info["skipped_count"] == 1 and "structure 1: unknown element" in info["skipped"][0]


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_cli_ctrl_c_leaves_nothing_and_no_traceback(tmp_path, frames, capsys, monkeypatch, stop):
    """Ctrl-C, or SIGTERM (a scheduler, `timeout`: it killed the process where it stood, leaving
    the temporary dataset), in the middle of a conversion: the writer aborts (no half-written
    dataset, no temporary left) and the CLI says so instead of printing a traceback."""
    import signal

    from jmp_ext.data import writer as writer_module

    ase.io.write(tmp_path / "in.extxyz", frames)
    original, added = writer_module.DatasetWriter.add, []

    def add_then_interrupt(self, *args, **kwargs):
        if added:
            if stop == "sigterm":
                # (without the CLI's handler SIGTERM would end pytest itself)
                assert signal.getsignal(signal.SIGTERM) not in (handler, signal.SIG_DFL), "no SIGTERM handler"
                signal.raise_signal(signal.SIGTERM)
                pytest.fail("SIGTERM did not interrupt")  # (a handler that swallowed it)
            raise KeyboardInterrupt
        added.append(1)
        return original(self, *args, **kwargs)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(writer_module.DatasetWriter, "add", add_then_interrupt)
    assert main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "out")]) == 130
    assert "interrupted: no dataset was left half-written" in capsys.readouterr().err
    assert added and sorted(p.name for p in tmp_path.iterdir()) == ["in.extxyz"]
    assert signal.getsignal(signal.SIGTERM) == handler


def test_labels_lacking_on_the_first_frame(tmp_path):
    """A first frame without labels: --skip-invalid kept it, skipped every labelled frame, and
    reported energy and forces as written. Frames with labels the first lacks cannot be
    skipped sensibly: the error says which frames lack which labels."""
    rng = np.random.default_rng(0)
    frames = [make_atoms(rng, n=3) for _ in range(4)]
    frames[0].calc = None
    ase.io.write(tmp_path / "in.extxyz", frames)
    for skip_invalid in (False, True):
        with pytest.raises(DataError, match=r"structure 1: has energy, forces, stress, which the "
                           r"entries written before it lack \(1, from .*in.extxyz structure 0\): "
                           r".*remove the entries without them from the source, or drop energy, "
                           r"forces, stress with --energy-key none --forces-key none --stress-key"):
            convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=skip_invalid)
        assert not (tmp_path / "out").exists()
    db = ase.db.connect(tmp_path / "relax.db")  # (a relaxation's first row: its geometry, no calculator)
    for atoms in frames:
        db.write(atoms)
    with pytest.raises(DataError, match=r"row id=2: has energy, .* from the source \(or --select energy: the rows "
                                        r"with an energy\), or drop"):
        convert(tmp_path / "relax.db", tmp_path / "out")
    assert convert(tmp_path / "relax.db", tmp_path / "out", select="energy").written == 3


def test_report_names_only_labels_written(tmp_path):
    """The only frame with forces is skipped (it lacks the energy): forces are not in the data."""
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]) for _ in range(3)]
    frames[0].info["REF_energy"], frames[2].info["REF_energy"] = -1.0, -2.0
    frames[1].arrays["REF_forces"] = np.ones((2, 3))
    ase.io.write(tmp_path / "in.extxyz", frames, format="extxyz")
    report = convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True)
    assert report.written == 2 and "structure 1: lacks energy" in report.skipped[0]
    assert report.labels == {"energy": "info['REF_energy']"}
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["info"]["labels"] == report.labels
    assert "forces" not in LmdbDataset(tmp_path / "out").schema


def test_a_jmp_ext_dataset_is_not_read_as_pickles(tmp_path, frames, capsys):
    """Our own LMDB shards were taken for pickled OC20 ones: --allow-pickle was suggested, and
    then failed with 'invalid load key'."""
    ase.io.write(tmp_path / "in.extxyz", frames)
    convert(tmp_path / "in.extxyz", tmp_path / "ds")
    for src in (tmp_path / "ds", tmp_path / "ds" / "data.0000.lmdb"):
        for allow_pickle in (False, True):
            with pytest.raises(DataError, match=r"data.0000.lmdb holds jmp_ext entries: .* is "
                                                r"\(part of\) a jmp_ext dataset already"):
                convert(src, tmp_path / "out", allow_pickle=allow_pickle)
    assert main(["convert", str(tmp_path / "ds"), str(tmp_path / "out")]) == 2
    assert "--allow-pickle" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.extxyz"]


def test_pickled_lmdb_keys_are_checked(tmp_path, fake_pyg):
    """Keys other than 0, 1, ... and 'length' were skipped silently, "00" was a second entry 0,
    and 'length' was never compared with the entries."""
    rng = np.random.default_rng(4)
    env = lmdb.open(str(tmp_path / "x.lmdb"), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key in (b"0", b"00", b"1", b"\x00\x01"):
            txn.put(key, fake_pyg(OldData, oc20_fields(rng, 4)))
        txn.put(b"length", pickle.dumps(5))
    env.close()
    with pytest.raises(DataError, match=r"x.lmdb key b'\\x00\\x01': unexpected key"):
        convert(tmp_path / "x.lmdb", tmp_path / "out", allow_pickle=True)
    report = convert(tmp_path / "x.lmdb", tmp_path / "out", allow_pickle=True, skip_invalid=True)
    unexpected = ("unexpected key: entries are stored under the keys 0, 1, ... (and their "
                  "number under 'length')")
    assert report.written == 2 and [m.split(": ", 1)[1] for m in report.skipped] == [
        unexpected, unexpected, "says 5 entries, but the file holds 2"]
    assert "x.lmdb key b'00'" in report.skipped[1] and "x.lmdb key 'length'" in report.skipped[2]
    write_pickled_lmdb(tmp_path / "y.lmdb", [fake_pyg(OldData, oc20_fields(rng, 4))], length=False)
    env = lmdb.open(str(tmp_path / "y.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"length", b"not a pickle")
    env.close()
    with pytest.raises(DataError, match=r"y.lmdb key 'length': is not a pickled entry count"):
        convert(tmp_path / "y.lmdb", tmp_path / "o2", allow_pickle=True)


def test_calculator_sees_a_structure_as_converted(tmp_path):
    """The calculator built its own entry and ignored FixCartesian, which the converters read
    (extxyz stores FixAtoms as a move_mask that reads back as FixCartesian)."""
    from jmp_ext.data import atoms_to_entry

    atoms = make_atoms(np.random.default_rng(5), n=5)
    atoms.set_tags([0, 1, 2, 2, 2])
    atoms.set_constraint([FixAtoms(indices=[0]), FixCartesian(1, mask=(True, True, True)),
                          FixCartesian(2, mask=(True, False, True))])
    ase.io.write(tmp_path / "in.traj", [atoms])
    convert(tmp_path / "in.traj", tmp_path / "out")
    stored, entry = LmdbDataset(tmp_path / "out")[0], atoms_to_entry(atoms)
    assert entry["fixed"].tolist() == [True, True, False, False, False]
    assert set(entry) == {"pos", "atomic_numbers", "cell", "pbc", "tags", "fixed"}
    for name, value in entry.items():
        assert value.dtype == stored[name].dtype and torch.equal(value, stored[name]), name


def test_a_truncated_pickled_lmdb_is_an_error_not_a_crash(tmp_path, fake_pyg):
    """A half-downloaded OC20 file: LMDB maps it, and reading past its end was a SIGBUS."""
    rng = np.random.default_rng(2)
    file = tmp_path / "oc20.lmdb"
    write_pickled_lmdb(file, [fake_pyg(NewData, oc20_fields(rng, 40)) for _ in range(200)])
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    for skip_invalid in (False, True):
        with pytest.raises(ValueError, match=r"oc20\.lmdb is truncated: \d+ bytes, but its LMDB header says"):
            convert(file, tmp_path / "out", allow_pickle=True, skip_invalid=skip_invalid)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("energy, forces, virial, read_as", [
    ("dft_energy", "dft_force", "dft_virial", ("info", "arrays")),  # libAtoms / GAP
    ("dft_energy", "dft_forces", "dft_virial", ("info", "arrays")),
    ("REF_energy", "REF_forces", "REF_virials", ("info", "arrays")),  # MACE
    ("energy", "forces", "virials", ("calculator", "calculator")),  # older MACE (ase.io makes a calculator)
])
def test_a_virial_is_stored_as_the_stress(tmp_path, frames, energy, forces, virial, read_as):
    """GAP / libAtoms files carry the virial W = -V stress (eV) instead of a stress: it was
    ignored, or with --stress-key stored as it is (sign flipped, times the volume). Then GAP's
    dft_energy and dft_force were no default keys (a stress-only dataset, without a word), nor
    MACE's REF_virials (its stress was dropped)."""
    for atoms in frames:
        stress = atoms.get_stress(voigt=False)
        atoms.info[energy] = atoms.get_potential_energy()
        atoms.arrays[forces] = atoms.get_forces(apply_constraint=False)
        atoms.info[virial] = (-stress * atoms.get_volume()).reshape(-1)
        atoms.info["true_stress"] = stress.reshape(-1)
        atoms.calc = None
    ase.io.write(tmp_path / "gap.extxyz", frames)
    for keys in (KeyMap(), KeyMap(stress=virial)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
            report = convert(tmp_path / "gap.extxyz", tmp_path / "out", keys=keys, overwrite=True)
        assert report.labels == {"energy": f"{read_as[0]}[{energy!r}]", "forces": f"{read_as[1]}[{forces!r}]",
                                 "stress": f"info[{virial!r}]"}
        for entry, atoms in zip(LmdbDataset(tmp_path / "out"), frames):
            np.testing.assert_allclose(entry["forces"].numpy(), atoms.arrays[forces], atol=1e-8)  # (extxyz: 8 decimals)
            np.testing.assert_allclose(entry["stress"].numpy(), atoms.info["true_stress"].reshape(3, 3), rtol=1e-12,
                                       atol=1e-15)


def test_a_virial_named_in_another_case_is_a_virial(tmp_path, frames):
    """--stress-key Virial stored the virial as a stress (sign flipped, times the volume)."""
    for atoms in frames:
        atoms.info["Virial"] = (-atoms.get_stress(voigt=False) * atoms.get_volume()).reshape(-1)
        atoms.calc.results.pop("stress")
    ase.io.write(tmp_path / "in.extxyz", frames)
    convert(tmp_path / "in.extxyz", tmp_path / "out", keys=KeyMap(stress="Virial"))
    for entry, atoms in zip(LmdbDataset(tmp_path / "out"), frames):
        np.testing.assert_allclose(entry["stress"].numpy(), -atoms.info["Virial"].reshape(3, 3) / atoms.get_volume(),
                                   rtol=1e-12)


def test_a_stress_named_virial_something_is_a_stress(tmp_path, frames):
    """Any stress key with "virial" in its name was divided by -V, a real stress too."""
    for atoms in frames:
        atoms.info["virial_stress"] = atoms.get_stress(voigt=False).reshape(-1)
    ase.io.write(tmp_path / "in.extxyz", frames)
    convert(tmp_path / "in.extxyz", tmp_path / "out", keys=KeyMap(stress="virial_stress"))
    for entry, atoms in zip(LmdbDataset(tmp_path / "out"), frames):
        np.testing.assert_allclose(entry["stress"].numpy(), atoms.get_stress(voigt=False), rtol=1e-12)


def test_values_that_are_not_what_they_claim_are_refused(tmp_path):
    """An extxyz energy=T is read as True (stored, an energy of 1 eV), and a tags:R column of
    1.5 was stored as tag 1."""
    booly = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"energy": True})
    ase.io.write(tmp_path / "booly.extxyz", booly)
    with pytest.raises(DataError, match=r"structure 0: energy is a boolean \(True\) in calculator\['energy'\], not a "
                                        r"number"):
        convert(tmp_path / "booly.extxyz", tmp_path / "booly")
    from jmp_ext.data import format as fmt

    with pytest.raises(DataError, match=r"entry 3: forces is a boolean"):  # (DatasetWriter.add's path)
        fmt.normalize_entry({"forces": np.ones((2, 3), bool)}, "entry 3")
    halves = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"energy": -1.0})
    halves.set_array("tags", np.array([1.5, 2.0]))
    ase.io.write(tmp_path / "halves.extxyz", halves)
    with pytest.raises(DataError, match=r"structure 0: tags must hold integers, got 1.5"):
        convert(tmp_path / "halves.extxyz", tmp_path / "halves")
    from jmp_ext.data.convert import oc20_tags

    with pytest.raises(DataError, match=r"tags must hold integers, got inf"):  # (cast to INT64_MIN otherwise)
        oc20_tags(np.array([np.inf, 2.0]))


def test_a_virial_needs_a_periodic_cell(tmp_path):
    molecule = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"virial": np.zeros((3, 3)), "energy": 1.0})
    ase.io.write(tmp_path / "mol.extxyz", molecule)
    with pytest.raises(DataError, match="has a virial but no 3-D periodic cell"):
        convert(tmp_path / "mol.extxyz", tmp_path / "mol")


def test_structures_a_model_cannot_use_are_refused(tmp_path, frames, capsys):
    """A periodic axis without a lattice vector (extxyz pbc="T T T" without Lattice), an
    asymmetric stress, and MACE's isolated-atom E0 frames (no pair of atoms: no graph); the last
    are skipped with --skip-invalid."""
    flat = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], pbc=True, info={"energy": -1.0})
    ase.io.write(tmp_path / "flat.extxyz", flat)
    with pytest.raises(DataError, match=r"structure 0: periodic along axis \[0, 1, 2\] .* but its lattice vector "
                                        r"is zero"):
        convert(tmp_path / "flat.extxyz", tmp_path / "flat")
    # A lattice in nm (frame 2 of 3) and coplanar lattice vectors: refused here, where they
    # converted and failed only in training, naming a structure of the batch there
    from ase.build import bulk

    from jmp_ext.data import atoms_to_entry

    crystals = [bulk("Cu", "fcc", a=3.61) for _ in range(3)]
    for k, atoms in enumerate(crystals):
        atoms.info["energy"] = -3.0 - k
    crystals[2].set_cell(crystals[2].cell / 10, scale_atoms=True)
    ase.io.write(tmp_path / "nm.extxyz", crystals)
    with pytest.raises(DataError, match=r"structure 2: 1 atom\(s\) in a periodic cell of 0.0118 Å\^3 \(the densest "
                                        r"solids hold ~0.2 atoms/Å\^3\): cells are in Å"):
        convert(tmp_path / "nm.extxyz", tmp_path / "nm")
    coplanar = Atoms("Cu2", positions=[[0, 0, 0], [1.2, 1.2, 0]], cell=[[2, 0, 0], [0, 2, 0], [2, 2, 0]], pbc=True)
    with pytest.raises(DataError, match=r"in a periodic cell of 0 Å\^3 .* must not be coplanar"):
        atoms_to_entry(coplanar)
    assert atoms_to_entry(crystals[0])["pos"].shape == (1, 3)  # (0.085 atoms/Å^3)
    for k, atoms in enumerate(frames):  # (REF_stress comes first; entry 1's is not symmetric)
        atoms.info["REF_stress"] = np.arange(9.0) * 0.01 if k == 1 else atoms.get_stress(voigt=False).reshape(-1)
    ase.io.write(tmp_path / "asym.extxyz", frames)
    with pytest.raises(DataError, match="structure 1: stress is not symmetric"):
        convert(tmp_path / "asym.extxyz", tmp_path / "asym")
    e0 = [Atoms(symbol, positions=[[0, 0, 0]], info={"config_type": "IsolatedAtom", "REF_energy": -13.6 * k})
          for k, symbol in enumerate("HCO", start=1)]
    molecules = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74 + 0.01 * k]], info={"REF_energy": -31.0 - k})
                 for k in range(3)]
    ase.io.write(tmp_path / "mace.extxyz", e0 + molecules)
    with pytest.raises(DataError, match="structure 0: is a single atom without periodic images"):
        convert(tmp_path / "mace.extxyz", tmp_path / "mace")
    report = convert(tmp_path / "mace.extxyz", tmp_path / "mace", skip_invalid=True)
    assert report.written == 3 and len(report.skipped) == 3
    assert [e["energy"].item() for e in LmdbDataset(tmp_path / "mace")] == [-31.0, -32.0, -33.0]
    # Their energies are the E0s a model takes as references: reported, ready to paste.
    assert report.isolated_atom_energies == {"H": -13.6, "C": -27.2, "O": -13.6 * 3}
    assert main(["convert", str(tmp_path / "mace.extxyz"), str(tmp_path / "mace"), "--skip-invalid",
                 "--overwrite"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("isolated-atom energies (eV), as the energy target's references: {H: -13.6, C: -27.2")
    assert yaml.safe_load(line.split(": ", 1)[1]) == report.isolated_atom_energies


def test_a_skipped_first_frame_does_not_fix_where_labels_are_read(tmp_path):
    """Frame 0's REF_energy is NaN (skipped): frames 1 and 2 label `energy`, and are written."""
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info=info)
              for info in ({"REF_energy": np.nan}, {"energy": -1.0}, {"energy": -1.1})]
    ase.io.write(tmp_path / "in.extxyz", frames)
    report = convert(tmp_path / "in.extxyz", tmp_path / "out", skip_invalid=True)
    assert report.written == 2 and report.labels == {"energy": "calculator['energy']"}  # (ase.io's reading)
    assert "structure 0" in report.skipped[0] and "NaN" in report.skipped[0]


def test_sources_without_labels_or_with_odd_values_are_pointed_out(tmp_path, frames):
    """A file whose labels sit under other keys (here E) converted without any label and
    without a word; per-atom properties, text labels and --select on a file were puzzling."""
    other = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"E": -1.0 - k},
                   pbc=False) for k in range(2)]
    ase.io.write(tmp_path / "other.extxyz", other)
    with pytest.warns(UserWarning, match=r"has no labels: none found under the usual keys \(REF_energy, .*"
                                         r"the first entry's keys, available: info: E"):
        convert(tmp_path / "other.extxyz", tmp_path / "other")
    report = convert(tmp_path / "other.extxyz", tmp_path / "other2", keys=KeyMap(energy="E"))
    assert report.labels == {"energy": "info['E']"}

    for atoms in frames:
        atoms.set_initial_charges(np.zeros(len(atoms)))
    ase.io.write(tmp_path / "q.extxyz", frames)
    with pytest.raises(DataError, match=r"property 'q': arrays\['initial_charges'\] is per atom; properties are "
                                        r"per structure"):
        convert(tmp_path / "q.extxyz", tmp_path / "q", keys=KeyMap(properties={"q": "initial_charges"}))
    text = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"REF_energy": "abc"})
    ase.io.write(tmp_path / "text.extxyz", text)
    with pytest.raises(DataError, match="structure 0: energy is not numeric: 'abc'"):
        convert(tmp_path / "text.extxyz", tmp_path / "text")
    with pytest.raises(ValueError, match="select .* applies to ASE databases and HDF5 files, not to a 'ase' source"):
        convert(tmp_path / "q.extxyz", tmp_path / "sel", select="id<2")


def test_named_properties_keep_the_source_unit(tmp_path, frames):
    """Named properties are not converted: their schema unit is "" (it said eV for
    energy_per_atom after a Hartree conversion)."""
    for atoms in frames:
        atoms.info["e_pa"] = atoms.get_potential_energy() / len(atoms)
    ase.io.write(tmp_path / "in.extxyz", frames)
    convert(tmp_path / "in.extxyz", tmp_path / "out",
            keys=KeyMap(energy_unit="Hartree", properties={"energy_per_atom": "e_pa"}))
    schema = LmdbDataset(tmp_path / "out").schema
    assert schema["energy_per_atom"]["unit"] == "" and schema["energy"]["unit"] == "eV"


def test_other_layouts_of_ase_databases_and_lmdbs(tmp_path, frames, fake_pyg):
    """An ASE database in JSON (ase.io read it without its key-value pairs), and an LMDB
    environment directory (py-lmdb's default: dir/data.mdb)."""
    with ase.db.connect(tmp_path / "in.json") as db:
        for atoms in frames:
            db.write(atoms, key_value_pairs={"dft": float(atoms.get_potential_energy()) + 1.0})
    report = convert(tmp_path / "in.json", tmp_path / "json", keys=KeyMap(energy="dft"))
    assert report.written == len(frames) and report.labels["energy"] == "info['dft']"
    rng = np.random.default_rng(2)
    env_dir = tmp_path / "env.lmdb"
    env = lmdb.open(str(env_dir), map_size=1 << 26)  # subdir=True: env.lmdb/data.mdb
    with env.begin(write=True) as txn:
        for i, n in enumerate((3, 4)):
            txn.put(str(i).encode(), fake_pyg(NewData, oc20_fields(rng, n)))
    env.close()
    assert convert(env_dir, tmp_path / "from_env", allow_pickle=True).written == 2


def test_labels_from_reference_and_other_keys_are_pointed_out(tmp_path, frames):
    """REF_forces without REF_energy: the energy came from the calculator (another method's,
    perhaps) and the forces from REF_forces, silently."""
    for atoms in frames:
        atoms.arrays["REF_forces"] = atoms.get_forces(apply_constraint=False) * 2
    ase.io.write(tmp_path / "in.extxyz", frames)
    with pytest.warns(UserWarning, match=r"labels come from keys of two kinds \(energy from calculator\['energy'\], "
                                         r"forces from arrays\['REF_forces'\]"):
        convert(tmp_path / "in.extxyz", tmp_path / "out", keys=KeyMap(stress="none"))


def test_property_units(tmp_path, frames, capsys):
    """QM9's energies in Hartree: --energy-unit converted only the energy, and a property
    (U_0) was stored in Hartree without a word; NAME:UNIT converts it, and the summary says
    where each property came from and in what unit."""
    for k, atoms in enumerate(frames):
        atoms.calc = None
        atoms.info["U_0"] = -40.0 - 0.1 * k
        atoms.info["mu"] = 0.5 * k
    ase.io.write(tmp_path / "qm9.extxyz", frames)
    with pytest.warns(UserWarning, match="energy_unit Hartree converted nothing .*--property NAME:UNIT"):
        convert(tmp_path / "qm9.extxyz", tmp_path / "raw", keys=KeyMap(properties={"U_0": "U_0"}, energy_unit="Hartree"))
    assert main(["convert", str(tmp_path / "qm9.extxyz"), str(tmp_path / "ev"), "--property", "U_0:Hartree",
                 "--property", "dipole=mu", "--float32"]) == 0
    out = capsys.readouterr().out
    assert "  U_0 <- U_0, Hartree converted to eV\n" in out and "  dipole <- mu, as stored (no unit)\n" in out
    ds = LmdbDataset(tmp_path / "ev")
    assert ds.schema["U_0"]["unit"] == "eV" and ds.schema["dipole"]["unit"] == ""
    # An energy stays float64 under --float32 (U_0 ~ -1e4 eV: float32 rounds it by ~1 meV).
    assert ds.schema["U_0"]["dtype"] == "<f8" and ds.schema["dipole"]["dtype"] == "<f4"
    for k, entry in enumerate(ds):
        assert entry["U_0"].item() == pytest.approx((-40.0 - 0.1 * k) * units.Hartree, rel=1e-12)
        assert entry["dipole"].item() == pytest.approx(0.5 * k)
    with pytest.raises(ValueError, match=r"property 'U_0': unit 'Bohr' is not an energy unit"):
        KeyMap(properties={"U_0": "U_0"}, property_units={"U_0": "Bohr"})
    # No name, or one name twice: said so (an empty name was looked up as the key '').
    for args, message in [(["--property", ":eV"], "--property ':eV': no name"),
                          (["--property", "U_0:"], "--property 'U_0:': no unit after ':'"),
                          (["--property", "U_0", "--property", "U_0:Hartree"], "--property 'U_0:Hartree': 'U_0' given "
                                                                               "twice"),
                          # (a name the model could not name its head by failed only when training)
                          (["--property", "mu.x=mu"], "property 'mu.x': a target's name must be non-empty and "
                                                      "without '.'"),
                          (["--property", "train=mu"], "property 'train': 'train' is an attribute of torch's "
                                                       "nn.ModuleDict"),
                          (["--property", "dipole moment=mu"], "property 'dipole moment': it may not hold "
                                                               "whitespace, '=', ':' or '\"' (extxyz's syntax)")]:
        assert main(["convert", str(tmp_path / "qm9.extxyz"), str(tmp_path / "bad"), *args]) == 2
        assert message in capsys.readouterr().err
    # A frame without atoms is named as such (it read as "lacks forces, unlike the first entry").
    ase.io.write(tmp_path / "empty_frame.extxyz", [frames[0], Atoms()])
    with pytest.raises(DataError, match="structure 1: has no atoms"):
        convert(tmp_path / "empty_frame.extxyz", tmp_path / "empty_frame")


def test_a_stress_alone_is_pointed_out(tmp_path, frames):
    """A GAP file (dft_energy, dft_force, dft_virial) converted with the virial as its only
    label: no "no labels" warning, as there was one. Energy and forces dropped on purpose
    leave a stress alone without a word."""
    for atoms in frames:
        atoms.info["E"] = atoms.get_potential_energy()
        atoms.info["REF_stress"] = atoms.get_stress(voigt=False).reshape(-1)
        atoms.calc = None
    ase.io.write(tmp_path / "in.extxyz", frames)
    with pytest.warns(UserWarning, match=r"has only a stress \(info\['REF_stress'\]\): none found under the "
                                         r"usual keys \(REF_energy, energy, dft_energy, REF_forces, .*dft_forces; "
                                         r"the first entry's keys, available: info: E, REF_stress"):
        convert(tmp_path / "in.extxyz", tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        convert(tmp_path / "in.extxyz", tmp_path / "out2", keys=KeyMap(energy="none", forces="none"))


def test_y_is_no_energy_in_an_ase_source(tmp_path, fake_pyg):
    """MatBench-style files carry a property y (a band gap, a modulus): it was stored as the
    total energy (eV), and a matbench preset then asked for --property y. In OC20/JMP LMDBs y
    is the energy."""
    crystals = [Atoms("Si2", positions=[[0, 0, 0], [1.3, 1.3, 1.3]], cell=np.eye(3) * 5.4, pbc=True,
                      info={"y": 1.1 + k}) for k in range(3)]
    ase.io.write(tmp_path / "matbench.extxyz", crystals)
    with pytest.warns(UserWarning, match=r"has no labels: .*available: info: y"):
        report = convert(tmp_path / "matbench.extxyz", tmp_path / "out")
    assert report.labels == {} and "energy" not in LmdbDataset(tmp_path / "out").schema
    report = convert(tmp_path / "matbench.extxyz", tmp_path / "y", keys=KeyMap(properties={"y": "y"}))
    assert [entry["y"].item() for entry in LmdbDataset(tmp_path / "y")] == [1.1, 2.1, 3.1]


def test_stresses_in_another_unit_are_warned_of(tmp_path, frames):
    """A stress in kBar (VASP's) or GPa is 1600 or 160 times ASE's eV/Å^3: every check passed it."""
    ase.io.write(tmp_path / "ev.extxyz", frames)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        convert(tmp_path / "ev.extxyz", tmp_path / "ev")
    for atoms in frames:
        atoms.calc.results["stress"] = atoms.calc.results["stress"] / units.GPa * 10  # (kBar, of 0.01 eV/Å^3)
    ase.io.write(tmp_path / "kbar.extxyz", frames)
    with pytest.warns(UserWarning, match=r"kbar: \d of the 6 stresses have a component over 0.5 eV/Å\^3 \(80 GPa\)"):
        convert(tmp_path / "kbar.extxyz", tmp_path / "kbar")


def md_trajectory(rng, frames=5):
    """A molecule's trajectory as arrays: positions [M, n, 3] (Å), numbers [n], energies [M] (eV)
    and forces [M, n, 3] (eV/Å)."""
    numbers = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
    base = np.array([[0, 0, 0], [1.5, 0, 0], [2.2, 1.2, 0], [-0.5, 0.9, 0], [-0.5, -0.5, 0.8], [-0.5, -0.5, -0.8],
                     [1.9, -0.5, 0.8], [1.9, -0.5, -0.8], [3.1, 1.1, 0]], dtype=float)
    positions = base + rng.normal(scale=0.05, size=(frames, *base.shape))
    return positions, numbers, rng.normal(size=frames) - 4000.0, rng.normal(size=(frames, len(numbers), 3))


def test_sgdml_and_rmd17_npz_trajectories(tmp_path, capsys):
    """MD17, MD22 (sGDML's npz: R, z, E, F, with their units recorded) and rMD17 (coords,
    nuclear_charges, energies, forces, in kcal/mol) come as .npz files, which convert could not
    read: JMP's fine-tuning sets had to be rewritten as extxyz by hand, units included."""
    rng = np.random.default_rng(5)
    positions, numbers, energies, forces = md_trajectory(rng)
    kcal = units.kcal / units.mol
    np.savez(tmp_path / "md22.npz", R=positions, z=numbers.astype(np.uint8), E=(energies / kcal)[:, None],
             F=forces / kcal, e_unit=np.array("kcal/mol"), r_unit=np.array("Ang"), name=np.array("AT-AT"))
    np.savez(tmp_path / "rmd17.npz", coords=positions, nuclear_charges=numbers, energies=energies / kcal,
             forces=forces / kcal, old_energies=energies / kcal + 1.0, old_indices=np.arange(5))
    # sGDML records kcal/mol: read as eV it is refused, with the option that reads it right.
    with pytest.raises(DataError, match=r"md22\.npz records its e_unit as 'kcal/mol', but it is read as eV: give "
                                        r"--energy-unit kcal/mol"):
        convert(tmp_path / "md22.npz", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    for source, out in (("md22.npz", "md22"), ("rmd17.npz", "rmd17")):
        report = convert(tmp_path / source, tmp_path / out, keys=KeyMap(energy_unit="kcal/mol"))
        assert report.written == 5
        ds = LmdbDataset(tmp_path / out)
        for i in range(5):
            np.testing.assert_allclose(ds[i]["pos"], positions[i], rtol=1e-15)
            assert ds[i]["atomic_numbers"].tolist() == numbers.tolist() and ds[i]["tags"].tolist() == [2] * 9
            assert not ds[i]["pbc"].any() and not ds[i]["fixed"].any() and int(ds[i]["sid"]) == i
            assert float(ds[i]["energy"]) == pytest.approx(energies[i], rel=1e-14)
            np.testing.assert_allclose(ds[i]["forces"], forces[i], rtol=1e-13)
    assert report.labels == {"energy": "energies", "forces": "forces"}
    # rMD17 records no unit: read as eV it is warned of; another array is taken by name.
    with pytest.warns(UserWarning, match=r"rmd17\.npz is read in eV and Å: rMD17's files hold kcal/mol and Å"):
        convert(tmp_path / "rmd17.npz", tmp_path / "as_ev", keys=KeyMap(energy="old_energies", forces="none"))
    ds = LmdbDataset(tmp_path / "as_ev")
    assert "forces" not in ds.schema and float(ds[2]["energy"]) == pytest.approx(energies[2] / kcal + 1.0)
    # Through the command line, with sGDML's periodic lattice (and units stored as bytes).
    np.savez(tmp_path / "periodic.npz", R=positions, z=numbers, E=energies, F=forces, lattice=np.eye(3) * 12.0,
             e_unit=np.array(b"eV"), r_unit=np.array(b"Ang"))
    assert main(["convert", str(tmp_path / "periodic.npz"), str(tmp_path / "periodic")]) == 0
    entry = LmdbDataset(tmp_path / "periodic")[0]
    assert entry["pbc"].all() and np.allclose(entry["cell"], np.eye(3) * 12.0)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros(3)}, r"an \.npz of arrays x, in no layout convert reads \(sGDML's R, z, E, F; rMD17's coords, "
                         r"nuclear_charges, energies, forces\)"),
    ({"R": np.zeros((2, 4, 3)), "z": np.ones(3, int)}, r"R has shape \[2, 4, 3\], not \[frames, 3, 3\] for the 3 "
                                                       r"atoms of z"),
    ({"R": np.zeros((2, 3, 3)), "z": np.ones(3, int), "E": np.zeros(3)},
     r"energy \(E\) has shape \[3\], not \[2\] or \[2, 1\]"),
    # (the right number of values in another order: frames and atoms would be mixed up)
    ({"R": np.zeros((2, 3, 3)), "z": np.ones(3, int), "F": np.zeros((3, 2, 3))},
     r"forces \(F\) has shape \[3, 2, 3\], not \[2, 3, 3\]"),
    ({"R": np.zeros((2, 3, 3)), "z": np.ones(3, int), "lattice": np.zeros((2, 3, 3))},
     r"lattice has shape \[2, 3, 3\], not \[3, 3\]"),
    ({"R": np.zeros((2, 3, 3)), "z": np.ones(3, int), "E": np.zeros(2), "e_unit": np.array("furlong")},
     r"records its e_unit as 'furlong', a unit convert does not know"),
    ({"R": np.array([None] * 18, dtype=object).reshape(2, 3, 3), "z": np.ones(3, int)},
     r"numpy cannot read it as an \.npz of arrays \(ValueError: Object arrays cannot be loaded"),
])
def test_npz_files_convert_cannot_read_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(DataError, match=message):
        convert(tmp_path / "in.npz", tmp_path / "out", skip_invalid=True)
    assert not (tmp_path / "out").exists()


def write_conformations(path, layout: dict, groups: dict, rng):
    """An HDF5 file of conformation groups, {group path: frames}, in a layout {positions: name,
    energy: name, forces: name}; returns {group path: (numbers, positions, energies, forces)}."""
    h5py = pytest.importorskip("h5py")
    written = {}
    with h5py.File(path, "w") as f:
        for name, frames in groups.items():
            positions, numbers, energies, forces = md_trajectory(rng, frames)
            group = f.create_group(name)
            group["atomic_numbers"] = numbers.astype(np.int16)
            group[layout["positions"]] = positions
            group[layout["energy"]] = energies
            group[layout["forces"]] = forces
            written[name] = (numbers, positions, energies, forces)
    return written


def test_hdf5_conformations_of_ani1x_transition1x_and_spice(tmp_path):
    """JMP pretrains on ANI-1x and Transition1x and fine-tunes on SPICE, which all come as HDF5
    groups of a molecule's conformations, which convert could not read. Values are compared with
    what was written, in the sets' own units (ANI-1x Hartree and Å, SPICE Hartree and Bohr with
    a gradient, +dE/dx)."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(8)
    ani = write_conformations(tmp_path / "ani1x.h5", {"positions": "coordinates", "energy": "wb97x_dz.energy",
                                                      "forces": "wb97x_dz.forces"}, {"C2H6O": 3, "C2H6O_b": 2}, rng)
    report = convert(tmp_path / "ani1x.h5", tmp_path / "ani", keys=KeyMap(energy_unit="Hartree"))
    assert report.written == 5 and report.labels == {"energy": "wb97x_dz.energy", "forces": "wb97x_dz.forces"}
    ds, k = LmdbDataset(tmp_path / "ani"), 0
    for group, name in enumerate(sorted(ani)):
        numbers, positions, energies, forces = ani[name]
        for i in range(len(energies)):
            entry = ds[k]
            assert (int(entry["sid"]), int(entry["fid"])) == (group, i)  # (a molecule, a conformation of it)
            assert entry["atomic_numbers"].tolist() == numbers.tolist()
            np.testing.assert_allclose(entry["pos"], positions[i], rtol=1e-15)
            assert float(entry["energy"]) == pytest.approx(energies[i] * units.Hartree, rel=1e-14)
            np.testing.assert_allclose(entry["forces"], forces[i] * units.Hartree, rtol=1e-14)
            k += 1
    with pytest.warns(UserWarning, match=r"ani1x\.h5 is read in eV and Å: ANI-1x's files hold Hartree and Å"):
        convert(tmp_path / "ani1x.h5", tmp_path / "ani_forces", keys=KeyMap(energy="none"))  # (forces alone too)
    with pytest.warns(UserWarning, match=r"ani1x\.h5 is read in eV and Å: ANI-1x's files hold Hartree and Å"):
        convert(tmp_path / "ani1x.h5", tmp_path / "ani_ev")
    # SPICE: Bohr positions, a gradient (negated into forces); Hartree/Bohr converted with both units.
    spice = write_conformations(tmp_path / "spice.hdf5", {"positions": "conformations", "energy": "dft_total_energy",
                                                          "forces": "dft_total_gradient"}, {"mol 1": 2}, rng)
    report = convert(tmp_path / "spice.hdf5", tmp_path / "spice", keys=KeyMap(energy_unit="Hartree",
                                                                               length_unit="Bohr"))
    assert report.labels["forces"] == "dft_total_gradient (negated: a gradient)"
    numbers, positions, energies, gradient = spice["mol 1"]
    entry = LmdbDataset(tmp_path / "spice")[1]
    np.testing.assert_allclose(entry["pos"], positions[1] * units.Bohr, rtol=1e-14)
    np.testing.assert_allclose(entry["forces"], -gradient[1] * units.Hartree / units.Bohr, rtol=1e-14)
    # Transition1x: reactions nested under data; a split's group linking into data is read once,
    # and --select reads one group.
    t1x = write_conformations(tmp_path / "t1x.h5", {"positions": "positions", "energy": "wB97x_6-31G(d).energy",
                                                    "forces": "wB97x_6-31G(d).forces"},
                              {"data/C2H6O/rxn1": 2, "data/C2H6O/rxn2": 2, "data/CH4O/rxn3": 1}, rng)
    with h5py.File(tmp_path / "t1x.h5", "a") as f:
        f["train/C2H6O"] = f["data/C2H6O"]  # (a hard link, as Transition1x's split groups are)
        f["test/CH4O"] = f["data/CH4O"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (eV and Å: Transition1x's own units)
        assert convert(tmp_path / "t1x.h5", tmp_path / "t1x").written == 5
        assert convert(tmp_path / "t1x.h5", tmp_path / "t1x_test", select="test").written == 1
    assert float(LmdbDataset(tmp_path / "t1x_test")[0]["energy"]) == pytest.approx(t1x["data/CH4O/rxn3"][2][0])
    assert main(["convert", str(tmp_path / "t1x.h5"), str(tmp_path / "cli"), "--select", "train"]) == 0
    assert len(LmdbDataset(tmp_path / "cli")) == 4


def test_hdf5_files_convert_cannot_read_are_named(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "none.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match=r"none\.h5: no group holds atomic_numbers and positions \(coordinates, "):
        convert(tmp_path / "none.h5", tmp_path / "out")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["m/atomic_numbers"] = np.array([1, 1])
        f["m/coordinates"] = np.zeros((2, 3, 3))
    with pytest.raises(DataError, match=r"bad\.h5:/m: coordinates has shape \[2, 3, 3\], not \[frames, 2, 3\]"):
        convert(tmp_path / "bad.h5", tmp_path / "out", skip_invalid=True)
    with pytest.raises(DataError, match=r"bad\.h5: no group 'data' to select \(its top level: m\)"):
        convert(tmp_path / "bad.h5", tmp_path / "out", select="data")
    with h5py.File(tmp_path / "spice.h5", "w") as f:
        f["m/atomic_numbers"] = np.array([1, 1])
        f["m/conformations"] = np.array([[[0, 0, 0], [0.74, 0, 0]]])
    with pytest.raises(DataError, match=r"spice\.h5:/m: energy: dataset 'formation_energy' not found \(available: "
                                        r"atomic_numbers, conformations\)"):
        convert(tmp_path / "spice.h5", tmp_path / "out", keys=KeyMap(energy="formation_energy"))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match=r"text\.h5: h5py cannot read it"):
        convert(tmp_path / "text.h5", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hdf5_layouts_as_released(tmp_path):
    """What the first reader missed of the real files: Transition1x's reaction groups hold
    reactant, product and transition_state subgroups (its loader reads the first two and the
    path); SPICE's datasets record their units; --select may name a conformation group; a
    NaN-labelled first frame, skipped, left the labels unrecorded; properties were ignored."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(9)
    layout = {"positions": "positions", "energy": "wB97x_6-31G(d).energy", "forces": "wB97x_6-31G(d).forces"}
    write_conformations(tmp_path / "t1x.h5", layout, {"data/CH4O/rxn1": 3, "data/CH4O/rxn1/reactant": 1,
                                                      "data/CH4O/rxn1/product": 1,
                                                      "data/CH4O/rxn1/transition_state": 1, "data/CH4O/rxn2": 2},
                        rng)
    assert convert(tmp_path / "t1x.h5", tmp_path / "t1x").written == 7  # (path 3, product, reactant; path 2)
    # A reaction's reactant and product (its path's end frames) are its own: one sid, so that
    # split --group-by sid keeps them in one part (they were sids of their own, which put a
    # path's end geometries in train and test both).
    assert [(int(e["sid"]), int(e["fid"])) for e in LmdbDataset(tmp_path / "t1x")] == [(0, 0), (0, 1), (0, 2),
                                                                                     (0, 3), (0, 4), (1, 0), (1, 1)]
    assert convert(tmp_path / "t1x.h5", tmp_path / "rxn", select="data/CH4O/rxn1/reactant").written == 1
    convert(tmp_path / "t1x.h5", tmp_path / "rxn1", select="data/CH4O/rxn1")
    assert [(int(e["sid"]), int(e["fid"])) for e in LmdbDataset(tmp_path / "rxn1")] == [(0, k) for k in range(5)]
    with h5py.File(tmp_path / "root.h5", "w") as f:  # (the file's root is the group; "-end" sorts before ".")
        for group in (f, f.create_group("-end")):
            group["atomic_numbers"] = np.array([1, 1])
            group["coordinates"] = np.array([[[0, 0, 0], [0.74, 0, 0]]])
            group["wb97x_dz.energy"] = np.array([-1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (ANI-1x's units: eV here)
        convert(tmp_path / "root.h5", tmp_path / "root")
    assert [(int(e["sid"]), int(e["fid"])) for e in LmdbDataset(tmp_path / "root")] == [(0, 0), (0, 1)]
    # SPICE records units: Bohr positions read as Å are refused, with the option to give.
    layout = {"positions": "conformations", "energy": "dft_total_energy", "forces": "dft_total_gradient"}
    write_conformations(tmp_path / "spice.h5", layout, {"mol": 2}, rng)
    with h5py.File(tmp_path / "spice.h5", "a") as f:
        f["mol/conformations"].attrs["units"] = "bohr"
        f["mol/dft_total_energy"].attrs["units"] = "hartree"
    with pytest.raises(DataError, match=r"spice\.h5:/mol/conformations records its units as 'bohr', but it is read "
                                        r"as Å: give --length-unit Bohr"):
        convert(tmp_path / "spice.h5", tmp_path / "spice", keys=KeyMap(energy_unit="Hartree"))
    with pytest.raises(DataError, match=r"dft_total_energy records its units as 'hartree', but it is read as eV: "
                                        r"give --energy-unit Hartree"):
        convert(tmp_path / "spice.h5", tmp_path / "spice", keys=KeyMap(length_unit="Bohr"))
    with h5py.File(tmp_path / "spice.h5", "a") as f:  # (the forces' unit was not checked)
        f["mol/dft_total_gradient"].attrs["units"] = "hartree/angstrom"
    with pytest.raises(DataError, match=r"dft_total_gradient records its units as 'hartree/angstrom', but it is read as "
                                        r"Hartree/Bohr: give --energy-unit Hartree --length-unit Å, if its positions are "
                                        r"in Å too \(forces in another length unit than the positions' are not"):
        convert(tmp_path / "spice.h5", tmp_path / "spice", keys=KeyMap(energy_unit="Hartree", length_unit="Bohr"))
    with h5py.File(tmp_path / "spice.h5", "a") as f:
        f["mol/dft_total_gradient"].attrs["units"] = "hartree / bohr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (units recorded and matched: nothing to warn of)
        convert(tmp_path / "spice.h5", tmp_path / "spice", keys=KeyMap(energy_unit="Hartree", length_unit="Bohr"))
    with pytest.raises(DataError, match=r"read for an energy and forces only \(no stress or properties"):
        convert(tmp_path / "spice.h5", tmp_path / "p", keys=KeyMap(properties={"fe": "formation_energy"}))
    # A first conformation without its label (NaN, as ANI-1x's less complete datasets hold), skipped.
    written = write_conformations(tmp_path / "nan.h5", {"positions": "coordinates", "energy": "wb97x_dz.energy",
                                                        "forces": "wb97x_dz.forces"}, {"m": 3}, rng)
    with h5py.File(tmp_path / "nan.h5", "a") as f:
        f["m/wb97x_dz.energy"][0] = np.nan
    numbers, positions, energies, forces = written["m"]
    np.savez(tmp_path / "nan.npz", R=positions, z=numbers, E=np.where(np.arange(3) == 0, np.nan, energies), F=forces)
    for source in ("nan.h5", "nan.npz"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (ANI-1x's units: eV here)
            report = convert(tmp_path / source, tmp_path / source.replace(".", "_"), skip_invalid=True)
        assert report.written == 2 and len(report.skipped) == 1 and set(report.labels) == {"energy", "forces"}
        assert LmdbDataset(tmp_path / source.replace(".", "_")).info["labels"].keys() == {"energy", "forces"}
    # A provenance names the first 100 entries skipped, and counts them all.
    with h5py.File(tmp_path / "nans.h5", "w") as f:
        f["m/atomic_numbers"] = numbers
        f["m/coordinates"] = np.repeat(positions[:1], 150, axis=0)
        f["m/wb97x_dz.energy"] = np.r_[np.full(149, np.nan), 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        convert(tmp_path / "nans.h5", tmp_path / "nans", skip_invalid=True)
    info = LmdbDataset(tmp_path / "nans").info
    assert len(info["skipped"]) == 100 and info["skipped_count"] == 149 and "frame 0:" in info["skipped"][0]
