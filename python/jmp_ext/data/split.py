"""Split a dataset into named parts (train/val/test) by seeded fractions or an index file."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.stats import share_train_stats, warn_outliers
from jmp_ext.data.writer import DatasetWriter, check_target, dataset_meta
from jmp_ext.files import fsync_dir
from jmp_ext.warn import warn_user


def parse_fractions(text: str) -> dict[str, float]:
    """{name: fraction} from "train=0.8,val=0.1,test=0.1" (the CLI's --fractions).

    A name given twice is an error, not the last of them silently (a dict keeps one).
    """
    fractions: dict[str, float] = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        name = name.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = None
        if not equals or fraction is None:
            raise ValueError(f"--fractions {text!r}: {item!r} is not NAME=FRACTION "
                             "(e.g. train=0.8,val=0.1,test=0.1)")
        if name in fractions:
            raise ValueError(f"--fractions {text!r}: part {name!r} is given twice")
        fractions[name] = fraction
    return fractions


def fraction_indices(num_entries: int, fractions: dict[str, float], seed: int = 0,
                     groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Disjoint random parts of range(num_entries) with the given fractions (summing to <= 1).

    Part sizes come from rounding cumulative fractions, so they add up exactly; the same seed
    gives the same parts. groups [num_entries] (e.g. OC20's sid: the frames of one relaxation)
    keeps the entries of a group in one part: the fractions are then of the groups, and a part's
    entries those of its groups.
    """
    for name, fraction in fractions.items():
        if not 0 < fraction <= 1:  # (NaN too)
            raise ValueError(f"part {name!r} has fraction {fraction}; a fraction is a number in "
                             "(0, 1]")
    values = np.array(list(fractions.values()), dtype=np.float64)
    if values.sum() > 1 + 1e-9:
        raise ValueError(f"fractions must sum to at most 1, got {fractions}")
    group_of = np.arange(num_entries) if groups is None else np.unique(groups, return_inverse=True)[1].reshape(-1)
    num_groups = int(group_of.max()) + 1 if num_entries else 0
    bounds = np.round(np.concatenate([[0], np.cumsum(values)]) * num_groups).astype(np.int64)
    order = np.random.default_rng(seed).permutation(num_groups)
    if groups is not None:
        empty = [name for k, name in enumerate(fractions) if bounds[k] == bounds[k + 1]]
        if empty:
            raise ValueError(f"part {empty[0]!r} would get none of the {num_groups} group(s) the entries form; give "
                             "it a larger fraction or leave it out")
        if num_groups == num_entries:
            warn_user(f"each of the {num_entries} entries is a group of its own: the split is that of the entries "
                      "(convert numbers sids by frame when the source gives none)")
    return {name: np.flatnonzero(np.isin(group_of, order[bounds[k]:bounds[k + 1]]))
            for k, name in enumerate(fractions)}


def group_labels(dataset: LmdbDataset, field: str, progress: bool = False) -> np.ndarray:
    """Every entry's value of the integer per-structure `field` (sid: fraction_indices' groups).
    Decodes every entry: about 20 us each for demo-sized structures, a minute or so for 2M."""
    schema = dataset.schema.get(field)
    if schema is None or schema["shape"] != [] or np.dtype(schema["dtype"]).kind not in "iu":
        fields = [name for name, f in dataset.schema.items() if f["shape"] == [] and np.dtype(f["dtype"]).kind in "iu"]
        raise ValueError(f"--group-by {field}: {dataset.path} has no integer field {field!r} per structure "
                         f"(it has: {', '.join(fields) or 'none'})")
    entries = tqdm(range(len(dataset)), disable=not progress, desc=f"reading {field}", unit="entry")
    return np.array([int(dataset.read(i)[field]) for i in entries], dtype=np.int64)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a part named twice is an error (json keeps the last silently)."""
    names = [name for name, _ in pairs]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"part(s) {twice} given twice")
    return dict(pairs)


def read_index_file(file: str | Path, num_entries: int) -> dict[str, np.ndarray]:
    """Parts from a JSON file {"train": [i, ...], ...} or an .npz of int arrays named by part."""
    file = Path(file)
    if file.suffix == ".npz":
        try:  # (opened here: np.load leaves a file it opened open when the zip is damaged)
            with open(file, "rb") as f, np.load(f, allow_pickle=False) as npz:
                parts = {name: npz[name] for name in npz.files}
        except (zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{file}: not a readable .npz index file ({type(e).__name__}: {e})") from None
    else:
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not a JSON index file ({e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f'{file} must hold a JSON object {{"train": [indices], ...}}, got a '
                             f"{type(loaded).__name__}")
        parts = {name: np.asarray(v) for name, v in loaded.items()}
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

    All or nothing, since parts of two splits side by side share entries: every part is
    checked (a plain directory name, non-empty, its directory free or replaceable) before
    anything is written; the parts are written into a hidden directory in out_dir and moved
    into place together at the end, and a failure or an interrupt before that leaves out_dir
    as it was (not even created). out_dir may hold no jmp_ext dataset other than the parts and
    the source: one of them could be a part of an older or an interrupted split, and is not
    ours to delete. An interrupt while the replaced parts are deleted, once the new ones are in
    place, is a KeyboardInterrupt that says so.
    """
    source = LmdbDataset(src)
    out_dir = Path(out_dir)
    if source.path.resolve() in (out_dir.resolve(), *out_dir.resolve().parents):
        raise ValueError(f"split of {src}: the parts would be written inside the source dataset ({out_dir}); choose "
                         "an output directory outside it")
    for name, indices in parts.items():
        # "" would write out_dir itself, "../x" outside it; hidden names are for temporaries.
        if not name or name.startswith(".") or Path(name).name != name:
            raise ValueError(f"split of {src}: part name {name!r} is not a plain directory name "
                             "(non-empty, without '/', not starting with '.')")
        if len(indices) == 0:
            raise ValueError(f"split of {src}: part {name!r} would be empty ({len(source)} "
                             "entries in all); give it a larger fraction or leave it out")
        # --overwrite would replace the source with its own part, and read the rest from nothing.
        if (out_dir / name).exists() and (out_dir / name).samefile(src):
            raise ValueError(f"split of {src}: part {name!r} would be written to {out_dir / name}, "
                             "which is the source itself; choose another output directory")
        check_target(out_dir / name, overwrite)
    # A killed split leaves its directory, which may hold old parts it had moved aside.
    left = sorted(map(str, out_dir.glob(".split-*")))
    if left:
        warn_user(f"{', '.join(left)}: left by an interrupted split into {out_dir} (old "
                  "parts it had moved aside are in its 'old', parts it had replaced in its "
                  "'replaced'); delete them unless another split into it is running")
    # With or without --overwrite: a split killed while moving parts leaves some old parts in
    # out_dir, which a split writing other parts would leave beside its own.
    if out_dir.is_dir():
        others = sorted(path.name for path in out_dir.iterdir() if path.name not in parts
                        and not path.name.startswith(".") and dataset_meta(path) is not None
                        and not path.samefile(src))
        if others:
            raise FileExistsError(
                f"{out_dir} also holds the dataset(s) {', '.join(others)}, which this split does "
                "not write: a part of an older split left beside the new parts would share "
                "entries with them; split into a directory of its own (a new one), or remove "
                "them if they are parts of an older split")
    units = {name: field["unit"] for name, field in source.schema.items()}
    # What mkdir creates, innermost first: a failed split leaves no empty directory behind.
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    staging = out_dir / f".split-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    # Provenance, by which the trainer tells a val split that shares training entries: the
    # source's id (new with every write: a copy keeps it, a rewrite does not) and this split's.
    provenance = {"split_of": str(Path(src).resolve()), "split_of_id": source.id, "split_id": uuid.uuid4().hex}
    try:
        for name, indices in parts.items():
            with DatasetWriter(staging / "new" / name, shard_size=_shard_size(source),
                               float_dtype=_float_dtype(source), units=units,
                               info={**source.info, **provenance, "split": name}) as writer:
                for i in tqdm(indices.tolist(), disable=not progress, desc=f"{name}", unit="entry"):
                    writer.add(source.read(i), where=f"{src} entry {i}")
        if "train" in parts:
            stats = share_train_stats(staging / "new" / "train",
                                      [staging / "new" / name for name in parts if name != "train"],
                                      progress=progress)
        _replace_parts(staging, list(parts), out_dir, overwrite)
    except BaseException:
        # Kept when it holds old parts that an interrupted rollback did not put back.
        if not (staging / "old").is_dir() or not any((staging / "old").iterdir()):
            shutil.rmtree(staging)
            for directory in created:
                if any(directory.iterdir()):
                    break
                directory.rmdir()
        raise
    try:
        shutil.rmtree(staging)  # the replaced parts, in staging/replaced
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the new split is in place in {out_dir}; deleting the parts it "
                                f"replaced was interrupted: delete {staging}") from None
    if "train" in parts:
        warn_outliers(out_dir / "train", stats)  # (named where the part is now, not in staging)
    return {name: out_dir / name for name in parts}


