"""2 CPU processes with gloo on loopback train exactly like 1 process with the same global batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from jmp_ext.train.checkpoint import load_checkpoint
from jmp_ext.train.config import build_config


def _config(data, run_dir):
    tasks = [{"name": n, "train": str(data / n / "train"), "val": str(data / n / "val"), "forces": "direct",
              "structure_wise_force_loss": True,
              "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces", "coef": 10.0}]}
             for n in ("mol", "box")]
    return build_config({"tasks": tasks, "run_dir": str(run_dir), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 8},
                         "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
                         "data": {"batch_size": 6, "val_batch_size": 4}, "schedule": {"warmup": 1},
                         "loop": {"max_steps": 3, "val_every": 0, "ckpt_every": 3, "ema_decay": 0.9,
                                  "precision": "fp64", "fit_scale_factors": 1, "progress": False}})


def _worker(rank, world_size, port, data, run_dir, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import jmp_ext.ops as ops
    from jmp_ext.train import distributed
    from jmp_ext.train.loop import Trainer

    try:
        summary = Trainer(_config(data, run_dir)).train()
        if rank == 0:
            torch.save(summary["val"], out)
    finally:
        distributed.teardown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tiny_data, tmp_path):
    from jmp_ext.train.loop import Trainer

    one = Trainer(_config(tiny_data, tmp_path / "one")).train()
    mp.spawn(_worker, args=(2, _free_port(), tiny_data, tmp_path / "two", tmp_path / "val.pt"), nprocs=2, join=True)
    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["loop"]["step"] == b["loop"]["step"] == 3
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-9, atol=1e-11, msg=key)
    for key in a["ema"]:
        torch.testing.assert_close(b["ema"][key], a["ema"][key], rtol=1e-9, atol=1e-11, msg=key)
    # Validation metrics reduced over the ranks equal the single-process ones.
    val = torch.load(tmp_path / "val.pt", weights_only=True)
    assert val == pytest.approx(one["val"], rel=1e-9)
