"""Named starting configs: JMP's real recipes (its configs/pretrain/jmp_l.py, config/jmp_l_pretrain.ipynb,
configs/finetune/jmp_l.py and config/all-jmp-l-configs.py) and the CPU demo.

A preset is a raw config mapping; a YAML file with `preset: NAME` (or the override `preset=NAME`)
starts from it. The dataset paths are left empty: give them, e.g.
  python -m jmp_ext.train finetune preset=jmp_s_qm9 tasks.0.train=/data/qm9/train \
      tasks.0.val=/data/qm9/val tasks.0.test=/data/qm9/test
"""

from __future__ import annotations

from typing import Callable

# Multipliers of JMP's layer-wise LR decay (fine-tuning).
LLRD = {
    "jmp_s": {"llrd_embedding": 0.3, "llrd_blocks": [0.30, 0.40, 0.55, 0.625]},
    "jmp_l": {"llrd_embedding": 0.3, "llrd_blocks": [0.55, 0.40, 0.30, 0.40, 0.55, 0.625]},
}

# JMP pretraining: per-dataset force coefficients (energy 1); each task has its own graph preset
# (JMP's tasks/pretrain/module.py, _generate_graphs: OC20/OC22 periodic at 12 Å, ANI-1x/T1x molecules
# at 8 Å; k = 30 for all).
PRETRAIN_TASKS = {"oc20": 73.0, "oc22": 80.0, "ani1x": 15.0, "transition1x": 14.0}


def _energy_forces(energy_coef: float, force_coef: float) -> list[dict]:
    return [{"name": "energy", "kind": "energy", "coef": energy_coef},
            {"name": "forces", "kind": "forces", "coef": force_coef}]


def _pretrain(size: str) -> dict:
    return {
        "mode": "pretrain",
        "tasks": [{"name": name, "train": "", "val": "", "forces": "direct", "graph": {"preset": name},
                   "structure_wise_force_loss": True, "targets": _energy_forces(1.0, coef)}
                  for name, coef in PRETRAIN_TASKS.items()],
        "model": {"backbone": size, "edge_dropout": 0.1},
        # JMP's notebook: 4 per GPU in a fast-dev-run; the real runs' global batch is not known.
        "data": {"batch_size": 4, "temperature": 2.0},
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip_norm": 1.0},
        # warmup 2000 steps from 0.2*lr, cosine to 0.1*lr until the end (max_epochs=2).
        "schedule": {"unit": "steps", "warmup": 2000, "warmup_start_factor": 0.2, "cosine": 0,
                     "min_lr_factor": 0.1},
        # Scale factors fitted on 16 batches, as JMP's fit_scales (fine-tuning: only without
        # model.init_checkpoint, whose factors come fitted).
        "loop": {"max_steps": 0, "max_epochs": 2, "ema_decay": 0.99, "precision": "fp16", "fit_scale_factors": 16,
                 "val_every": 5000, "ckpt_every": 1000, "log_every": 50},
    }


def _finetune(size: str, task: dict, batch_size: int, precision: str = "fp16", patience: int = 3,
              early_stop: int = 50, min_lr: float = 1e-8, max_epochs: float = 500,
              val_batch_size: int | None = None) -> dict:
    return {
        "mode": "finetune",
        "tasks": [{"train": "", "val": "", "test": "", **task}],
        "graph": {"preset": task["name"]},
        "model": {"backbone": size, "init_checkpoint": "", "init_ema": True},
        "data": {"batch_size": batch_size, "val_batch_size": val_batch_size or max(batch_size, 16)},
        # lr 8e-5: JMP's sweep script, config/all-jmp-l-configs.py (its per-dataset helpers say 5e-6).
        "optim": {"lr": 8e-5, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip_norm": 0.0,
                  "grad_clip_value": 1.0, **LLRD[size]},
        # warmup 5 epochs from 0.1*lr, cosine to 0.1*lr at epoch 32, then reduce-on-plateau 0.8.
        "schedule": {"unit": "epochs", "warmup": 5, "warmup_start_factor": 0.1, "cosine": 27,
                     "min_lr_factor": 0.1, "plateau_patience": patience, "plateau_factor": 0.8},
        "loop": {"max_steps": 0, "max_epochs": max_epochs, "ema_decay": 0.0, "precision": precision,
                 "early_stop_patience": early_stop, "min_lr": min_lr, "fit_scale_factors": 16,
                 "val_every": 0},
    }


