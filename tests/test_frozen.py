"""load_base: a frozen tiny teacher from a local folder or the offline hub cache."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import make_fake_hub_cache, make_tiny_base, torch_single_thread  # noqa: F401

from condistill.frozen import compute_fingerprint, fingerprint_mismatch, load_base


@pytest.fixture(scope="module")
def base(base_path):
    return load_base(base_path)


def test_modules_frozen_and_geometry(base, base_path):
    for module in (base.vae, base.text_encoder, base.unet):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert base.vae_scale_factor == 2
    assert base.latent_channels == 4
    assert base.resolution == 16
    assert base.num_train_timesteps == 1000
    assert base.prediction_type == "epsilon"
    assert base.name_or_path == str(base_path)
    fp = base.fingerprint()
    assert fp == {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 32,
        "sample_size": 8,
        "prediction_type": "epsilon",
    }
    json.dumps(fp)  # JSON-able


def test_alphas_cumprod_matches_diffusers_scheduler(base, base_path):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_pretrained(base_path, subfolder="scheduler").alphas_cumprod
    assert torch.equal(base.alphas_cumprod, ref)
    assert base.noise_schedule_config()["beta_schedule"] == "scaled_linear"


def test_encode_prompts_matches_stock_pipeline(base, base_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    ours = base.encode_prompts(["a red cube", ""])
    assert ours.shape == (2, 16, 32)
    stock, _ = pipe.encode_prompt("a red cube", "cpu", 1, False)
    torch.testing.assert_close(ours[:1], stock, rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1])  # "" is the unconditional embedding, different
    with pytest.raises(TypeError, match="list of strings"):
        base.encode_prompts("a red cube")


def test_encode_decode_images(base):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z = base.encode_images(x)
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(z, base.encode_images(x))  # the mean: deterministic
    expected = base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor
    torch.testing.assert_close(z, expected)
    z_sampled = base.encode_images(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(z_sampled, z)
    img = base.decode_latents(z)
    assert img.shape == (2, 3, 16, 16)
    assert img.min() >= -1 and img.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        base.encode_images(torch.zeros(1, 3, 15, 15))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        base.encode_images(torch.zeros(1, 4, 16, 16))


def test_v_prediction_and_alias_normalised(tmp_path):
    path = make_tiny_base(tmp_path, prediction_type="v_prediction")
    assert load_base(path).prediction_type == "v_prediction"
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "vprediction"  # the published crash trap
    cfg_file.write_text(json.dumps(cfg))
    base = load_base(path)
    assert base.prediction_type == "v_prediction"
    assert base.fingerprint()["prediction_type"] == "v_prediction"
    cfg["prediction_type"] = "sample"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supports 'epsilon'"):
        load_base(path)


def test_missing_folder_and_unknown_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_base(tmp_path / "does-not-exist")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1") as info:
        load_base("nobody/no-such-model")
    assert "local folder" in str(info.value)


def test_incomplete_folder_is_reported(base_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(base_path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match=r"missing subfolder\(s\) \['unet'\]"):
        load_base(broken)


def test_hub_id_from_offline_cache(base_path, base, tmp_path, monkeypatch):
    cache = make_fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-sd", base_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = load_base("tiny-org/tiny-sd")
    assert cached.name_or_path == "tiny-org/tiny-sd"
    for a, b in zip(cached.unet.parameters(), base.unet.parameters()):
        assert torch.equal(a, b)


def test_fingerprint_mismatch_lists_differences():
    cfg = {"in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64), "cross_attention_dim": 32, "sample_size": 8}
    a = compute_fingerprint(cfg, "eps")
    b = compute_fingerprint(dict(cfg, block_out_channels=[32, 64]), "epsilon")
    assert fingerprint_mismatch(a, b) == []  # tuples equal lists, aliases normalised
    c = compute_fingerprint(dict(cfg, cross_attention_dim=64), "v")
    problems = fingerprint_mismatch(a, c)
    assert len(problems) == 2
    assert any(p.startswith("cross_attention_dim") for p in problems)
    assert any(p.startswith("prediction_type") for p in problems)
