"""Built-in multi-domain demo data labelled with ASE's EMT calculator.

The JMP datasets are tens of gigabytes; these are small but honest stand-ins, generated
deterministically from a seed in seconds on a laptop CPU:

    catalysis  adsorbates (H, C, N, O and fragments) on fcc(111)/(100) slabs of Al, Cu, Ag, Au,
               Ni, Pd, Pt: frames along FIRE relaxations; 27-atom slabs + adsorbate, periodic
               with vacuum, OC20 tags (0 sub-surface, 1 surface, 2 adsorbate), bottom two
               layers fixed; energy, forces. Split by trajectory.
    molecules  H/C/N/O molecules (3-12 atoms) in rattled and 600 K Langevin conformations,
               non-periodic, tags 2; energy, forces.
    materials  bulk fcc alloys (4-32 atoms) of random composition, strain and rattle; energy,
               energy_per_atom, forces, stress. Held out from pretraining (a fine-tuning task).
    md         one Langevin trajectory of ethanol at 500 K (as in rMD17); energy, forces.

EMT is a toy potential for C, H, N and O, so the molecular labels are not chemistry, but they
are smooth, conservative and exactly reproducible, which is what training tests need.
Every entry has sid (system / trajectory id) and fid (frame index).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.data import atomic_numbers, reference_states
from ase.md.langevin import Langevin
from ase.optimize import FIRE
from ase.units import fs, kB
from tqdm import tqdm

from jmp_ext.data import format as fmt
from jmp_ext.data.convert import atoms_structure
from jmp_ext.data.stats import share_train_stats
from jmp_ext.data.writer import DatasetWriter, dataset_meta
from jmp_ext.files import write_bytes_atomic

DOMAINS = ("catalysis", "molecules", "materials", "md")
SPLITS = ("train", "val", "test")
DEMO_VERSION = 4  # bump whenever the generated data change
MARKER = "demo.json"
# Entries per domain at scale 1; make_demo(scale=...) multiplies them.
SIZES = {"catalysis": 400, "molecules": 300, "materials": 300, "md": 400}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
ADSORBATES = ("H", "O", "N", "C", "OH", "CO", "NO", "CH", "NH", "CH2_s1A1d", "NH2", "CH3", "H2O")
MOLECULES = ("H2O", "NH3", "CH4", "CO2", "HCN", "H2CO", "CH3OH", "HCOOH", "C2H2", "C2H4", "C2H6",
             "CH3CHO", "CH3CH2OH", "CH3CN", "H3CNH2", "N2H4", "H2O2", "CH3COOH", "CH3OCH3",
             "CH3CONH2", "CH3NO2", "C3H8", "C4H4O", "C4H4NH", "C6H6")
FRAMES_PER_RELAXATION = 8


def make_demo(root: str | Path, seed: int = 0, scale: float = 1.0, progress: bool = False) -> Path:
    """Generate the demo datasets under root/<domain>/{train,val,test}; return root.

    Idempotent: if root/demo.json says the complete data for this seed and scale is there, it
    returns at once. Each split is written atomically with its train split's statistics
    (stats.json), and demo.json last, so an interrupted run is redone, never half-used.
    Only data that make_demo wrote may be replaced: anything else at root/<domain>/<split> is
    a FileExistsError, raised before any is written. Call it from one process (rank 0 under
    DDP) while the others wait.
    """
    # Checked before anything is written: inf and NaN failed in round() once the directory
    # was made, and a negative scale passed for the smallest one.
    if not 0 < scale < math.inf:
        raise ValueError(f"make_demo: scale must be a finite positive number, got {scale}")
    root = Path(root)
    request = {"version": DEMO_VERSION, "seed": seed, "scale": scale}
    marker = root / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if all(done.get(k) == v for k, v in request.items()) and _complete(root):
            return root
    foreign = [root / d / s for d in DOMAINS for s in SPLITS if (root / d / s).exists()
               and not _made_by_demo(root / d / s, d, s)]
    if foreign:
        raise FileExistsError(f"make_demo would replace {', '.join(map(str, foreign))}, which "
                              "it did not make (another dataset, or demo data of an older jmp_ext): "
                              "choose another directory for the demo data, or move them away")
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # the old marker must not vouch for half-replaced data
    counts = {}
    for i, domain in enumerate(tqdm(DOMAINS, desc="demo data", unit="domain", disable=not progress)):
        rng = np.random.default_rng([seed, i])
        size = max(10, round(SIZES[domain] * scale))
        frames = GENERATORS[domain](rng, size)
        info = {**request, "domain": domain, "labels": "ASE EMT"}
        counts[domain] = _write_domain(root / domain, frames, rng, info, progress)
    write_bytes_atomic(marker, json.dumps({**request, "entries": counts}, indent=1).encode())
    return root


def _complete(root: Path) -> bool:
    return all((root / d / s / fmt.META_FILE).is_file() and (root / d / s / fmt.STATS_FILE).is_file()
               for d in DOMAINS for s in SPLITS)


def _made_by_demo(path: Path, domain: str, split: str) -> bool:
    info = (dataset_meta(path) or {}).get("info")
    return (isinstance(info, dict) and info.get("labels") == "ASE EMT"
            and info.get("domain") == domain and info.get("split") == split)


def _write_domain(path: Path, frames: list[dict], rng: np.random.Generator, info: dict,
                  progress: bool) -> dict[str, int]:
    """Split frames by sid (whole trajectories stay in one split), write, add train stats."""
    groups = np.unique([f["sid"] for f in frames])
    groups = groups[rng.permutation(len(groups))]
    # Every split gets at least one group (generators make at least three).
    n_val = max(1, round(SPLIT_FRACTIONS[1] * len(groups)))
    n_train = len(groups) - n_val - max(1, round(SPLIT_FRACTIONS[2] * len(groups)))
    split_of = {int(g): ("train" if k < n_train else "val" if k < n_train + n_val else "test")
                for k, g in enumerate(groups)}
    counts = {}
    for split in SPLITS:
        # make_demo has checked that only its own data are there to replace.
        with DatasetWriter(path / split, overwrite=True, info={**info, "split": split}) as writer:
            for frame in frames:
                if split_of[int(frame["sid"])] == split:
                    writer.add(frame)
            counts[split] = len(writer)
    share_train_stats(path / "train", [path / "val", path / "test"], progress=progress)
    return counts


def _entry(atoms: Atoms, sid: int, fid: int, stress: bool = False) -> dict:
    """Label a structure with its attached calculator and turn it into an entry: its structure
    fields as convert reads them from Atoms (tags, FixAtoms), copied, as the optimisers and MD
    move the atoms in place."""
    entry = {name: np.array(value) for name, value in atoms_structure(atoms).items()}
    entry.update(energy=atoms.get_potential_energy(),
                 # Raw forces: the FixAtoms constraint would zero them on fixed atoms, hiding the labels.
                 forces=atoms.get_forces(apply_constraint=False), sid=sid, fid=fid)
    if stress:
        entry["stress"] = atoms.get_stress(voigt=False)
        entry["energy_per_atom"] = entry["energy"] / len(atoms)
    return entry


def _catalysis(rng: np.random.Generator, size: int) -> list[dict]:
    frames, sid = [], 0
    while len(frames) < size or sid < 3:
        metal = METALS[rng.integers(len(METALS))]
        build = fcc111 if rng.random() < 0.5 else fcc100
        slab = build(metal, size=(3, 3, 3), vacuum=7.0, periodic=True)
        # ase.build tags layers 1 (top) .. 3 (bottom); OC20: 1 surface, 0 sub-surface.
        layer = slab.get_tags()
        fixed = layer >= 2
        adsorbate = molecule(ADSORBATES[rng.integers(len(ADSORBATES))])
        adsorbate.rotate(rng.uniform(0, 360), rng.normal(size=3) + 1e-3, center="COP")
        xy = rng.uniform(0, 1, 2) @ slab.cell.array[:2, :2]
        # Anchor the rotated adsorbate by its lowest atom, so that no atom starts closer than
        # `height` to the top layer's plane. Anchored by atom 0, a rotation could push others
        # into the surface: initial frames with forces up to 360 eV/Å, as no OC20 placement has.
        lowest = int(adsorbate.positions[:, 2].argmin())
        add_adsorbate(slab, adsorbate, height=rng.uniform(1.6, 2.6), position=tuple(xy),
                      mol_index=lowest)
        n_ads = len(adsorbate)
        slab.set_tags(np.concatenate([np.where(layer == 1, 1, 0), np.full(n_ads, 2)]))
        slab.set_constraint(FixAtoms(mask=np.concatenate([fixed, np.zeros(n_ads, bool)])))
        slab.calc = EMT()
        trajectory = []
        # FIRE needs no linear algebra per step (BFGS's eigh dominates on small busy CPUs).
        optimizer = FIRE(slab, logfile=None, maxstep=0.1)
        optimizer.attach(lambda: trajectory.append(_entry(slab, sid, len(trajectory))))
        optimizer.run(fmax=0.05, steps=20)  # the early, informative part of the relaxation
        keep = np.unique(np.linspace(0, len(trajectory) - 1, FRAMES_PER_RELAXATION).round().astype(int))
        frames += [trajectory[k] for k in keep]
        sid += 1
    return frames  # whole trajectories: about `size` frames


def _molecules(rng: np.random.Generator, size: int) -> list[dict]:
    frames = []
    for sid in range(size):
        atoms = molecule(MOLECULES[rng.integers(len(MOLECULES))])
        atoms.calc = EMT()
        if rng.random() < 0.5:
            atoms.positions += rng.normal(scale=rng.uniform(0.03, 0.15), size=atoms.positions.shape)
        else:
            _thermalize(atoms, 600, rng)
            Langevin(atoms, 0.5 * fs, temperature_K=600, friction=0.02, fixcm=False, rng=rng).run(
                int(rng.integers(5, 20)))
        frames.append(_entry(atoms, sid, 0))
    return frames


def _materials(rng: np.random.Generator, size: int) -> list[dict]:
    frames = []
    repeats = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)]
    for sid in range(size):
        elements = rng.choice(METALS, size=rng.integers(1, 4), replace=False)
        repeat = repeats[rng.choice(len(repeats), p=[0.3, 0.3, 0.25, 0.15])]
        a = np.mean([reference_states[atomic_numbers[e]]["a"] for e in elements])  # Vegard
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
        atoms.numbers = [atomic_numbers[e] for e in rng.choice(elements, size=len(atoms))]
        strain = np.eye(3) + rng.normal(scale=0.02, size=(3, 3)) + np.eye(3) * rng.uniform(-0.03, 0.03)
        atoms.set_cell(atoms.cell.array @ (strain + strain.T) / 2, scale_atoms=True)
        atoms.positions += rng.normal(scale=rng.uniform(0.02, 0.1), size=atoms.positions.shape)
        atoms.calc = EMT()
        frames.append(_entry(atoms, sid, 0, stress=True))
    return frames


def _md(rng: np.random.Generator, size: int) -> list[dict]:
    atoms = molecule("CH3CH2OH")
    atoms.calc = EMT()
    _thermalize(atoms, 500, rng)
    dynamics = Langevin(atoms, 0.5 * fs, temperature_K=500, friction=0.02, fixcm=False,
                         rng=rng)
    dynamics.run(100)  # equilibrate
    frames = []
    for fid in range(size):
        dynamics.run(4)
        # sid = fid: frames of one trajectory are split at random, as rMD17 is.
        frames.append(_entry(atoms, fid, fid))
    return frames


def _thermalize(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta (written out: ASE renamed its helper between versions)."""
    sigma = np.sqrt(atoms.get_masses() * kB * temperature_K)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * sigma[:, None])


GENERATORS = {"catalysis": _catalysis, "molecules": _molecules, "materials": _materials, "md": _md}
