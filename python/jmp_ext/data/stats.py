"""Dataset statistics for normalisation: linear reference energies, target mean/std, force RMS,
atom-count histogram. Computed on a training split and cached in its directory as stats.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jmp_ext.data import format as fmt
from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.writer import write_file_atomic

STATS_VERSION = 1
# Per-atom fields and inputs are not regression targets of a structure.
_NOT_TARGETS = fmt.ATOM_FIELDS | {"cell", "pbc", "sid", "fid"}


def compute_stats(dataset: LmdbDataset, progress: bool = False) -> dict:
    """Scan a dataset and return its statistics.

    Returns a dict:
        num_entries: int
        linref: float64 [119] (present when the data has `energy`): per-element reference
            energies in eV, the least-squares fit of energy on element counts (zeros for elements
            absent from the data); E_ref(structure) = sum(linref[Z_i])
        targets: {name: {"mean", "std"}} for energy (after subtracting the references) and every
            other per-structure label (per component for vectors and stress), in its units
        force_rms: float, eV/Å, sqrt(mean F^2) over atoms and components (when there are forces)
        natoms_hist: int64 [max_natoms+1], the number of structures with each atom count
        avg_natoms: float
    """
    labels = [name for name in dataset.schema if name not in _NOT_TARGETS]
    counts = np.zeros((len(dataset), fmt.MAX_Z + 1))
    values: dict[str, list[np.ndarray]] = {name: [] for name in labels}
    force_sq, force_n = 0.0, 0
    for i in tqdm(range(len(dataset)), disable=not progress, desc=f"stats {dataset.path}",
                  unit="entry"):
        entry = dataset.read(i)
        counts[i] = np.bincount(entry["atomic_numbers"], minlength=fmt.MAX_Z + 1)
        for name in labels:
            values[name].append(entry[name].astype(np.float64))
        if "forces" in entry:
            forces = entry["forces"].astype(np.float64)
            force_sq += float(np.square(forces).sum())
            force_n += forces.size
    stats: dict = {"version": STATS_VERSION, "num_entries": len(dataset), "targets": {}}
    arrays = {name: np.stack(v) for name, v in values.items()}
    if "energy" in arrays:
        present = counts.any(axis=0)
        # lstsq gives the minimum-norm solution when element counts are collinear (a single
        # composition, as in an MD trajectory): the residual is still exact on the data.
        coeff = np.linalg.lstsq(counts[:, present], arrays["energy"], rcond=None)[0]
        linref = np.zeros(fmt.MAX_Z + 1)
        linref[present] = coeff
        stats["linref"] = linref
        arrays["energy"] = arrays["energy"] - counts @ linref
    for name, array in arrays.items():
        stats["targets"][name] = {"mean": array.mean(axis=0), "std": array.std(axis=0)}
    if force_n:
        stats["force_rms"] = float(np.sqrt(force_sq / force_n))
    stats["natoms_hist"] = np.bincount(dataset.natoms)
    stats["avg_natoms"] = float(dataset.natoms.mean())
    return stats


def save_stats(dataset_dir: str | Path, stats: dict) -> Path:
    """Cache statistics in a dataset directory (atomically)."""
    file = Path(dataset_dir) / fmt.STATS_FILE
    write_file_atomic(file, json.dumps(_to_json(stats), indent=1).encode())
    return file


def share_train_stats(train_dir: str | Path, other_dirs, progress: bool = False) -> dict:
    """Compute a train split's statistics and cache them in it and in its sibling splits
    (validation and test targets are normalised with the training statistics)."""
    stats = compute_stats(LmdbDataset(train_dir), progress=progress)
    stats["source"] = str(Path(train_dir).name)
    for directory in [train_dir, *other_dirs]:
        save_stats(directory, stats)
    return stats


def load_stats(dataset_dir: str | Path, recompute: bool = False, progress: bool = False) -> dict:
    """Statistics of a dataset directory: the cached stats.json, computed and cached if missing.

    Arrays come back as numpy arrays (linref float64 [119], natoms_hist int64, vector means).
    Val/test splits made by make_demo or `split` hold the statistics of their train split.
    """
    file = Path(dataset_dir) / fmt.STATS_FILE
    if recompute or not file.is_file():
        stats = compute_stats(LmdbDataset(dataset_dir), progress=progress)
        save_stats(dataset_dir, stats)
        return stats
    stats = fmt.read_json(file)
    if stats.get("version") != STATS_VERSION:
        raise fmt.DataError(f"{file}: statistics version {stats.get('version')} is not "
                            f"{STATS_VERSION}; recompute with `python -m jmp_ext.data stats "
                            f"{dataset_dir} --recompute`")
    return _from_json(stats)


def _to_json(value):
    if isinstance(value, dict):
        return {key: _to_json(v) for key, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json(stats: dict) -> dict:
    stats = dict(stats)
    if "linref" in stats:
        stats["linref"] = np.asarray(stats["linref"], dtype=np.float64)
    stats["natoms_hist"] = np.asarray(stats["natoms_hist"], dtype=np.int64)
    stats["targets"] = {name: {k: np.asarray(v, dtype=np.float64) if isinstance(v, list) else v
                               for k, v in target.items()}
                        for name, target in stats["targets"].items()}
    return stats
