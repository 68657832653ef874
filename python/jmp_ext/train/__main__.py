"""python -m jmp_ext.train: pretrain, fine-tune, evaluate and predict.

    python -m jmp_ext.train                                   the demo (makes demo_data/ if missing)
    python -m jmp_ext.train demo [key=value ...]
    python -m jmp_ext.train CONFIG.yaml [key=value ...]       mode from the config
    python -m jmp_ext.train pretrain|finetune [CONFIG.yaml] [key=value ...]   (e.g. preset=jmp_s_qm9)
    python -m jmp_ext.train eval CHECKPOINT DATASET [--task NAME] [--out metrics.json]
    python -m jmp_ext.train predict CHECKPOINT INPUT --out predictions.npz [--task NAME]

INPUT is a dataset directory or any file ASE reads (extxyz, traj, ...). Under torchrun every
training mode runs data-parallel; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from jmp_ext.train.config import ConfigError, build_config, load_config
from jmp_ext.train.tasks import TrainError


def run_training(config) -> dict:
    from jmp_ext.train import distributed
    from jmp_ext.train.loop import Trainer

    try:
        trainer = Trainer(config)
        summary = trainer.train()
    finally:
        distributed.teardown()
    if trainer.main:
        print_summary(config, summary)
    return summary


def print_summary(config, summary: dict) -> None:
    print(f"\n== {config.mode} finished: {summary['steps']} steps ({summary['epochs']:.2f} epochs), stop: {summary['stop']}")
    print(f"   {summary['seconds']:.1f} s training, {summary['structures_per_s']:.1f} structures/s, "
          f"{summary['atoms_per_s']:.0f} atoms/s")
    for split in ("val", "test"):
        for name, value in (summary.get(split) or {}).items():
            print(f"   {split:4s} {name:40s} {value:.5g}")
    run = Path(config.run_dir)
    print(f"   run directory {run}: config.yaml, last.pt, best.pt, metrics.csv, summary.json")


def demo(overrides: list[str]) -> dict:
    from jmp_ext.data import make_demo
    from jmp_ext.train import distributed
    from jmp_ext.train.presets import demo as demo_config

    config = build_config(demo_config(), overrides)
    root = Path(config.tasks[0].train).parents[1]
    distributed.setup(config.device)
    if distributed.is_main():
        if not (root / "demo.json").is_file():
            print(f"making the demo data in {root}/ (once)")
        make_demo(root)
    distributed.barrier()  # the other ranks wait for rank 0's data
    return run_training(config)


def evaluate_checkpoint(checkpoint: str, dataset: str, task: str | None, out: str | None,
                        batch_size: int, device: str) -> dict:
    from jmp_ext.train.checkpoint import atomic_write_bytes
    from jmp_ext.train.loop import evaluate, load_trained
    from jmp_ext.train.tasks import open_dataset

    model, config = load_trained(checkpoint, device)
    t = task_index(config, task)
    ds = open_dataset(dataset, "dataset", in_memory=False)
    for target in config.tasks[t].targets:
        if target.name not in ds.schema:
            raise TrainError(f"target {target.name!r} of the checkpoint is not in {dataset} "
                             f"(it has: {', '.join(sorted(ds.schema))})")
    datasets = [ds if i == t else None for i in range(len(config.tasks))]
    dtype = next(model.net.parameters()).dtype
    metrics = evaluate(model, datasets, batch_size, dtype, torch.device(device))
    text = json.dumps(metrics, indent=1)
    print(text)
    if out:
        atomic_write_bytes(Path(out), text.encode())
    return metrics


def predict(checkpoint: str, source: str, out: str, task: str | None, batch_size: int, device: str) -> dict:
    """Predictions for every structure of a dataset directory or an ASE-readable file, saved as npz:
    natoms [M], energy [M] (eV), forces [sum natoms, 3] (eV/Å), stress [M, 3, 3] (eV/Å^3; NaN for a
    structure without a cell), properties [M(, k)]."""
    from jmp_ext.calculator import atoms_to_entry
    from jmp_ext.data import collate
    from jmp_ext.train.checkpoint import atomic_write_bytes
    from jmp_ext.train.loop import load_trained
    from jmp_ext.train.tasks import open_dataset

    model, config = load_trained(checkpoint, device)
    t = task_index(config, task)
    if Path(source).is_dir():
        ds = open_dataset(source, "input", in_memory=False)
        entries = (ds[i] for i in range(len(ds)))
        count = len(ds)
    else:
        import ase.io

        if not Path(source).is_file():
            raise TrainError(f"input {source} does not exist")
        images = ase.io.read(source, index=":")
        entries = (atoms_to_entry(a) for a in images)
        count = len(images)
    dtype = next(model.net.parameters()).dtype
    keep = ("pos", "atomic_numbers", "cell", "pbc", "tags", "fixed")
    outputs: dict[str, list[np.ndarray]] = {"natoms": []}
    pending = []
    for k, entry in enumerate(entries):
        pending.append({key: entry[key] for key in keep})
        if len(pending) == batch_size or k == count - 1:
            batch = collate(pending, dtype=torch.float64)
            batch["pos"], batch["cell"] = batch["pos"].to(dtype), batch["cell"].to(dtype)
            batch["task"] = torch.full_like(batch["natoms"], t)
            batch = {key: v.to(device) for key, v in batch.items()}
            with torch.no_grad():
                preds = model(batch)
            outputs["natoms"].append(batch["natoms"].cpu().numpy())
            for name, value in preds.items():
                outputs.setdefault(name, []).append(value.detach().double().cpu().numpy())
            pending = []
    arrays = {name: np.concatenate(values) for name, values in outputs.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(out), buf.getvalue())
    print(f"wrote predictions for {count} structures to {out}: {', '.join(sorted(arrays))}")
    return arrays


def task_index(config, task: str | None) -> int:
    names = [t.name for t in config.tasks]
    if task is None:
        if len(names) > 1:  # (a pretraining checkpoint: each task has its own heads)
            raise TrainError(f"the checkpoint has {len(names)} tasks, {names}: choose one with --task")
        return 0
    if task not in names:
        raise TrainError(f"--task {task!r} is not a task of the checkpoint (tasks: {names})")
    return names.index(task)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] == "demo":
            demo(argv[1:])
        elif argv[0] in ("eval", "predict"):
            parser = argparse.ArgumentParser(prog=f"python -m jmp_ext.train {argv[0]}")
            parser.add_argument("checkpoint")
            parser.add_argument("data", help="dataset directory" + (" or ASE-readable file" if argv[0] == "predict" else ""))
            parser.add_argument("--task", default=None, help="task whose heads to use (needed when the checkpoint has several: pretraining)")
            parser.add_argument("--out", required=argv[0] == "predict", default=None)
            parser.add_argument("--batch-size", type=int, default=16)
            parser.add_argument("--device", default="cpu")
            a = parser.parse_args(argv[1:])
            if argv[0] == "eval":
                evaluate_checkpoint(a.checkpoint, a.data, a.task, a.out, a.batch_size, a.device)
            else:
                predict(a.checkpoint, a.data, a.out, a.task, a.batch_size, a.device)
        else:
            mode = argv[0] if argv[0] in ("pretrain", "finetune") else None
            rest = argv[1:] if mode else argv
            path = rest[0] if rest and "=" not in rest[0] else None
            overrides = rest[1:] if path else rest
            config = load_config(path, [*overrides, *([f"mode={mode}"] if mode else [])])
            run_training(config)
    except (ConfigError, TrainError, FileNotFoundError, ValueError) as e:  # bad input: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
