import math

import pytest
from torch import nn

from jmp_ext.train.config import OptimConfig, ScheduleConfig
from jmp_ext.train.optim import LRSchedule, build_optimizer, llrd_group


class FakeNet(nn.Module):
    """The state_dict layout of a JMP network with 2 blocks."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.ModuleDict({"atom_embedding": nn.Embedding(5, 3)})
        self.backbone = nn.Module()
        self.backbone.bases = nn.Linear(3, 3)
        self.backbone.int_blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(2)])
        self.backbone.out_blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])
        self.backbone.out_mlp_E = nn.Linear(3, 3)
        self.output = nn.Linear(3, 1)


@pytest.mark.parametrize("name, group", [
    ("embedding.atom_embedding.weight", "embedding"),
    ("backbone.int_blocks.0.weight", "blocks_0"),
    ("backbone.out_blocks.0.weight", "blocks_0"),
    ("backbone.out_blocks.1.bias", "blocks_0"),
    ("backbone.int_blocks.1.weight", "blocks_1"),
    ("backbone.out_blocks.2.weight", "blocks_1"),
    ("backbone.bases.weight", "rest"),
    ("backbone.out_mlp_E.weight", "rest"),
    ("output.weight", "rest"),
])
def test_llrd_groups_follow_jmp(name, group):
    assert llrd_group(name, 2) == group


def test_optimizer_groups_and_lrs():
    net = FakeNet()
    opt = build_optimizer(net, OptimConfig(lr=1.0, llrd_embedding=0.3, llrd_blocks=[0.5, 0.7]), num_blocks=2)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {n: g["lr"] for n, g in by_name.items()} == {"embedding": 0.3, "blocks_0": 0.5, "blocks_1": 0.7, "rest": 1.0}
    counted = sum(len(g["params"]) for g in opt.param_groups)
    assert counted == len(list(net.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="llrd_blocks has 1 multipliers but the backbone has 2"):
        build_optimizer(net, OptimConfig(llrd_blocks=[0.5]), num_blocks=2)


def test_frozen_parameters_are_left_out():
    net = FakeNet()
    net.embedding.requires_grad_(False)
    opt = build_optimizer(net, OptimConfig(), num_blocks=2)
    assert "embedding" not in {g["name"] for g in opt.param_groups}
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(net, OptimConfig(), num_blocks=2)


def _lr_curve(schedule, steps, group="rest"):
    out = []
    for s in range(steps):
        schedule.set_step(s)
        out.append(next(g["lr"] for g in schedule.optimizer.param_groups if g["name"] == group))
    return out


def test_warmup_cosine_matches_closed_form():
    opt = build_optimizer(FakeNet(), OptimConfig(lr=2.0, llrd_blocks=[0.5, 1.0]), num_blocks=2)
    sched = LRSchedule(opt, ScheduleConfig(warmup=10, warmup_start_factor=0.2, cosine=20, min_lr_factor=0.1),
                       base_lr=2.0, warmup_steps=10, cosine_steps=20)
    lrs = _lr_curve(sched, 40)
    for s, lr in enumerate(lrs):
        if s < 10:
            want = 2.0 * (0.2 + 0.8 * s / 10)
        elif s < 30:
            want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 20)))
        else:
            want = 0.2
        assert lr == pytest.approx(want, rel=1e-12), s
    # A decayed group's floor is min_lr_factor / mult (JMP): 0.1 / 0.5 = 0.2 of its own base lr.
    assert _lr_curve(sched, 40, "blocks_0")[-1] == pytest.approx(2.0 * 0.5 * 0.2)


def test_plateau_only_after_cosine_and_state_roundtrip():
    """JMP's ReduceLROnPlateau (torch's defaults: threshold 1e-4, relative) after the cosine."""
    opt = build_optimizer(FakeNet(), OptimConfig(lr=1.0), num_blocks=2)
    cfg = ScheduleConfig(warmup=0, cosine=5, min_lr_factor=0.5, plateau_patience=1, plateau_factor=0.5)
    sched = LRSchedule(opt, cfg, base_lr=1.0, warmup_steps=0, cosine_steps=5)
    for metric in [1.0, 2.0, 3.0]:  # during the cosine: ignored
        sched.on_validation(2, metric)
    assert sched.plateau_scale == 1.0
    sched.on_validation(5, 1.0)   # best
    sched.on_validation(6, 1.0 - 5e-5)   # bad 1 (<= patience): better by less than torch's 1e-4 (rel)
    assert sched.plateau_scale == 1.0 and sched.best == 1.0
    sched.on_validation(7, 1.5)   # bad 2 > patience: reduce
    assert sched.plateau_scale == 0.5
    sched.set_step(8)
    assert sched.lr == pytest.approx(0.25)
    # A classification task's metric is -accuracy: the same accuracy again is no improvement.
    negative = LRSchedule(opt, cfg, base_lr=1.0, warmup_steps=0, cosine_steps=5)
    for step in (5, 6, 7):
        negative.on_validation(step, -0.9)
    assert negative.plateau_scale == 0.5
    other = LRSchedule(opt, cfg, base_lr=1.0, warmup_steps=0, cosine_steps=5)
    other.load_state_dict(sched.state_dict())
    other.set_step(8)
    assert other.lr == sched.lr
