"""SDXL bases: a tiny random SDXL (tests/helpers.py) through the whole chain.

Loading (two text encoders, pooled embeddings, size/crop ids, the float32 VAE), the three
adapter kinds at step 0, classifier-free guidance on the dict conditioning, a distillation run
and its resume, the export, and the stock SDXL pipelines of ``load_adapter`` sampling 4 steps.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_base, make_tiny_sdxl_base, perturb_, tiny_run_config, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.adapters.save_load import load_student, save_adapter
from condistill.frozen import SD, SDXL, fingerprint_mismatch, load_base
from condistill.method.guidance import guided_output
from condistill.pipeline import load_adapter

KINDS = ["controlnet", "t2i_adapter", "lora"]
PIPELINE_CLASS = {
    "controlnet": "StableDiffusionXLControlNetPipeline",
    "t2i_adapter": "StableDiffusionXLAdapterPipeline",
    "lora": "StableDiffusionXLAdapterPipeline",
}


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    return make_tiny_sdxl_base(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sdxl(sdxl_path):
    return load_base(sdxl_path)


@pytest.fixture
def fresh(sdxl_path):
    """A base of its own: the lora kind injects its layers into the UNet it is built on."""
    return load_base(sdxl_path)


def _inputs(base, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = base.resolution // base.vae_scale_factor
    z = torch.randn(batch, base.latent_channels, h, h, generator=gen)
    t = torch.randint(0, base.num_train_timesteps, (batch,), generator=gen)
    text = base.encode_prompts((["a red cube", "a blue ball on the sky"] * batch)[:batch])
    cond = torch.rand(batch, 3, base.resolution, base.resolution, generator=gen)
    return z, t, text, cond


def test_load_base_recognises_sdxl(sdxl, sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert sdxl.family is SDXL and sdxl.resolution == 64 and sdxl.vae_scale_factor == 4
    for module in (sdxl.text_encoder, sdxl.text_encoder_2):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    text = sdxl.encode_prompts(["a red cube", ""])
    assert sorted(text) == ["encoder_hidden_states", "text_embeds"]
    assert text["encoder_hidden_states"].shape == (2, 32, 64) and text["text_embeds"].shape == (2, 32)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    with torch.no_grad():
        hidden, negative, pooled, negative_pooled = pipe.encode_prompt("a red cube", device="cpu")
    torch.testing.assert_close(text["encoder_hidden_states"][:1], hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(text["text_embeds"][:1], pooled, rtol=0, atol=1e-6)
    # "" is the unconditional conditioning the stock pipeline guides with (force_zeros_for_empty_prompt)
    assert torch.equal(text["encoder_hidden_states"][1:], negative) and torch.equal(text["text_embeds"][1:], negative_pooled)

    fp = sdxl.fingerprint()
    assert fp["family"] == "sdxl"
    sd = load_base(make_tiny_base(tmp_path))
    assert sd.family is SD and "family" not in sd.fingerprint()
    assert any(p.startswith("family: 'sd'") for p in fingerprint_mismatch(sd.fingerprint(), fp))


def test_force_upcast_vae_stays_float32_under_float16(sdxl_path):
    base = load_base(sdxl_path, dtype=torch.float16)
    assert base.unet.dtype == base.text_encoder_2.dtype == torch.float16
    assert base.vae.dtype == torch.float32  # SDXL's VAE overflows in float16
    latents = base.encode_images(torch.rand(1, 3, 64, 64).half() * 2 - 1)
    assert latents.dtype == torch.float32 and bool(torch.isfinite(latents).all())
    base.to(dtype=torch.float16)
    assert base.vae.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_adapter_leaves_the_base_unchanged(fresh, kind):
    sdxl = fresh
    z, t, text, cond = _inputs(sdxl)
    student = build_student(kind, sdxl, 3)
    with torch.no_grad():
        teacher = sdxl.predict(z, t, text)
        assert torch.equal(student(z, t, text, student.encode_condition(cond)), teacher)
        assert torch.equal(student(z, t, text, use_adapter=False), teacher)
        perturb_(student)
        assert not torch.allclose(student(z, t, text, student.encode_condition(cond)), teacher)
        assert torch.equal(student(z, t, text, use_adapter=False), teacher)


def test_t2i_adapter_xl_feeds_the_mid_block(sdxl):
    z, t, text, cond = _inputs(sdxl)
    student = build_student("t2i_adapter", sdxl, 3)
    assert student.adapter_options["adapter_type"] == "full_adapter_xl"
    perturb_(student)
    with torch.no_grad():
        features = student.encode_condition(cond)
        assert len(features) == 4  # three down blocks and the mid block
        without_mid = features[:3] + [torch.zeros_like(features[3])]
        assert not torch.allclose(student(z, t, text, features), student(z, t, text, without_mid))
    with pytest.raises(ValueError, match="Use adapter_type='full_adapter_xl'"):
        build_student("t2i_adapter", sdxl, 3, adapter_type="full_adapter")


def test_guidance_doubles_the_dict_conditioning(sdxl):
    z, t, text, _ = _inputs(sdxl)
    uncond = sdxl.encode_prompts([""])
    w = torch.tensor([2.0, 5.0])
    with torch.no_grad():
        guided = guided_output(sdxl.predict, z, t, text, uncond, w)
        expanded = {k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()}
        u, c = sdxl.predict(z, t, expanded), sdxl.predict(z, t, text)
    # one call on the doubled batch against two calls: convolutions block their sums by batch size, and w=5
    # amplifies that rounding (measured up to 1.1e-5 on a busy 2-core machine)
    torch.testing.assert_close(guided, u + w.view(-1, 1, 1, 1) * (c - u), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="same entries"):
        guided_output(sdxl.predict, z, t, text, uncond["encoder_hidden_states"], 2.0)


def test_size_ids_default_to_the_latent_size_and_errors_are_clear(sdxl):
    z, t, text, _ = _inputs(sdxl)
    kwargs = sdxl.family.unet_kwargs(text, z, sdxl.vae_scale_factor)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    with torch.no_grad():
        cropped = sdxl.predict(z, t, {**text, "time_ids": torch.tensor([[128.0, 128, 32, 32, 64, 64]] * 2)})
        assert not torch.allclose(cropped, sdxl.predict(z, t, text))
    with pytest.raises(TypeError, match="a dict with"):
        sdxl.predict(z, t, text["encoder_hidden_states"])


def _manual_latents(student, scheduler, base, prompt, cond, latents, generator):
    """The 4-step sampler written out with the training-time student."""
    scheduler.set_timesteps(4)
    text = base.encode_prompts([prompt])
    features = student.encode_condition(cond)
    z = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(student(z, t.expand(z.shape[0]), text, features), t, z, generator=generator).prev_sample
    return z


def _check_stock_pipeline(folder, student, base, kind):
    from condistill.method.codi_scheduler import CoDiScheduler

    pipe = load_adapter(folder)
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    assert isinstance(pipe.scheduler, CoDiScheduler)
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    out = pipe("a red cube", image=cond, latents=latents.clone(), output_type="latent", height=64, width=64,
               generator=torch.Generator().manual_seed(11), num_inference_steps=4, guidance_scale=1.0)
    expected = _manual_latents(student, CoDiScheduler.from_config(pipe.scheduler.config), base, "a red cube", cond,
                               latents, torch.Generator().manual_seed(11))
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-4)
    image = pipe("a red cube", image=cond, output_type="np", height=64, width=64, num_inference_steps=4,
                 guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("kind", KINDS)
def test_export_and_stock_sdxl_pipeline(fresh, kind, tmp_path):
    sdxl = fresh
    student = build_student(kind, sdxl, 3)
    perturb_(student)
    save_adapter(student, tmp_path / kind, base_name_or_path=str(sdxl.name_or_path),
                 base_fingerprint=sdxl.fingerprint(), condition_name="edge", condition_config={}, num_grid=50,
                 prediction_type=sdxl.prediction_type, resolution=64, noise_schedule=sdxl.noise_schedule_config())
    assert json.loads((tmp_path / kind / "condistill_config.json").read_text())["base_fingerprint"]["family"] == "sdxl"
    saved, reloaded = student.file_state_dicts(), load_student(tmp_path / kind, sdxl).file_state_dicts()
    assert saved.keys() == reloaded.keys()
    for component, state in saved.items():
        assert state.keys() == reloaded[component].keys()
        assert all(torch.equal(value, reloaded[component][key]) for key, value in state.items())
    _check_stock_pipeline(tmp_path / kind, student, sdxl, kind)


def test_sdxl_export_is_checksummed_and_its_resolution_checked_against_the_base(sdxl, tmp_path):
    """An SDXL export records its files' SHA-256; an edited resolution the base cannot use (24: SDXL-shaped
    bases take multiples of their own 16 here, 32 at full size) is refused by both loaders."""
    from condistill.adapters.errors import AdapterConfigError
    from condistill.files import sha256_file

    out = save_adapter(build_student("t2i_adapter", sdxl, 3), tmp_path / "ad", base_name_or_path=str(sdxl.name_or_path),
                       base_fingerprint=sdxl.fingerprint(), condition_name="edge", condition_config={}, num_grid=50,
                       prediction_type=sdxl.prediction_type, resolution=64, noise_schedule=sdxl.noise_schedule_config())
    file = out / "condistill_config.json"
    config = json.loads(file.read_text())
    assert config["checksums"]["t2i_adapter/diffusion_pytorch_model.safetensors"] == sha256_file(
        out / "t2i_adapter" / "diffusion_pytorch_model.safetensors")
    file.write_text(json.dumps(dict(config, resolution=24)))
    with pytest.raises(AdapterConfigError, match="resolution = 24 cannot be used with the base .*multiples of 16"):
        load_student(out, sdxl)
    with pytest.raises(AdapterConfigError, match="resolution = 24 cannot be used with the base"):
        load_adapter(out)


def test_distill_resume_and_load_adapter(sdxl_path, sdxl, tmp_path):
    from condistill.training.loop import distill

    def cfg(out, steps, **extra):  # guided: the CFG branches double the dict conditioning
        return tiny_run_config(str(sdxl_path), out, max_steps=steps, checkpoint_every=1, guidance_min=1.0,
                               guidance_max=3.0, **extra)

    full = distill(cfg(tmp_path / "full", 2))
    part = distill(cfg(tmp_path / "part", 1))
    distill(cfg(part, 2, resume="latest"))
    for name in ("online.safetensors", "ema.safetensors"):
        a = load_file(str(full / "checkpoints/step-0000002" / name))
        b = load_file(str(part / "checkpoints/step-0000002" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in (full / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    student = load_student(full, sdxl)
    assert any(bool(p.abs().sum()) for p in student.controlnet.controlnet_down_blocks.parameters())  # it trained
    _check_stock_pipeline(full, student, sdxl, "controlnet")


@pytest.mark.parametrize("kind", ["t2i_adapter", "lora"])
def test_one_guided_step_trains_the_adapter(sdxl_path, fresh, kind, tmp_path):
    from condistill.training.loop import distill

    out = distill(tiny_run_config(str(sdxl_path), tmp_path / "run", adapter=kind, max_steps=1, lr_warmup_steps=0, guidance_min=1.0,
                                  guidance_max=3.0))
    assert np.isfinite(json.loads((out / "loss.jsonl").read_text().splitlines()[0])["loss"])
    student = load_student(out, fresh)
    z, t, text, cond = _inputs(fresh)
    with torch.no_grad():  # the step moved the zero-initialised adapter away from the teacher
        assert not torch.allclose(student(z, t, text, student.encode_condition(cond)), fresh.predict(z, t, text))


@pytest.mark.parametrize("kind", KINDS)
def test_sdxl_students_export_for_the_webui_tools(fresh, kind, tmp_path):
    """condistill export on SDXL: a ControlNet is written in diffusers' key layout (the one SDXL ControlNets are
    published in, which ComfyUI and A1111 read), a T2I-Adapter in the original full_adapter_xl layout, a LoRA as an
    SDXL kohya file; the printed diffusers code loads the run's weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from condistill.publish.formats import export

    student = build_student(kind, fresh, 3)
    perturb_(student)
    save_adapter(student, tmp_path / kind, base_name_or_path=str(fresh.name_or_path),
                 base_fingerprint=fresh.fingerprint(), condition_name="edge", condition_config={}, num_grid=50,
                 prediction_type=fresh.prediction_type, resolution=64, noise_schedule=fresh.noise_schedule_config())
    out = tmp_path / "student.safetensors"
    result = export(tmp_path / kind, "kohya" if kind == "lora" else "single-file", out, dtype="fp32")
    written = load_file(str(out))
    if kind == "controlnet":
        saved = load_file(str(tmp_path / kind / "controlnet" / "diffusion_pytorch_model.safetensors"))
        assert written.keys() == saved.keys() and all(torch.equal(written[k], saved[k]) for k in saved)
        assert "ControlNet (diffusers layout, as SDXL ControlNets are published)" in result.instructions
        assert "ControlNetModel.from_pretrained(" in result.instructions
    elif kind == "t2i_adapter":
        assert "conv_in.weight" in written and not any(k.startswith("adapter.") for k in written)
    else:
        with safe_open(str(out), framework="pt") as f:
            assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    flow = tmp_path / "student_comfyui.json"
    assert (flow in result.files) == flow.is_file()
