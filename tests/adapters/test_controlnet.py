"""ControlNet student: UNet-encoder copy, condition embedding at the VAE factor, pretrained start that trains."""
from __future__ import annotations


import pytest
import torch

from helpers import model_inputs, perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.adapters.controlnet import default_conditioning_embedding_channels
from condistill.frozen import load_base


def test_copies_the_unet_encoder_and_matches_vae_factor(base_path):
    base = load_base(base_path)
    student = build_student("controlnet", base, 4)
    cn = student.controlnet
    for a, b in zip(cn.down_blocks.parameters(), base.unet.down_blocks.parameters()):
        assert torch.equal(a, b)
    assert cn.config.conditioning_channels == 4
    assert tuple(cn.config.conditioning_embedding_out_channels) == (16, 32)  # VAE factor 2: one stride-2 conv
    assert student.adapter_options["conditioning_embedding_out_channels"] == [16, 32]
    assert all(not p.any() for p in cn.controlnet_down_blocks.parameters())  # zero convolutions
    _, _, _, cond = model_inputs(base)
    emb = cn.controlnet_cond_embedding(torch.rand(1, 4, 16, 16))
    assert emb.shape[-2:] == (8, 8)  # latent resolution
    assert cond.shape[1] == 3


def test_default_embedding_channels():
    assert default_conditioning_embedding_channels(8) == (16, 32, 96, 256)  # diffusers' SD default
    assert default_conditioning_embedding_channels(4) == (16, 32, 96)
    assert default_conditioning_embedding_channels(1) == (16,)
    assert default_conditioning_embedding_channels(16) == (16, 32, 96, 256, 256)


def test_embedding_channels_must_match_factor(base_path):
    base = load_base(base_path)
    with pytest.raises(ValueError, match="downsamples by 4 but the VAE factor is 2"):
        build_student("controlnet", base, 3, conditioning_embedding_out_channels=[8, 16, 32])


def test_pretrained_controlnet_trains(base_path, tmp_path):
    """A published trap: a pretrained option that loads weights but trains nothing."""
    base = load_base(base_path)
    donor = build_student("controlnet", base, 3)
    perturb_(donor, seed=3)
    donor.controlnet.save_pretrained(tmp_path / "cn")

    student = build_student("controlnet", base, 3, pretrained_controlnet=tmp_path / "cn")
    assert student.initialized_from == str(tmp_path / "cn")
    donor_params = donor.trainable_named_parameters()
    params = student.trainable_named_parameters()
    assert set(params) == set(donor_params)
    assert all(torch.equal(params[k], donor_params[k]) for k in params)  # started from the saved weights
    assert all(p.requires_grad for p in params.values())
    assert student.controlnet.training

    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    z, t, ehs, cond = model_inputs(base)
    loss = student(z, t, ehs, student.encode_condition(cond)).pow(2).mean()
    loss.backward()
    with_grad = [k for k, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > 0.9 * len(params)  # non-zero start: gradient reaches nearly everything
    optimizer.step()
    changed = [k for k in params if not torch.equal(params[k], before[k])]
    assert set(with_grad) <= set(changed)
    assert any(k.startswith("controlnet.controlnet_down_blocks") for k in changed)
    assert any(k.startswith("controlnet.down_blocks") for k in changed)


def test_pretrained_controlnet_must_fit(base_path, tmp_path):
    base = load_base(base_path)
    build_student("controlnet", base, 3).controlnet.save_pretrained(tmp_path / "cn3")
    with pytest.raises(ValueError, match="conditioning_channels 3 != condition channels 4"):
        build_student("controlnet", base, 4, pretrained_controlnet=tmp_path / "cn3")
    with pytest.raises(FileNotFoundError, match="not an existing local folder"):
        build_student("controlnet", base, 3, pretrained_controlnet=tmp_path / "nope")
