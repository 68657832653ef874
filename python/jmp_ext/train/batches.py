"""Batches for training and evaluation: a dataset's structures collated in DataLoader workers
while the main process trains, and errors of a batch traced back to its dataset entries."""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import torch

from jmp_ext.data.collate import collate
from jmp_ext.graphs import BatchStructureError
from jmp_ext.ops._lib import is_out_of_memory
from jmp_ext.train.config import ENTRY_KEY, TrainError


# Open files enough for DataLoader workers (a batch's tensors each hold one until taken).
OPEN_FILES = 65536


def raise_open_file_limit() -> None:
    """Raises this process's soft limit of open files towards its hard limit, to OPEN_FILES at
    most (children inherit it; some containers' hard limit is 1e9). DataLoader workers hand each
    batch's tensors over as file descriptors (torch's default sharing strategy), and under a soft
    limit of a few hundred (ulimit -n; some clusters') several workers ran out: a bare EOFError
    after megabytes of worker tracebacks, or a worker spinning on them for ever."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # (a kernel cap below the hard limit: keep the soft)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def collate_batch(structures: list[dict], dtype: torch.dtype, task: int | None = None) -> dict[str, torch.Tensor]:
    """`structures` (dataset entries) collated for the model: pos and cell in `dtype`, collated in
    float64 and cast once (not rounded twice); labels stay float64 (a total energy of ~1e4 eV has
    no meV left in float32). batch["task"] [B] is the task index of every structure: `task`, or
    MultiDataset's per-entry `dataset` index."""
    batch = collate(structures, dtype=torch.float64)
    for key in ("pos", "cell"):
        batch[key] = batch[key].to(dtype)
    dataset = batch.pop("dataset", None)
    batch["task"] = torch.full_like(batch["natoms"], task) if task is not None else dataset
    return batch


class CollatedEntries(torch.utils.data.Dataset):
    """Item [i, j, ...] (entries of `dataset`) is those entries collated (collate_batch), with
    batch[ENTRY_KEY] [B] = the entries, to name them in errors."""

    def __init__(self, dataset, dtype: torch.dtype, task: int | None = None):
        self.dataset, self.dtype, self.task = dataset, dtype, task

    def __getitem__(self, entries: list[int]) -> dict[str, torch.Tensor]:
        batch = collate_batch([self.dataset[i] for i in entries], self.dtype, self.task)
        batch[ENTRY_KEY] = torch.tensor(entries, dtype=torch.int64)
        return batch


def load_batches(dataset, batches: list[list[int]], dtype: torch.dtype, task: int | None = None):
    """The batches (lists of entries of `dataset`), collated one at a time in this process."""
    collated = CollatedEntries(dataset, dtype, task)
    return (collated[entries] for entries in batches)


class TrainingLoader:
    """Loads the training batches of one epoch after another, in `workers` DataLoader worker
    processes (0: in this process) that load and collate while the training process trains.
    The workers are started once and kept from epoch to epoch: where Python starts them by
    forkserver or spawn (3.14's default on Linux) each start costs seconds, and copies an
    in-memory dataset into every worker again."""

    def __init__(self, dataset, dtype: torch.dtype, workers: int):
        self.dataset, self.dtype, self.workers = dataset, dtype, workers
        if workers:
            raise_open_file_limit()
        self._epoch_batches = _EpochBatches()
        self._loader = self._data_loader()
        self._iterator = None

    def _data_loader(self) -> torch.utils.data.DataLoader:
        # An own generator: a DataLoader iterator otherwise draws its base seed from the global
        # RNG, which would shift edge dropout's random stream whenever a resumed run opens it.
        return torch.utils.data.DataLoader(
            CollatedEntries(self.dataset, self.dtype), sampler=self._epoch_batches, batch_size=None,
            num_workers=self.workers, persistent_workers=self.workers > 0,
            generator=torch.Generator().manual_seed(0), worker_init_fn=_ignore_stop_signals if self.workers else None)

    def epoch(self, batches: list[list[int]]):
        """An iterator over `batches` (lists of entries, collated in order); it ends the previous
        one's (its batches loaded ahead and not taken are dropped)."""
        self._epoch_batches.batches = batches
        self._iterator = iter(self._loader)
        return self._iterator

    def close(self) -> None:
        """Shuts the workers down now (the next epoch starts new ones): an exception's traceback
        holds the iterator (its frames) to interpreter exit, whose one SIGTERM the workers ignore
        (_ignore_stop_signals), and the process would hang there. (torch has no public way.)"""
        if hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
            self._iterator, self._loader = None, self._data_loader()