def _replace_parts(staging: Path, names: list[str], out_dir: Path, overwrite: bool) -> None:
    """Move staging/new/<name> to out_dir/<name> for every name, together: the existing parts
    are moved aside (to staging/old) first, and to staging/replaced once every new part is in
    place; a failure or an interrupt before puts them back (writer.replace_dir, for several
    datasets)."""
    new, old = staging / "new", staging / "old"
    old.mkdir()
    try:
        for name in names:
            if (out_dir / name).exists() or (out_dir / name).is_symlink():
                # Checked again here, where the deletion happens: a part's directory may have
                # appeared or changed while the parts were written.
                check_target(out_dir / name, overwrite)
                os.replace(out_dir / name, old / name)
        for name in names:
            os.replace(new / name, out_dir / name)
    except BaseException:
        # (A rename is atomic: where each part is tells what was done.) Every new part out
        # first, then every old part in: an interrupt in between leaves parts missing, never
        # an old part beside a new one.
        for name in names:
            if not (new / name).exists() and (out_dir / name).exists():
                os.replace(out_dir / name, new / name)
        for name in names:
            if (old / name).exists():
                os.replace(old / name, out_dir / name)
        raise
    fsync_dir(out_dir)  # (the new parts' entries)
    # Out of 'old', which a leftover staging directory's warning says to look into.
    os.replace(old, staging / "replaced")


def _shard_size(dataset: LmdbDataset) -> int:
    return max(1, int(np.max(np.diff(dataset._offsets))))


def _float_dtype(dataset: LmdbDataset) -> np.dtype:
    return np.dtype(dataset.schema["pos"]["dtype"])
