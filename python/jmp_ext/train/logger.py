"""Run logging on rank 0: tqdm progress (structures/s, atoms/s, ETA), metrics.csv, TensorBoard.

Without the progress bar (batch jobs: loop.progress=false), every logged training step prints a
line with the same figures instead, so that a log file shows the run advancing.

metrics.csv has one row per value (step, split, name, value) so train, val and test metrics of any
task share one file (the train rows: means over the steps since the previous log, Trainer).
Rows are appended (a long run logs millions); a resumed run first rewrites the file, atomically,
with the rows up to the step it resumes from, and does not log again a value it had logged at
that step (a validation it repeats there).
"""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path

from tqdm import tqdm

from jmp_ext.files import naming, write_text_atomic

FIELDS = ["step", "split", "name", "value"]


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int, progress: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.tb = self._file = None
        self._logged_at_start: set[tuple[int, str, str]] = set()
        if enabled:
            self._logged_at_start = _keep_rows_up_to(self.path, start_step)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:  # events after start_step go: the resumed run logs them again
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and progress),
                        unit="step", dynamic_ncols=True)
        self.progress, self.total_steps = progress, total_steps
        self._t0 = time.perf_counter()
        self._paused = 0.0  # seconds of validation and checkpoints since _t0
        self._structures = self._atoms = self._steps = 0

    def start_clock(self) -> None:
        """Throughput counts from here (after setup and scale-factor fitting)."""
        self._t0, self._paused = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time inside (a validation, a checkpoint) is not training time: throughput leaves it out
        (it halved the structures/s shown after each validation)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def step(self, structures: int, atoms: int, **postfix: float) -> None:
        """One optimizer step done, on `structures` structures with `atoms` atoms (global batch)."""
        self._structures += structures
        self._atoms += atoms
        self._steps += 1
        rates = self.throughput()
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in postfix.items()},
                              "struct/s": f"{rates['structures_per_s']:.1f}", "atoms/s": f"{rates['atoms_per_s']:.0f}"},
                             refresh=False)
        self.bar.update(1)

    def throughput(self) -> dict[str, float]:
        """Structures and atoms per second of training, its seconds (validations and checkpoints
        left out), and wall_seconds (all of it) since start_clock."""
        wall = time.perf_counter() - self._t0
        dt = max(wall - self._paused, 1e-9)
        return {"structures_per_s": self._structures / dt, "atoms_per_s": self._atoms / dt, "seconds": dt,
                "wall_seconds": wall}

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        rows = [(name, value) for name, value in metrics.items() if (step, split, name) not in self._logged_at_start]
        # (a full disk names no file: name the one this was writing)
        with naming(self.path):
            for name, value in rows:
                self._csv.writerow({"step": step, "split": split, "name": name, "value": value})
            self._file.flush()
        if self.tb is not None:
            with naming(self.path.parent / "tb"):
                for name, value in rows:
                    self.tb.add_scalar(f"{split}/{name}", value, step)
        if split == "train" and not self.progress:
            self.write(self._heartbeat(step, metrics))

    def _heartbeat(self, step: int, metrics: dict[str, float]) -> str:
        """'step 50/150: loss 0.4123, lr 0.001, 56.8 struct/s, 420 atoms/s, ETA 0:00:12'."""
        rates = self.throughput()
        eta = int((self.total_steps - step) * rates["wall_seconds"] / max(self._steps, 1))
        figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "lr") if k in metrics)
        return (f"step {step}/{self.total_steps}: {figures}, {rates['structures_per_s']:.1f} struct/s, "
                f"{rates['atoms_per_s']:.0f} atoms/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")

    def write(self, message: str) -> None:
        """Prints without breaking the progress bar (rank 0 only)."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        """Closes the bar, metrics.csv and TensorBoard's writer, each whatever the others do; a
        failure (the last rows' write on a full disk) names its file."""
        self.bar.close()
        try:
            if self._file is not None:
                with naming(self.path):
                    self._file.close()
        finally:
            if self.tb is not None:
                with naming(self.path.parent / "tb"):
                    self.tb.close()


def _keep_rows_up_to(path: Path, last_step: int) -> set[tuple[int, str, str]]:
    """Rewrites metrics.csv (atomically) with its rows up to last_step, one at a time (a long
    run's file holds millions), and returns the (step, split, name) of those at last_step. A row
    torn by a kill mid-write (a full disk, a power cut) is left out: the text after the last line
    end, which may still parse ("0.72" of "0.7234418577203527"), and any row that does not parse."""
    logged_at_last: set[tuple[int, str, str]] = set()

    def write(out) -> None:
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        writer.writeheader()
        if last_step > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8", errors="replace") as f:  # (damage: rows that do not parse)
                for r in csv.DictReader(line for line in f if line.endswith("\n")):
                    try:
                        row = {"step": int(r["step"]), "split": r["split"], "name": r["name"],
                               "value": float(r["value"])}
                    except (TypeError, ValueError):
                        continue
                    if row["step"] <= last_step:
                        writer.writerow(row)
                    if row["step"] == last_step:
                        logged_at_last.add((row["step"], row["split"], row["name"]))

    write_text_atomic(path, write, newline="")
    return logged_at_last