class _EpochBatches(torch.utils.data.Sampler):
    """TrainingLoader's sampler: the current epoch's batches, drawn in the training process
    (lists of entries: each item of CollatedEntries is one)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _ignore_stop_signals(worker_id: int) -> None:
    """A stop signal is the training process's to handle (it finishes the step and saves
    last.pt); a worker it killed would fail that step instead. Only the first SIGTERM is
    ignored: the DataLoader's shutdown terminates a stuck worker with one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_finite_labels(batch: dict, dataset, names: list[str]) -> None:
    """Raises a TrainError naming the entries of `dataset` (an LmdbDataset; batch from
    CollatedEntries) whose labels `names` hold NaN or inf: a metric over them would be NaN. (A
    training split's statistics refuse such labels; a validation or test split has none.)"""
    for name in names:
        y = batch[name]
        if not y.is_floating_point():
            continue
        bad = ~torch.isfinite(y.reshape(y.shape[0], -1)).all(dim=1)
        if bad.any():
            structures = batch["batch"][bad] if dataset.schema[name]["per_atom"] else bad.nonzero()[:, 0]
            entries = sorted(set(batch[ENTRY_KEY][structures].tolist()))
            raise TrainError(f"{dataset.path} entr{'y' if len(entries) == 1 else 'ies'} {entries}: label {name!r} "
                             "holds NaN or inf; remove such entries (or rewrite the dataset)")


@contextlib.contextmanager
def entries_named(batch: dict, dataset):
    """Runs the block with its BatchStructureError or out-of-memory error raised as name_entries
    says it (from the original); any other error as it is."""
    try:
        yield
    except (BatchStructureError, RuntimeError) as error:
        named = name_entries(error, batch, dataset)
        if named is error:
            raise
        raise named from error


def name_entries(error: Exception, batch: dict, dataset) -> Exception:
    """A BatchStructureError of a batch of CollatedEntries of `dataset` (an LmdbDataset or
    a MultiDataset), as a TrainError naming those dataset entries; an out-of-memory error as a
    TrainError that says what to lower; other errors unchanged."""
    if is_out_of_memory(error):
        natoms = batch["natoms"]
        return TrainError(f"out of memory on a batch of {natoms.numel()} structures, {int(natoms.sum())} atoms (the "
                          f"largest {int(natoms.max())}): lower data.max_atoms or data.batch_size (validation: "
                          "data.val_batch_size; eval and predict: --batch-size), or graph.max_neighbors / "
                          "graph.cutoff, with which GemNet-OC's quadruplets, most of its memory, grow steeply "
                          f"({type(error).__name__}: {error})")
    if not isinstance(error, BatchStructureError) or ENTRY_KEY not in batch:
        return error
    return TrainError(f"{'; '.join(f'{path} entry {i}' for path, i in entries_of(batch, dataset, error.structures))}: "
                      f"{error.problem}")


def entries_of(batch: dict, dataset, structures) -> list[tuple[str, int]]:
    """(dataset path, entry) of the given structures of a batch of CollatedEntries of `dataset`
    (an LmdbDataset, or a MultiDataset, whose member holds the entry)."""
    members = getattr(dataset, "datasets", [dataset])
    offsets = np.cumsum([0, *[len(d) for d in members]])
    entries = []
    for s in structures:
        i = int(batch[ENTRY_KEY][s])
        which = int(np.searchsorted(offsets, i, side="right")) - 1
        entries.append((str(members[which].path), int(i - offsets[which])))
    return entries
