"""The JMP effect at demo scale: fine-tune the demo's pretrained model and the same network from
scratch, with the same budget, on the held-out domains, over several seeds.

    python -m jmp_ext.train                       # pretrain -> runs/demo/last.pt (once)
    python -m jmp_ext.train.demo_compare          # -> runs/jmp_effect/{results.json,table.md,curves.png}
    python -m jmp_ext.train.demo_compare --pretrained runs/demo1000/last.pt --steps 90 --jobs 2

(docs/jmp_effect/README.md has the recorded run.)

Tasks: md (one molecule's trajectory, energy + direct forces; metric: force MAE) and materials
(bulk alloys, energy per atom with mean reduction; metric: its MAE). Both runs of a pair share
every setting but the initial weights (pretrained EMA backbone vs random). "Steps to match" is the
first validation step at which the pretrained run's validation metric is at or below the scratch
run's final one; the speed-up is the scratch budget divided by it.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import shlex
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from jmp_ext.files import write_bytes_atomic
from jmp_ext.train.config import build_config
from jmp_ext.train.loop import Trainer

TASKS = {
    "md": {"targets": [{"name": "energy", "kind": "energy", "coef": 1.0},
                       {"name": "forces", "kind": "forces", "coef": 10.0}], "metric": "md/forces_mae"},
    "materials": {"targets": [{"name": "energy_per_atom", "kind": "scalar", "reduction": "mean"}],
                  "metric": "materials/energy_per_atom_mae"},
}


def finetune_config(domain: str, root: str, run_dir: Path, init: str, seed: int, steps: int) -> dict:
    return {
        "mode": "finetune", "run_dir": str(run_dir), "overwrite": True, "seed": seed, "threads": 1,
        "tasks": [{"name": domain, "train": f"{root}/{domain}/train", "val": f"{root}/{domain}/val",
                   "test": f"{root}/{domain}/test", "forces": "direct", "targets": TASKS[domain]["targets"]}],
        "graph": {"preset": "oc20", "cutoff": 5.0, "max_neighbors": 8},  # the demo pretraining's graphs
        "model": {"backbone": "tiny", "init_checkpoint": init},
        "data": {"batch_size": 8, "val_batch_size": 32, "in_memory": True},
        "optim": {"lr": 5e-4, "grad_clip_norm": 1.0},
        "schedule": {"warmup": 5, "warmup_start_factor": 0.1, "cosine": 0, "min_lr_factor": 0.1},
        "loop": {"max_steps": steps, "val_every": max(steps // 6, 1), "ckpt_every": steps, "log_every": 10,
                 "fit_scale_factors": 0 if init else 2, "progress": False},
    }


def val_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f)
                if r["split"] == "val" and r["name"] == metric]


def finetune(domain: str, kind: str, init: str, seed: int, root: str, out: str, steps: int) -> dict:
    """One fine-tuning run; returns its test metric, validation curve and training seconds."""
    run_dir = Path(out) / domain / f"{kind}_seed{seed}"
    summary = Trainer(build_config(finetune_config(domain, root, run_dir, init, seed, steps))).train()
    metric = TASKS[domain]["metric"]
    return {"seed": seed, "test": summary["test"][metric], "curve": val_curve(run_dir, metric),
            "seconds": summary["seconds"]}


def summarize(results: dict, steps: int) -> str:
    """Markdown table; adds each domain's per-seed "steps_to_match" (None: not reached) to results."""
    table = ["| task (metric) | pretrained test | scratch test | improvement | steps to match scratch | speed-up |",
             "|---|---|---|---|---|---|"]
    for domain, runs in results.items():
        pre = np.array([r["test"] for r in runs["pretrained"]])
        scr = np.array([r["test"] for r in runs["scratch"]])
        matches = []
        for p, s in zip(runs["pretrained"], runs["scratch"]):
            target = s["curve"][-1][1]
            matches.append(next((step for step, v in p["curve"] if v <= target), None))
        found = [m for m in matches if m is not None]
        speedup = f"{steps / np.mean(found):.1f}x" if len(found) == len(matches) else f"not reached in {matches.count(None)} of {len(matches)} seeds"
        runs["steps_to_match"] = matches
        table.append(f"| {domain} ({TASKS[domain]['metric'].split('/')[1]}) | {pre.mean():.4g} ± {pre.std():.2g} | "
                     f"{scr.mean():.4g} ± {scr.std():.2g} | {100 * (1 - pre.mean() / scr.mean()):.0f}% | "
                     f"{', '.join('-' if m is None else str(m) for m in matches)} of {steps} | {speedup} |")
    return "\n".join(table) + "\n"


def compare(pretrained: str, root: str, out: Path, steps: int, seeds: list[int], jobs: int = 1) -> dict:
    runs = [(domain, kind, init, seed) for domain in TASKS for seed in seeds
            for kind, init in (("pretrained", pretrained), ("scratch", ""))]
    # Every run is single-threaded and seeded, so running them side by side changes no number.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(finetune, *run, root, str(out), steps) for run in runs]
    results: dict = {}
    for (domain, kind, _, _), future in zip(runs, futures):
        results.setdefault(domain, {}).setdefault(kind, []).append(future.result())
    text = summarize(results, steps)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "results.json", json.dumps(results, indent=1).encode())
    write_bytes_atomic(out / "table.md", text.encode())
    plot(results, out / "curves.png")
    return results


def plot(results: dict, path: Path) -> None:
    """Validation curves, pretrained vs scratch, one panel per task (matplotlib comes with ase)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6))
    for ax, (domain, runs) in zip(np.atleast_1d(axes), results.items()):
        for kind, color in (("pretrained", "tab:blue"), ("scratch", "tab:orange")):
            for k, r in enumerate(runs[kind]):
                steps, values = zip(*r["curve"])
                ax.plot(steps, values, color=color, alpha=0.8, label=kind if k == 0 else None)
        ax.set(title=domain, xlabel="fine-tuning step", ylabel=TASKS[domain]["metric"].split("/")[1] + " (val)",
               yscale="log")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_bytes_atomic(path, buf.getvalue())


def main() -> None:
    # The first paragraph: its first line alone stops mid-sentence (argparse rewraps the text).
    parser = argparse.ArgumentParser(prog="python -m jmp_ext.train.demo_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default="runs/demo/last.pt", help="the demo pretraining's checkpoint")
    parser.add_argument("--data", default="demo_data",
                        help="the demo data (python -m jmp_ext.data make-demo): its md and materials domains; for "
                             "your own data, fine-tune with and without model.init_checkpoint instead")
    parser.add_argument("--out", default="runs/jmp_effect", help="runs, results.json, table.md, curves.png")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="fine-tuning runs side by side (each uses one thread)")
    a = parser.parse_args()
    if not Path(a.pretrained).is_file():
        raise SystemExit(f"{a.pretrained} does not exist: run `python -m jmp_ext.train` (the demo pretraining) first")
    missing = [f"{a.data}/{d}/{s}" for d in TASKS for s in ("train", "val", "test") if not Path(a.data, d, s).is_dir()]
    if missing:
        raise SystemExit(f"{a.data} is not the demo data (no {', '.join(missing)}): make it with `python -m "
                         f"jmp_ext.data make-demo {shlex.quote(a.data)}`; for your own data, fine-tune with and without "
                         "model.init_checkpoint")
    compare(a.pretrained, a.data, Path(a.out), a.steps, a.seeds, a.jobs)


if __name__ == "__main__":
    main()
