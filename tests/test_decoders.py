"""Fast decoders: loading (folder, embedded, offline hub cache), the swap into stock pipelines, the
fit checks, and the embedded tiny decoder against the embedded teacher's full VAE (a few seconds)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from helpers import ROOT, make_fake_hub_cache, perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.adapters.save_load import save_adapter
from condistill.decoders import (
    EMBEDDED_DECODER,
    base_with_decoder,
    load_fast_decoder,
    upsampling_factor,
    use_fast_decoder,
)
from condistill.evaluation.metrics import psnr
from condistill.frozen import load_base
from condistill.hub import embedded_path
from condistill.pipeline import load_adapter

#: 35.3 dB measured by tools/train_tiny_decoder.py on 512 held-out scenes (docs/fast-decoder.md); the
#: test's 16 scenes are asserted with a margin
EMBEDDED_PSNR_FLOOR = 30.0


def tiny_decoder(latent_channels: int = 4, levels: int = 2, seed: int = 0):
    """A random ``AutoencoderTiny`` for the tiny inline base (4 latent channels, 2x)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8,) * levels, decoder_block_out_channels=(8,) * levels,
                           num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels,
                           latent_channels=latent_channels).eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def adapter_dir(base_path, tmp_path_factory):
    base = load_base(base_path)
    student = build_student("controlnet", base, 3)
    perturb_(student)
    return save_adapter(student, tmp_path_factory.mktemp("adapter") / "controlnet",
                        base_name_or_path=str(base_path), base_fingerprint=base.fingerprint(),
                        condition_name="edge", condition_config={}, num_grid=50,
                        prediction_type=base.prediction_type, recommended_steps=4, recommended_guidance=1.0,
                        resolution=base.resolution, noise_schedule=base.noise_schedule_config())


# ----------------------------------------------------------------------------- loading


def test_load_local_folder_and_pipeline_vae_subfolder(tmp_path):
    saved = tiny_decoder(seed=1)
    saved.save_pretrained(tmp_path / "taesd")
    saved.save_pretrained(tmp_path / "pipe" / "vae")
    for spec in (tmp_path / "taesd", str(tmp_path / "pipe")):
        loaded = load_fast_decoder(spec)
        assert type(loaded).__name__ == "AutoencoderTiny" and same_weights(loaded, saved)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert next(load_fast_decoder(tmp_path / "taesd", torch_dtype=torch.float16).parameters()).dtype == torch.float16


