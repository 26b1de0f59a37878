"""condistill.training.lr: the optimizer choice; warm-up then constant (the loop) or cosine (the world-building tools)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.optimization import get_scheduler

from condistill.training.lr import build_optimizer, lr_factor, warmup_schedule


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


def test_adamw_is_torchs():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer("adamw", params, 1e-3, 0.01, "cpu")
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.01


def test_adamw8bit_needs_cuda_then_bitsandbytes(monkeypatch):
    import sys
    import types

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="CUDA GPUs only .* device is cpu.*--optimizer adamw"):
        build_optimizer("adamw8bit", params, 1e-3, 0.0, "cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        build_optimizer("adamw8bit", params, 1e-3, 0.0, "cuda")

    made = {}

    class AdamW8bit:  # records what bitsandbytes' class would be given
        def __init__(self, params, lr, weight_decay):
            made.update(params=list(params), lr=lr, weight_decay=weight_decay)

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit)))
    assert isinstance(build_optimizer("adamw8bit", params, 1e-3, 0.1, "cuda"), AdamW8bit)
    assert made == {"params": params, "lr": 1e-3, "weight_decay": 0.1}
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        build_optimizer("sgd", params, 1e-3, 0.0, "cpu")