def _finetune_presets(size: str) -> dict[str, Callable[[], dict]]:
    # QM9's U_0 less per-element references (JMP subtracts them for U_0, U, H, G, ZPVE, c_v).
    u0 = {"name": "qm9", "forces": "direct",
          "targets": [{"name": "U_0", "kind": "scalar", "reduction": "sum", "linref": True}]}
    rmd17 = {"name": "rmd17", "forces": "gradient", "targets": _energy_forces(0.0, 10.0)}
    # (JMP: direct forces for Ac-Ala3-NHMe and the double-walled nanotube, fp32 for some molecules)
    md22 = {"name": "md22", "forces": "gradient", "targets": _energy_forces(1.0, 100.0)}
    spice = {"name": "spice", "forces": "gradient", "targets": _energy_forces(1.0, 100.0)}
    matbench = {"name": "matbench", "forces": "direct",  # (JMP: reduction max for phonons)
                "targets": [{"name": "y", "kind": "scalar", "reduction": "mean"}]}
    qmof = {"name": "qmof", "forces": "direct",
            "targets": [{"name": "y", "kind": "scalar", "reduction": "mean"}]}
    return {
        f"{size}_qm9": lambda: _finetune(size, u0, 48),
        f"{size}_rmd17": lambda: _finetune(size, rmd17, 1, precision="fp32", patience=10, early_stop=1000,
                                           min_lr=1e-10, max_epochs=100_000),
        # (validated in training's batches too: 16 molecules of up to 370 atoms with 12 Å graphs and
        # gradient forces take tens of GB, over 5 GB each for MD22's larger ones on JMP-S)
        f"{size}_md22": lambda: _finetune(size, md22, 2, val_batch_size=2),
        f"{size}_spice": lambda: _finetune(size, spice, 2, val_batch_size=2),
        f"{size}_matbench": lambda: _finetune(size, matbench, 8, precision="fp32"),
        f"{size}_qmof": lambda: _finetune(size, qmof, 4),
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "jmp_s_pretrain": lambda: _pretrain("jmp_s"),
    "jmp_l_pretrain": lambda: _pretrain("jmp_l"),
    **_finetune_presets("jmp_s"),
    **_finetune_presets("jmp_l"),
}


def demo(root: str = "demo_data", run_dir: str = "runs/demo") -> dict:
    """The CPU demo: pretrain a tiny GemNet-OC on the demo data's catalysis + molecules domains
    (temperature sampling, per-task heads, EMA), sized for about 30 s on 2 cores. Small graphs
    (5 Å, 8 neighbours) and batches; JMP's recipe otherwise. Each demo run starts over in run_dir."""
    def task(name: str, force_coef: float) -> dict:
        return {"name": name, "train": f"{root}/{name}/train", "val": f"{root}/{name}/val", "forces": "direct",
                "structure_wise_force_loss": True, "targets": _energy_forces(1.0, force_coef)}

    return {
        "mode": "pretrain", "run_dir": run_dir, "overwrite": True, "seed": 0, "threads": 1,
        "tasks": [task("catalysis", 10.0), task("molecules", 10.0)],
        "graph": {"preset": "oc20", "cutoff": 5.0, "max_neighbors": 8},
        "model": {"backbone": "tiny", "edge_dropout": 0.1},
        "data": {"batch_size": 8, "val_batch_size": 32, "temperature": 2.0, "in_memory": True},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip_norm": 1.0},
        "schedule": {"unit": "steps", "warmup": 20, "warmup_start_factor": 0.2, "cosine": 0, "min_lr_factor": 0.1},
        "loop": {"max_steps": 150, "val_every": 75, "ckpt_every": 50, "log_every": 10, "ema_decay": 0.99,
                 "fit_scale_factors": 2, "precision": "fp32"},
    }
