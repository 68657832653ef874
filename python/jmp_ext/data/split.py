"""Split a dataset into named parts (train/val/test) by seeded fractions or an index file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.stats import share_train_stats
from jmp_ext.data.writer import DatasetWriter, check_target


def fraction_indices(num_entries: int, fractions: dict[str, float], seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """Disjoint random parts of range(num_entries) with the given fractions (summing to <= 1).

    Part sizes come from rounding cumulative fractions, so they add up exactly; the same seed
    gives the same parts.
    """
    values = np.array(list(fractions.values()), dtype=np.float64)
    if (values < 0).any() or values.sum() > 1 + 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to at most 1, got {fractions}")
    bounds = np.round(np.concatenate([[0], np.cumsum(values)]) * num_entries).astype(np.int64)
    order = np.random.default_rng(seed).permutation(num_entries)
    return {name: np.sort(order[bounds[k]:bounds[k + 1]]) for k, name in enumerate(fractions)}


def read_index_file(file: str | Path, num_entries: int) -> dict[str, np.ndarray]:
    """Parts from a JSON file {"train": [i, ...], ...} or an .npz of int arrays named by part."""
    file = Path(file)
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as npz:
            parts = {name: npz[name] for name in npz.files}
    else:
        parts = {name: np.asarray(v) for name, v in json.loads(file.read_text()).items()}
    seen: dict[int, str] = {}
    for name, indices in parts.items():
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"{file}: part {name!r} must be a list of integer indices")
        bad = indices[(indices < 0) | (indices >= num_entries)]
        if bad.size:
            raise ValueError(f"{file}: part {name!r} has index {bad[0]} outside the dataset's "
                             f"{num_entries} entries")
        for i in indices.tolist():
            if i in seen:
                raise ValueError(f"{file}: index {i} is in both {seen[i]!r} and {name!r}")
            seen[i] = name
        parts[name] = indices.astype(np.int64)
    return parts


def split_dataset(src: str | Path, out_dir: str | Path, parts: dict[str, np.ndarray],
                  overwrite: bool = False, progress: bool = False) -> dict[str, Path]:
    """Write out_dir/<part> for every part (entries in the given order); when there is a
    "train" part, its statistics are computed and cached in every part.

    Every part is checked (non-empty, its directory free or replaceable) before anything is
    written, so a bad request never leaves some parts written and others not.
    """
    source = LmdbDataset(src)
    out_dir = Path(out_dir)
    for name, indices in parts.items():
        if len(indices) == 0:
            raise ValueError(f"split of {src}: part {name!r} would be empty ({len(source)} "
                             "entries in all); give it a larger fraction or leave it out")
        # --overwrite would replace the source with its own part, and read the rest from nothing.
        if (out_dir / name).exists() and (out_dir / name).samefile(src):
            raise ValueError(f"split of {src}: part {name!r} would be written to {out_dir / name}, "
                             "which is the source itself; choose another output directory")
        check_target(out_dir / name, overwrite)
    units = {name: field["unit"] for name, field in source.schema.items()}
    paths = {}
    for name, indices in parts.items():
        with DatasetWriter(out_dir / name, shard_size=_shard_size(source),
                           float_dtype=_float_dtype(source), units=units,
                           overwrite=overwrite) as writer:
            for i in tqdm(indices.tolist(), disable=not progress, desc=f"{name}", unit="entry"):
                writer.add(source.read(i), where=f"{src} entry {i}")
        paths[name] = out_dir / name
    if "train" in paths:
        share_train_stats(paths["train"], [p for n, p in paths.items() if n != "train"],
                          progress=progress)
    return paths


def _shard_size(dataset: LmdbDataset) -> int:
    return max(1, int(np.max(np.diff(dataset._offsets))))


def _float_dtype(dataset: LmdbDataset) -> np.dtype:
    return np.dtype(dataset.schema["pos"]["dtype"])
