"""condistill.training.lr: warm-up then constant (the loop) or cosine (the world-building tools)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.optimization import get_scheduler

from condistill.training.lr import lr_factor, warmup_schedule


def test_constant_with_warmup_matches_diffusers_exactly():
    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = make(opt)
        out = []
        for _ in range(30):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: warmup_schedule(opt, 20))
    theirs = lrs(lambda opt: get_scheduler("constant_with_warmup", opt, num_warmup_steps=20))
    assert ours == theirs


def test_cosine_decays_to_the_floor():
    assert lr_factor(0, 10, 110, 0.1) == 0.0
    assert lr_factor(5, 10, 110, 0.1) == pytest.approx(0.5)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 0, 110, 0.0) == pytest.approx(0.0)


def test_scheduler_state_resumes():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, 4)
    for _ in range(2):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_schedule(opt2, 4)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.5]
