"""Dataset statistics for normalisation: linear reference energies, target mean/std, force RMS,
atom-count histogram. Computed on a training split and cached in its directory as stats.json."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols
from tqdm import tqdm

from jmp_ext.data import format as fmt
from jmp_ext.data.dataset import LmdbDataset
from jmp_ext.data.writer import dataset_meta
from jmp_ext.files import write_bytes_atomic
from jmp_ext.warn import warn_user

STATS_VERSION = 1
# Per-atom fields and inputs are not regression targets of a structure.
_NOT_TARGETS = fmt.INPUT_FIELDS | {"forces"}
# Entries read and reduced at a time: memory is O(_CHUNK_SIZE), whatever the dataset's size.
_CHUNK_SIZE = 4096
# An entry holding over this share of a label's spread is an outlier, over at least this many
# values (fewer can be dominated by a legitimate one).
_OUTLIER_SHARE, _OUTLIER_MIN_COUNT = 0.5, 100


def compute_stats(dataset: LmdbDataset, progress: bool = False) -> dict:
    """Scan a dataset (twice when it has energy or float scalar labels: their outliers need the
    fitted references) and return its statistics, in memory independent of its size.

    Returns a dict:
        version: STATS_VERSION
        num_entries: int
        linref: float64 [119] (present when the data has `energy`): per-element reference
            energies in eV, the least-squares fit of energy on element counts over the elements
            present (zeros for elements absent from the data), minimum-norm when the counts are
            collinear (a single composition, as in an MD trajectory); E_ref(structure) =
            sum(linref[Z_i])
        targets: {name: {"mean", "std"}} for energy (after subtracting the references) and every
            other per-structure label (per component for vectors and stress), in its units;
            population std (ddof=0); float64 scalars for scalar labels, arrays otherwise
        linrefs: {name: {"linref" [119], "mean", "std"}} for every other float scalar label: its
            per-element references, fitted as energy's, and the residual's mean and std (for
            extensive properties such as QM9's U_0; TargetConfig.linref uses them)
        elements: the atomic numbers present, ascending (a trained model warns about others)
        force_rms: float, eV/Å, sqrt(mean F^2) over atoms and components (when there are forces)
        natoms_hist: int64 [max_natoms+1], the number of structures with each atom count
        avg_natoms: float
        outliers: {name: {"entry", "share", "value"}} for every label (forces included) one
            entry of which holds over half its spread (sum of squared deviations; for energy and
            the referenced labels, of the residual), over at least _OUTLIER_MIN_COUNT entries
            (atoms' force components for forces): a unit or data error that would set the
            normalisation's std (and the references) for every other entry; load_stats warns
        dataset_id: the meta.json id of the dataset they describe (absent for older datasets)

    Entries are read _CHUNK_SIZE at a time and each chunk is reduced to fixed-size summaries:
    - labels other than energy: count, mean and sum of squared deviations per component,
      merged across chunks with Chan et al.'s pairwise update (no sum-of-squares cancellation).
    - energy and the float scalar labels y_1..y_m: the triangular factor R of a QR factorisation
      of the [entries, 120 + m] matrix A = [element counts | energy | y_1..y_m | 1], built as a
      tree of QR merges of the chunks' factors (TSQR; R^T R = A^T A). The least-squares problem
      on R's columns is the dense one rotated by an orthogonal matrix, so np.linalg.lstsq on
      them gives the same minimum-norm references (with the dense problem's rcond) and the
      residuals' mean and spread without a second pass: for the residual r = A u
      (u = [-linref, 1, 0], the 1 at the label's column) and t = R u,
      sum(r) = R[:, ones] . t and sum((r - mean)^2) = |t - mean R[:, ones]|^2, both formed
      from small (residual-sized) numbers, never as the difference of large sums of squares.
    """
    num_entries = len(dataset)
    labels = [name for name in dataset.schema if name not in _NOT_TARGETS]
    moments: dict[str, _Moments] = {name: _Moments() for name in labels if name != "energy"}
    # The labels fitted on element counts: energy first (when there is one), then the other
    # float scalars.
    referenced = sorted((name for name in labels if name == "energy" or (
        dataset.schema[name]["shape"] == [] and np.dtype(dataset.schema[name]["dtype"]).kind == "f")),
        key=lambda name: name != "energy")
    counts_qr = _TreeQR() if referenced else None
    present = np.zeros(fmt.MAX_Z + 1, dtype=bool)
    force_sq, force_n = 0.0, 0
    extremes = {name: _Extremes() for name in moments}
    largest_force = (0.0, -1)  # (|F| component, entry)
    with tqdm(total=num_entries, disable=not progress, desc=f"stats {Path(dataset.path).name}",
              unit="entry") as bar:
        for start in range(0, num_entries, _CHUNK_SIZE):
            stop = min(start + _CHUNK_SIZE, num_entries)
            numbers, values = [], {name: [] for name in labels}
            for i in range(start, stop):
                entry = dataset.read(i)
                # A copy: the entry's arrays share one buffer, which a view would keep alive.
                numbers.append(entry["atomic_numbers"].copy())
                for name in labels:
                    values[name].append(entry[name].astype(np.float64))
                if "forces" in entry:
                    forces = entry["forces"].astype(np.float64)
                    if not np.isfinite(forces).all():
                        raise _non_finite(dataset, i, "forces")
                    force_sq += float(np.square(forces).sum())
                    force_n += forces.size
                    largest = float(np.abs(forces).max()) if forces.size else 0.0
                    if largest > largest_force[0]:
                        largest_force = (largest, i)
            stacked = {name: np.stack(values[name]) for name in labels}
            for name, chunk in stacked.items():
                # The writer refuses non-finite labels; a file from elsewhere may hold them, and
                # one NaN would make every statistic (and the normalised loss) NaN.
                finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
                if not finite.all():
                    raise _non_finite(dataset, start + int(np.argmin(finite)), name)
            for name, chunk_moments in moments.items():
                chunk_moments.add(stacked[name])
                extremes[name].add(stacked[name], start)
            present[np.concatenate(numbers)] = True
            if referenced:
                rows = stop - start
                # Element counts of the chunk: one bincount over (row, Z) pairs.
                row_of_atom = np.repeat(np.arange(rows), [len(z) for z in numbers])
                counts = np.bincount(row_of_atom * (fmt.MAX_Z + 1) + np.concatenate(numbers),
                                     minlength=rows * (fmt.MAX_Z + 1))
                block = np.empty((rows, fmt.MAX_Z + 2 + len(referenced)))
                block[:, :fmt.MAX_Z + 1] = counts.reshape(rows, fmt.MAX_Z + 1)
                for j, name in enumerate(referenced):
                    block[:, fmt.MAX_Z + 1 + j] = stacked[name]
                block[:, -1] = 1.0
                counts_qr.add(block)
            bar.update(stop - start)
    stats: dict = {"version": STATS_VERSION, "num_entries": num_entries, "targets": {}}
    fits = _fit_references(counts_qr.result(), present, referenced, num_entries) if referenced else {}
    for name in labels:
        stats["targets"][name] = fits["energy"][1] if name == "energy" else moments[name].result()
    if "energy" in fits:
        stats["linref"] = fits["energy"][0]
    if set(fits) - {"energy"}:
        stats["linrefs"] = {name: {"linref": linref, **residual}
                            for name, (linref, residual) in fits.items() if name != "energy"}
    stats["elements"] = np.flatnonzero(present).tolist()
    if force_n:
        stats["force_rms"] = float(np.sqrt(force_sq / force_n))
    stats["natoms_hist"] = np.bincount(dataset.natoms)
    stats["avg_natoms"] = float(dataset.natoms.mean())
    outliers = {}
    if num_entries >= _OUTLIER_MIN_COUNT:
        for name in extremes:
            # (a rare class is no outlier; a referenced label's is its residual's, below: a large
            # structure's extensive value is not one)
            if np.dtype(dataset.schema[name]["dtype"]).kind == "f" and name not in fits:
                outliers[name] = extremes[name].outlier(moments[name])
        if fits:
            outliers.update(_residual_outliers(dataset, fits, progress))
    if force_n >= _OUTLIER_MIN_COUNT and largest_force[0] ** 2 > _OUTLIER_SHARE * force_sq:
        outliers["forces"] = {"entry": largest_force[1], "share": largest_force[0] ** 2 / force_sq,
                              "value": largest_force[0]}
    stats["outliers"] = {name: outlier for name, outlier in outliers.items() if outlier is not None}
    if dataset.id is not None:  # (load_stats tells the statistics of an earlier dataset written there)
        stats["dataset_id"] = dataset.id
    return stats


def residual_stats(dataset: LmdbDataset, name: str, references: np.ndarray) -> dict:
    """Statistics of a float scalar label over `dataset` with given per-element references
    (TargetConfig.references, set rather than fitted), float64:
        shift: one energy per atom, the least-squares fit of r = y - sum_i references[Z_i] on the
            atom count N (MACE's shift): isolated-atom references leave r the binding energy,
            tens of eV from zero, which a network normalised with mean 0 would have to learn
        mean, std: of r - shift * N (population std)
    references: float64 [119], NaN for an element without one, which an entry holding it is a
    DataError for. One pass; the rows [N, r, 1] are reduced chunk by chunk to their R factor,
    as compute_stats reduces its own (memory O(_CHUNK_SIZE))."""
    rows_qr = _TreeQR()
    for start in range(0, len(dataset), _CHUNK_SIZE):
        block = np.ones((min(start + _CHUNK_SIZE, len(dataset)) - start, 3))
        for row in range(len(block)):
            entry = dataset.read(start + row)
            refs = references[entry["atomic_numbers"]]
            if np.isnan(refs).any():
                missing = sorted({chemical_symbols[z] for z in entry["atomic_numbers"][np.isnan(refs)]})
                raise fmt.DataError(f"{dataset.path}: entry {start + row} holds {', '.join(missing)}, which the "
                                    f"references of {name!r} do not give")
            block[row, :2] = len(refs), float(entry[name]) - refs.sum()
        rows_qr.add(block)
    r = rows_qr.result()
    (shift,), (residual,) = _least_squares(r[:, :1], r[:, 1:2], r[:, 2], len(dataset))
    return {"shift": np.float64(shift[0]), **residual}


def _non_finite(dataset: LmdbDataset, index: int, name: str) -> fmt.DataError:
    return fmt.DataError(f"{dataset.path}: entry {index} has a non-finite {name!r} (NaN or inf); "
                         "remove it (or rewrite the dataset)")


def _fit_references(r: np.ndarray, present: np.ndarray, names: list[str], num_entries: int) -> dict:
    """{name: (linref float64 [119], {"mean", "std"} of the residual)} from the R factor of
    [element counts | labels `names` | 1] (see compute_stats)."""
    coeffs, residuals = _least_squares(r[:, :fmt.MAX_Z + 1][:, present], r[:, fmt.MAX_Z + 1:-1], r[:, -1],
                                       num_entries)
    fits = {}
    for name, coeff, residual in zip(names, coeffs, residuals):
        linref = np.zeros(fmt.MAX_Z + 1)
        linref[present] = coeff
        fits[name] = (linref, residual)
    return fits


def _least_squares(x_r: np.ndarray, y_r: np.ndarray, ones_r: np.ndarray, num_entries: int) -> tuple[list, list]:
    """Each label column y_j fitted on the columns X by least squares, given the columns' R factor
    (x_r [k, p], y_r [k, m] and ones_r [k]: R's columns of X, of the labels and of the ones
    column; see compute_stats). Returns the coefficients (float64 [p] per label) and the
    residual's {"mean", "std"} (population std) per label, from R's small numbers only."""
    # lstsq gives the minimum-norm solution when the columns are collinear (element counts of a
    # single composition, as in an MD trajectory): the residual is still exact on the data. R
    # has the singular values of the dense matrix, so rcond is the dense problem's default
    # (eps * max(rows, columns)).
    rcond = np.finfo(np.float64).eps * max(num_entries, x_r.shape[1])
    coeff = np.linalg.lstsq(x_r, y_r, rcond=rcond)[0]
    residuals = []
    for j in range(y_r.shape[1]):
        residual = y_r[:, j] - x_r @ coeff[:, j]  # R @ [-coeff, 1, 0]: the residual, rotated
        mean = float(ones_r @ residual) / num_entries
        centered = residual - mean * ones_r
        std = np.sqrt(float(centered @ centered) / num_entries)
        residuals.append({"mean": np.float64(mean), "std": np.float64(std)})
    return list(coeff.T), residuals


def _residual_outliers(dataset: LmdbDataset, fits: dict, progress: bool) -> dict:
    """The outlier of each referenced label (see compute_stats' outliers), from a second pass over
    `dataset` (the residuals need the fitted references). fits: _fit_references'."""
    largest = {name: (0.0, -1, 0.0) for name in fits}  # (|residual - mean|, entry, residual)
    for i in tqdm(range(len(dataset)), disable=not progress, desc=f"outliers {Path(dataset.path).name}",
                  unit="entry"):
        entry = dataset.read(i)
        for name, (linref, residual) in fits.items():
            r = float(entry[name]) - float(linref[entry["atomic_numbers"]].sum())
            if abs(r - residual["mean"]) > largest[name][0]:
                largest[name] = (abs(r - residual["mean"]), i, r)
    outliers = {}
    for name, (deviation, i, r) in largest.items():
        spread = len(dataset) * float(fits[name][1]["std"]) ** 2
        if spread > 0 and deviation**2 > _OUTLIER_SHARE * spread:
            outliers[name] = {"entry": i, "share": min(deviation**2 / spread, 1.0), "value": r}
    return outliers


class _Extremes:
    """Each component's smallest and largest value over stacked chunks [rows, *shape], with
    their entries: the value farthest from any mean is one of them."""

    def __init__(self):
        self.low = self.high = None  # (values [components], entries [components])

    def add(self, chunk: np.ndarray, first_entry: int) -> None:
        flat = chunk.reshape(len(chunk), -1)
        for side, pick in (("low", np.argmin), ("high", np.argmax)):
            rows = pick(flat, axis=0)
            values, entries = flat[rows, np.arange(flat.shape[1])], rows + first_entry
            old = getattr(self, side)
            if old is not None:
                keep = old[0] <= values if side == "low" else old[0] >= values
                values, entries = np.where(keep, old[0], values), np.where(keep, old[1], entries)
            setattr(self, side, (values, entries))

    def outlier(self, moments: "_Moments") -> dict | None:
        """{"entry", "share", "value"} of the value holding the largest share of its component's
        spread, when it holds over _OUTLIER_SHARE of it; else None."""
        mean = np.ravel(moments.mean).astype(np.float64)
        spread = np.ravel(moments.m2).astype(np.float64)
        best = None
        for values, entries in (self.low, self.high):
            share = np.divide(np.square(values - mean), spread, out=np.zeros_like(spread), where=spread > 0)
            c = int(np.argmax(share))
            if share[c] > _OUTLIER_SHARE and (best is None or share[c] > best["share"]):
                best = {"entry": int(entries[c]), "share": float(min(share[c], 1.0)), "value": float(values[c])}
        return best


class _Moments:
    """Streaming per-component mean and population std of stacked chunks [rows, *shape]
    (Chan, Golub & LeVeque's pairwise merge of counts, means and squared-deviation sums)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, chunk: np.ndarray) -> None:
        rows = chunk.shape[0]
        mean = chunk.mean(axis=0)
        m2 = np.square(chunk - mean).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = rows, mean, m2
            return
        total = self.n + rows
        delta = mean - self.mean
        self.mean = self.mean + delta * (rows / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.n * rows / total)
        self.n = total

    def result(self) -> dict:
        # [()] turns 0-d results into numpy float64 scalars, as np.mean/np.std return them.
        return {"mean": self.mean[()], "std": np.sqrt(self.m2 / self.n)[()]}


class _TreeQR:
    """The R factor of a tall matrix given as row blocks, by a binary tree of QR merges (TSQR):
    memory O(columns^2 log(blocks)), rounding error growing with the tree's depth only."""

    def __init__(self):
        self._stack: list[tuple[int, np.ndarray]] = []  # (level, R), levels strictly decreasing

    def add(self, block: np.ndarray) -> None:
        r, level = np.linalg.qr(block, mode="r"), 0
        while self._stack and self._stack[-1][0] == level:
            r = np.linalg.qr(np.vstack([self._stack.pop()[1], r]), mode="r")
            level += 1
        self._stack.append((level, r))

    def result(self) -> np.ndarray:
        r = self._stack[-1][1]
        for _, other in reversed(self._stack[:-1]):
            r = np.linalg.qr(np.vstack([other, r]), mode="r")
        return r


def warn_outliers(dataset_dir: str | Path, stats: dict) -> None:
    """Warns of each of stats["outliers"] (see compute_stats): one entry's label that sets the
    std normalising every other's."""
    # (val and test splits hold their train split's statistics: the entry is the train split's)
    source = stats.get("source", Path(dataset_dir).name)
    where = f"{dataset_dir}" if source == Path(dataset_dir).name else f"{dataset_dir} (statistics of {source})"
    for name, outlier in stats.get("outliers", {}).items():
        value = (f"a force component of {outlier['value']:.6g}" if name == "forces" else
                 f"{outlier['value']:.6g} after the per-element references"
                 if name == "energy" or name in stats.get("linrefs", {}) else f"{outlier['value']:.6g}")
        warn_user(f"{where}: entry {outlier['entry']}'s {name!r} ({value}) holds {outlier['share']:.0%} of the "
                  f"spread of {name!r} over the training split: its std, which normalises every entry's target, is "
                  "mostly this one entry's (a unit or data error?); remove or fix it, then recompute the statistics")


def save_stats(dataset_dir: str | Path, stats: dict) -> Path:
    """Cache statistics in a dataset directory (atomically)."""
    file = Path(dataset_dir) / fmt.STATS_FILE
    write_bytes_atomic(file, json.dumps(_to_json(stats), indent=1).encode())
    return file


def share_train_stats(train_dir: str | Path, other_dirs, progress: bool = False) -> dict:
    """Compute a train split's statistics and cache them in it and in its sibling splits
    (validation and test targets are normalised with the training statistics)."""
    stats = compute_stats(LmdbDataset(train_dir), progress=progress)
    stats["source"] = str(Path(train_dir).name)
    save_stats(train_dir, stats)
    shared = {key: value for key, value in stats.items() if key != "dataset_id"}  # (the parts' ids differ)
    for directory in other_dirs:
        save_stats(directory, shared)
    return stats


def load_stats(dataset_dir: str | Path, recompute: bool = False, progress: bool = False) -> dict:
    """Statistics of a dataset directory: the cached stats.json, computed and cached if missing.

    Arrays come back as numpy arrays (linref float64 [119], natoms_hist int64, vector means).
    Val/test splits made by make_demo or `split` hold the statistics of their train split.
    """
    file = Path(dataset_dir) / fmt.STATS_FILE
    if recompute or not file.is_file():
        stats = compute_stats(LmdbDataset(dataset_dir), progress=progress)
        warn_outliers(dataset_dir, stats)
        try:
            save_stats(dataset_dir, stats)
        except OSError as e:  # a shared, read-only dataset: train anyway, say what it costs
            warn_user(f"could not cache the statistics of {dataset_dir} ({e}); they are computed "
                      "again by every run: `python -m jmp_ext.data stats` on a writable copy, or ask "
                      "the dataset's owner to run it")
        return stats
    stats = fmt.read_json(file)
    # A dataset rewritten since (convert --overwrite while they were computed, or a stats.json
    # copied beside another dataset): its own statistics, not the earlier one's.
    if stats.get("dataset_id") not in (None, (dataset_meta(Path(dataset_dir)) or {}).get("id")):
        warn_user(f"{file} holds the statistics of an earlier dataset written to {dataset_dir}, not of the one there "
                  "now: computing them again")
        return load_stats(dataset_dir, recompute=True, progress=progress)
    recompute = f"recompute with `python -m jmp_ext.data stats {shlex.quote(str(dataset_dir))} --recompute`"
    if stats.get("version") != STATS_VERSION:
        raise fmt.DataError(f"{file}: statistics version {stats.get('version')} is not {STATS_VERSION}; {recompute}")
    # Cached before labels were checked for outliers: a dataset's own statistics (what a training
    # run reads) are computed again, once, for their warnings; a split's val and test parts keep
    # their train part's.
    if "outliers" not in stats and stats.get("source", Path(dataset_dir).name) == Path(dataset_dir).name:
        warn_user(f"{file} predates the check for outlying labels: computing the statistics again")
        return load_stats(dataset_dir, recompute=True, progress=progress)
    try:
        stats = _from_json(stats)
        _check_stats(stats)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # (a damaged or edited file)
        raise fmt.DataError(f"{file}: {type(e).__name__}: {e}; {recompute}") from None
    warn_outliers(dataset_dir, stats)
    return stats


def _check_stats(stats: dict) -> None:
    """Raises ValueError unless the statistics hold what normalisation reads (a short linref
    failed inside torch). Their values are checked where they are used (train.tasks.normalizers):
    an unused label may hold anything."""
    for key in ("num_entries", "targets", "natoms_hist", "avg_natoms"):
        if key not in stats:
            raise ValueError(f"no {key!r}")
    references = {"linref": stats.get("linref"),
                  **{f"linrefs.{n}": fit["linref"] for n, fit in stats.get("linrefs", {}).items()}}
    for name, linref in references.items():
        if linref is not None and linref.shape != (fmt.MAX_Z + 1,):
            raise ValueError(f"{name} must be {fmt.MAX_Z + 1} numbers, got {linref.shape}")
    for name, target in stats["targets"].items():
        if not {"mean", "std"} <= set(target):
            raise ValueError(f"targets.{name} must have a mean and a std")
    for name, outlier in stats.get("outliers", {}).items():
        if not (isinstance(outlier, dict) and isinstance(outlier.get("entry"), int)
                and all(isinstance(outlier.get(key), (int, float)) for key in ("share", "value"))):
            raise ValueError(f"outliers.{name} must have an int entry and a numeric share and value")


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
    if "linrefs" in stats:
        stats["linrefs"] = {name: {"linref": np.asarray(fit["linref"], dtype=np.float64),
                                   "mean": np.float64(fit["mean"]), "std": np.float64(fit["std"])}
                            for name, fit in stats["linrefs"].items()}
    stats["natoms_hist"] = np.asarray(stats["natoms_hist"], dtype=np.int64)
    stats["targets"] = {name: {k: np.asarray(v, dtype=np.float64) if isinstance(v, list) else v
                               for k, v in target.items()}
                        for name, target in stats["targets"].items()}
    return stats
