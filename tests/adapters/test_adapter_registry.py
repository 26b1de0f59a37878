"""The Student contract shared by every adapter kind: registry, zero init, teacher path, training."""
from __future__ import annotations


import pytest
import torch

from helpers import model_inputs, perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import (
    Student,
    available_adapters,
    build_student,
    get_adapter_class,
    register_adapter,
)
from condistill.frozen import load_base

KINDS = [
    ("controlnet", {}),
    ("t2i_adapter", {"adapter_type": "full_adapter"}),
    ("t2i_adapter", {"adapter_type": "light_adapter"}),
    ("lora", {}),
    ("lora", {"targets": "all", "rank": 2, "lora_alpha": 4}),
]
IDS = ["controlnet", "t2i_full", "t2i_light", "lora", "lora_all"]


@pytest.fixture(scope="module")
def teacher(base_path):
    """A pristine base whose UNet is never wrapped (reference outputs)."""
    return load_base(base_path)


def test_registry():
    assert {"controlnet", "t2i_adapter", "lora"} <= set(available_adapters())
    assert get_adapter_class("controlnet").kind == "controlnet"
    with pytest.raises(ValueError, match="choose one of .*controlnet.*lora.*t2i_adapter"):
        get_adapter_class("hypernetwork")
    with pytest.raises(TypeError, match="Student subclass"):
        register_adapter("bogus", dict)
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("controlnet", type("Other", (Student,), {}))


def test_bare_unet_needs_vae_factor(base_path):
    base = load_base(base_path)
    with pytest.raises(ValueError, match="vae_scale_factor is required"):
        build_student("controlnet", base.unet, 3)
    with pytest.raises(ValueError, match="contradicts"):
        build_student("controlnet", base, 3, vae_scale_factor=8)
    student = build_student("t2i_adapter", base.unet, 3, vae_scale_factor=2)
    assert student.vae_scale_factor == 2


@pytest.mark.parametrize("kind,options", KINDS, ids=IDS)
def test_zero_init_is_exactly_the_teacher(kind, options, base_path, teacher):
    base = load_base(base_path)
    student = build_student(kind, base, 3, **options)
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        reference = teacher.unet(z, t, ehs).sample
        features = student.encode_condition(cond)
        out = student(z, t, ehs, features)
        plain = student(z, t, ehs, use_adapter=False)
    assert out.shape == z.shape
    assert torch.equal(out, reference)
    assert torch.equal(plain, reference)


@pytest.mark.parametrize("kind,options", KINDS, ids=IDS)
def test_trained_adapter_changes_output_but_not_teacher_path(kind, options, base_path, teacher):
    base = load_base(base_path)
    student = build_student(kind, base, 3, **options)
    params = student.trainable_named_parameters()
    assert params and all(p.requires_grad for p in params.values())
    # only adapter parameters are trainable; the UNet's own weights stay frozen
    frozen = {f"unet.{n}" for n, p in student.unet.named_parameters()} - set(params)
    assert all(not dict(student.named_parameters())[n].requires_grad for n in frozen)
    assert set(params) <= set(dict(student.named_parameters()))  # names usable for EMA swaps

    z, t, ehs, cond = model_inputs(base)
    target = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    student.train()
    assert not student.unet.training
    for _ in range(2):  # zero-init layers move first, then the rest of the adapter sees gradient
        loss = (student(z, t, ehs, student.encode_condition(cond)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        reference = teacher.unet(z, t, ehs).sample
        out = student(z, t, ehs, student.encode_condition(cond))
        plain = student(z, t, ehs, use_adapter=False)
    assert (out - reference).abs().max() > 1e-4
    assert torch.equal(plain, reference)
    assert all(p.requires_grad for p in student.trainable_named_parameters().values())


@pytest.mark.parametrize("kind,options", KINDS[:2] + KINDS[3:4], ids=["controlnet", "t2i_full", "lora"])
def test_trainable_state_dict_round_trip(kind, options, base_path):
    base = load_base(base_path)
    student = build_student(kind, base, 3, **options)
    saved = student.trainable_state_dict()
    perturb_(student, seed=1)
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        perturbed = student(z, t, ehs, student.encode_condition(cond))
        student.load_trainable_state_dict(saved)
        restored = student(z, t, ehs, student.encode_condition(cond))
        plain = student(z, t, ehs, use_adapter=False)
    assert not torch.equal(perturbed, restored)
    assert torch.equal(restored, plain)  # back to the zero init
    with pytest.raises(ValueError, match="missing key"):
        student.load_trainable_state_dict(dict(list(saved.items())[1:]))


def test_input_errors(base_path):
    base = load_base(base_path)
    student = build_student("t2i_adapter", base, 3)
    z, t, ehs, cond = model_inputs(base)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        student.encode_condition(torch.rand(2, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by 2"):
        student.encode_condition(torch.rand(2, 3, 15, 15))
    with pytest.raises(ValueError, match="encode_condition"):
        student(z, t, ehs)
    with pytest.raises(ValueError, match="condition_channels"):
        build_student("controlnet", base, 0)


def test_features_are_reusable(base_path):
    """The UNet pops adapter residuals from its list; features must survive repeated use."""
    base = load_base(base_path)
    student = build_student("t2i_adapter", base, 3)
    perturb_(student)
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        features = student.encode_condition(cond)
        first = student(z, t, ehs, features)
        second = student(z, t, ehs, features)
    assert len(features) == len(base.unet.down_blocks)
    assert torch.equal(first, second)