def test_load_hub_id_from_offline_cache(tmp_path, monkeypatch):
    saved = tiny_decoder(seed=2)
    saved.save_pretrained(tmp_path / "src")
    cache = make_fake_hub_cache(tmp_path / "hub", "tiny-org/taesd-tiny", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(load_fast_decoder("tiny-org/taesd-tiny"), saved)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1 forbids"):
        load_fast_decoder("tiny-org/not-cached")


def test_refuses_what_is_not_a_safetensors_autoencoder_tiny(tmp_path, base_path):
    with pytest.raises(ValueError, match="holds a AutoencoderKL"):
        load_fast_decoder(base_path)  # a whole pipeline whose vae/ is the full VAE
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no AutoencoderTiny config.json"):
        load_fast_decoder(tmp_path / "empty")
    tiny_decoder().save_pretrained(tmp_path / "pickled")
    weights = tmp_path / "pickled" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # never unpickled: refused before any load
    with pytest.raises(ValueError, match="safetensors weights only"):
        load_fast_decoder(tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match="not an embedded model"):
        load_fast_decoder("embedded:no-such-decoder")


# ----------------------------------------------------------------------------- the pipeline swap


def test_four_step_sample_through_a_stock_pipeline_decodes_with_the_fast_decoder(adapter_dir, tmp_path):
    pipe = load_adapter(adapter_dir)
    full = pipe.vae
    decoder = tiny_decoder(seed=3)
    decoder.save_pretrained(tmp_path / "dec")
    assert use_fast_decoder(pipe, tmp_path / "dec") is pipe
    assert same_weights(pipe.vae, decoder) and pipe.components["vae"] is pipe.vae
    assert pipe.config.vae[1] == "AutoencoderTiny" and pipe.condistill_full_vae is full

    cond = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(image=cond, num_inference_steps=4, guidance_scale=1.0)
    latents = pipe("a red cube", output_type="latent", generator=torch.Generator().manual_seed(5), **kwargs).images
    images = pipe("a red cube", output_type="pt", generator=torch.Generator().manual_seed(5), **kwargs).images
    assert images.shape == (1, 3, 16, 16)
    with torch.no_grad():
        expected = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        with_full = (full.decode(latents / full.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert (images - with_full).abs().max() > 0.01  # the full VAE no longer decodes

    pil = pipe("a red cube", generator=torch.Generator().manual_seed(5), **kwargs).images[0]
    assert pil.size == (16, 16)


def test_mismatched_decoders_are_refused_and_the_pipeline_is_unchanged(adapter_dir, base_path):
    pipe = load_adapter(adapter_dir)
    full = pipe.vae
    with pytest.raises(ValueError, match="decodes 16-channel latents but the base's have 4 channels"):
        use_fast_decoder(pipe, tiny_decoder(latent_channels=16))
    with pytest.raises(ValueError, match="upsamples by 4 but the base's VAE by 2"):
        use_fast_decoder(pipe, tiny_decoder(levels=3))
    with pytest.raises(ValueError, match="embedded:tiny-decoder for embedded:tiny-teacher"):
        use_fast_decoder(pipe, EMBEDDED_DECODER)  # a 4x decoder on this 2x base
    assert pipe.vae is full and pipe.config.vae[1] == "AutoencoderKL"
    with pytest.raises(TypeError, match="takes an AutoencoderTiny"):
        use_fast_decoder(pipe, full)
    with pytest.raises(TypeError, match="pipeline with a vae component"):
        use_fast_decoder(object(), tiny_decoder())
    with pytest.raises(ValueError, match="16-channel"):
        base_with_decoder(load_base(base_path), tiny_decoder(latent_channels=16))


def test_base_with_decoder_shares_the_rest(base_path):
    base = load_base(base_path)
    decoder = tiny_decoder(seed=4)
    fast = base_with_decoder(base, decoder)
    assert fast.vae is decoder and fast.unet is base.unet and base.vae is not decoder
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast.decode_latents(z), decoder.decode(z).sample.clamp(-1, 1))


# ----------------------------------------------------------------------------- the embedded decoder


@pytest.fixture(scope="module")
def teacher():
    return load_base("embedded:tiny-teacher")


@pytest.fixture(scope="module")
def heldout(teacher):
    from condistill.world.scenes import generate_scene

    images = [np.asarray(generate_scene(i, "heldout", teacher.resolution).image) for i in range(16)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_embedded_decoder_is_small_and_fits_the_embedded_teacher(teacher):
    folder = embedded_path(EMBEDDED_DECODER)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 5 * 2**20
    decoder = load_fast_decoder(EMBEDDED_DECODER)
    assert decoder.config.latent_channels == teacher.vae.config.latent_channels == 4
    assert upsampling_factor(decoder) == teacher.vae_scale_factor == 4
    assert decoder.config.scaling_factor == 1.0  # it decodes the UNet's scaled latents as they are


def test_embedded_decoder_matches_the_full_vae_on_teacher_latents(teacher, heldout):
    decoder = load_fast_decoder(EMBEDDED_DECODER)
    vae = teacher.vae
    z = teacher.encode_images(heldout)  # scaled latents, what the UNet makes
    with torch.no_grad():
        # exactly what a stock pipeline does with whichever VAE it holds
        full = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        fast = (decoder.decode(z / decoder.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        unscaled = (decoder.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        encoded = decoder.encode(heldout).latents * decoder.config.scaling_factor
    assert psnr(fast, full) > EMBEDDED_PSNR_FLOOR
    assert psnr(unscaled, full) < EMBEDDED_PSNR_FLOOR - 8  # the wrong latent scale is caught by this check
    # its encoder makes the teacher's latents too (image-to-image pipelines encode with pipe.vae)
    assert float((encoded - z).pow(2).mean().sqrt()) < 0.25 * float(z.std())


def test_embedded_decoder_inside_the_teacher_pipeline(teacher):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=teacher.unet, scheduler=_ddim(teacher), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    prompts = ["a red cube on a blue background", "a green ball on a yellow background"]
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, output_type="pt")
    full = pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    use_fast_decoder(pipe, EMBEDDED_DECODER)
    fast = pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert fast.shape == full.shape == (2, 3, 64, 64)
    assert psnr(fast, full) > EMBEDDED_PSNR_FLOOR - 3  # sampled latents are a little off the encoder's


def _ddim(base):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(base.scheduler_config)


# ----------------------------------------------------------------------------- the latency benchmark


def test_sampling_latency_times_the_fast_decoder_rows(base_path, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sampling_latency", ROOT / "benchmarks" / "sampling_latency.py")
    latency = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(latency)
    tiny_decoder(seed=5).save_pretrained(tmp_path / "dec")
    report = latency.main(["--base", str(base_path), "--batch-size", "1", "--repeats", "1", "--warmup", "0",
                           "--device", "cpu", "--student-steps", "4", "--ddim-steps", "50",
                           "--decoder", str(tmp_path / "dec")])
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["codi-4", "codi-4-fast", "ddim-50-cfg"]
    assert rows["codi-4"]["decoder"] == rows["ddim-50-cfg"]["decoder"] == "vae"
    assert rows["codi-4-fast"]["decoder"] == str(tmp_path / "dec") and rows["codi-4-fast"]["steps"] == 4
    assert report["reference"] == "ddim-50-cfg" and rows["codi-4-fast"]["speedup"] > 1
    assert f"| codi-4-fast | teacher | codi | 4 | 1 | {tmp_path / 'dec'} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        latency.main(["--base", str(base_path), "--decoder", str(tmp_path / "missing")])


# ----------------------------------------------------------------------------- the recipe


def test_train_tiny_decoder_recipe_is_seeded_and_validated(teacher):
    import train_tiny_decoder as recipe

    cfg = recipe.TinyDecoderConfig.smoke(train_scenes=8, steps=3, batch_size=4, log_every=1)
    logs = []
    first, facts = recipe.train(cfg, teacher, log=logs.append)
    second, _ = recipe.train(cfg, teacher, log=logs.append)
    assert same_weights(first, second)  # same config, same weights
    assert [h["step"] for h in facts["history"]] == [1, 2, 3] and all(h["decoder_mse"] > 0 for h in facts["history"])
    assert first.config.scaling_factor == 1.0 and upsampling_factor(first) == teacher.vae_scale_factor
    with pytest.raises(ValueError, match="batch_size"):
        recipe.TinyDecoderConfig(train_scenes=4, batch_size=8)
    with pytest.raises(ValueError, match="lr > 0"):
        recipe.TinyDecoderConfig(lr=0.0)


def test_load_adapter_takes_the_decoder_and_refuses_a_mismatch(adapter_dir, tmp_path):
    decoder = tiny_decoder(seed=3)
    decoder.save_pretrained(tmp_path / "dec")
    pipe = load_adapter(adapter_dir, decoder=tmp_path / "dec")
    assert pipe.config.vae[1] == "AutoencoderTiny" and same_weights(pipe.vae, decoder)
    assert type(pipe.condistill_full_vae).__name__ == "AutoencoderKL"
    with pytest.raises(ValueError):
        load_adapter(adapter_dir, decoder="embedded:tiny-decoder")  # 4x decoder, this base's VAE is 2x


def test_saved_decoders_load_without_a_config_warning(tmp_path):
    """save_fast_decoder drops the derived block_out_channels; loading then warns of nothing and
    the config still has it (the embedded decoder was saved this way too)."""
    import logging

    from diffusers import AutoencoderTiny
    from diffusers.utils import logging as diffusers_logging

    from condistill.decoders import save_fast_decoder

    class Collect(logging.Handler):
        messages: list = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    tiny.save_pretrained(tmp_path / "plain", safe_serialization=True)
    save_fast_decoder(tiny, tmp_path / "d")
    assert "block_out_channels" not in json.loads((tmp_path / "d" / "config.json").read_text())
    handler, root = Collect(), logging.getLogger("diffusers")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # other tests may have quietened diffusers
    root.addHandler(handler)
    try:
        load_fast_decoder(tmp_path / "plain")
        assert any("not expected" in m for m in handler.messages)  # a plain save does warn: the checks below can fail
        for spec in (tmp_path / "d", EMBEDDED_DECODER):
            handler.messages.clear()
            decoder = load_fast_decoder(spec)
            assert not any("not expected" in m for m in handler.messages)
            assert list(decoder.config.block_out_channels) == list(decoder.config.decoder_block_out_channels)
    finally:
        root.removeHandler(handler)
        diffusers_logging.set_verbosity(verbosity)
    assert upsampling_factor(load_fast_decoder(tmp_path / "d")) == 2
