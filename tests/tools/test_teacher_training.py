"""The teacher's training helpers (tools/worldbuild/training.py): EMA decay and learning-rate schedule."""
from __future__ import annotations

import math

import pytest
import torch

from condistill.training.ema import EMA
from condistill.training.lr import lr_factor
from worldbuild.architecture import TeacherArchitecture, build_text_encoder, build_unet
from worldbuild.tokenizer import build_tokenizer
from worldbuild.training import LR_FLOOR, trained_modules, warm_ema_decay


def test_warm_started_ema_decay():
    assert warm_ema_decay(1, 0.999) == pytest.approx(2 / 11)
    assert warm_ema_decay(90, 0.999) == pytest.approx(91 / 100)
    assert warm_ema_decay(100_000, 0.999) == 0.999
    with pytest.raises(ValueError, match="decay"):
        warm_ema_decay(1, 1.0)


def test_named_ema_over_both_networks_is_the_old_lerp():
    arch = TeacherArchitecture(text_hidden=16, text_heads=2, text_intermediate=32, text_layers=1,
                               unet_channels=(8, 16, 16), unet_heads=2, unet_norm_groups=8)
    torch.manual_seed(0)
    unet, text_encoder = build_unet(arch), build_text_encoder(arch, build_tokenizer())
    both = trained_modules(unet, text_encoder)
    named = dict(both.named_parameters())
    assert {n.split(".")[0] for n in named} == {"unet", "text_encoder"}
    ema = EMA(named)
    shadow = [p.detach().clone() for p in both.parameters()]  # the tools' former EMA
    for n in (1, 2):
        with torch.no_grad():
            for p in both.parameters():
                p.add_(0.1 * torch.randn_like(p))
        decay = warm_ema_decay(n, 0.999)
        ema.update(named, decay)
        torch._foreach_lerp_(shadow, [p.detach() for p in both.parameters()], 1.0 - decay)
    ema.copy_to(trained_modules(unet, text_encoder))
    assert all(torch.equal(s, p) for s, p in zip(shadow, both.parameters()))


def test_teacher_schedule_is_warmup_then_cosine_to_a_tenth():
    peak, warmup, total = 1e-3, 10, 110
    assert peak * lr_factor(0, warmup, total, LR_FLOOR) == 0.0
    assert peak * lr_factor(5, warmup, total, LR_FLOOR) == pytest.approx(peak / 2)
    assert peak * lr_factor(warmup, warmup, total, LR_FLOOR) == pytest.approx(peak)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert peak * lr_factor(60, warmup, total, LR_FLOOR) == pytest.approx(peak * mid)
    assert peak * lr_factor(total, warmup, total, LR_FLOOR) == pytest.approx(peak * LR_FLOOR)
