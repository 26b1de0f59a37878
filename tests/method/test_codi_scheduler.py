"""Tests of CoDiScheduler: the grid it samples on, exactness with a perfect model, config
round-trips and running inside stock diffusers pipelines built from tiny random components."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler

from condistill.method.schedule import sampling_timesteps, skip_grid
from condistill.method.codi_scheduler import CoDiScheduler, CoDiSchedulerOutput


def _oracle(z0: torch.Tensor, kind: str, alphas_cumprod: torch.Tensor):
    """A perfect model for the single data point z0: the exact target of its prediction type at any (z, t)."""

    def fn(z, t):
        abar = alphas_cumprod[int(t)]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (z - a * z0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * z0, "sample": z0.clone()}[kind]

    return fn


def _sample(scheduler: CoDiScheduler, fn, z: torch.Tensor, generator=None):
    outs = []
    for t in scheduler.timesteps:
        out = scheduler.step(fn(scheduler.scale_model_input(z, t), t), t, z, generator=generator)
        outs.append(out)
        z = out.prev_sample
    return z, outs


# ------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("num_grid", [50, 25, 100])
def test_timesteps_are_the_training_grid_subset(num_grid):
    sched = CoDiScheduler(num_grid=num_grid)
    grid = skip_grid(1000, num_grid)
    assert torch.equal(sched.grid, grid)
    lcm = LCMScheduler(original_inference_steps=num_grid)
    for k in range(1, num_grid + 1):
        sched.set_timesteps(k)
        assert sched.num_inference_steps == k
        assert torch.equal(sched.timesteps, sampling_timesteps(grid, k))
        assert torch.isin(sched.timesteps, grid).all()
        assert sched.timesteps[0].item() == 999
        lcm.set_timesteps(k)
        assert sched.timesteps.tolist() == lcm.timesteps.tolist()


def test_set_timesteps_values_custom_and_errors():
    sched = CoDiScheduler()
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    sched.set_timesteps(timesteps=[999, 499])
    assert sched.timesteps.tolist() == [999, 499] and sched.num_inference_steps == 2
    with pytest.raises(ValueError, match="not on the training grid"):
        sched.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[499, 999])
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="between 1 and"):
        sched.set_timesteps(51)


def test_set_timesteps_from_a_start_timestep():
    sched = CoDiScheduler()
    sched.set_timesteps(1, start_timestep=499)
    assert sched.timesteps.tolist() == [499] and sched.num_inference_steps == 1
    sched.set_timesteps(2, start_timestep=499)
    assert sched.timesteps.tolist() == [499, 259]
    sched.set_timesteps(4, start_timestep=999)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="not a point of the training grid"):
        sched.set_timesteps(1, start_timestep=500)
    with pytest.raises(ValueError, match="up to the start timestep 39"):
        sched.set_timesteps(3, start_timestep=39)
    with pytest.raises(ValueError, match="start_timestep goes with num_inference_steps"):
        sched.set_timesteps(timesteps=[499], start_timestep=499)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_perfect_model_recovers_z0_deterministic(kind, steps):
    sched = CoDiScheduler(prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    sched.set_timesteps(steps)
    z, outs = _sample(sched, _oracle(z0, kind, sched.alphas_cumprod), torch.randn(2, 4, 8, 8, generator=g))
    torch.testing.assert_close(z, z0, rtol=1e-4, atol=1e-4)
    assert len(outs) == steps and all(isinstance(o, CoDiSchedulerOutput) for o in outs)
    for o in outs:
        torch.testing.assert_close(o.denoised, z0, rtol=1e-4, atol=1e-4)
    # deterministic mode re-noises with the predicted noise: z_next = a_next * x0_est + s_next * eps_hat(z, t)
    ac = sched.alphas_cumprod
    z_in = outs[0].prev_sample
    for i in range(1, steps - 1):
        t_i, t_next = int(sched.timesteps[i]), int(sched.timesteps[i + 1])
        eps_hat = (z_in - ac[t_i].sqrt() * z0) / (1 - ac[t_i]).sqrt()
        expected = ac[t_next].sqrt() * outs[i].denoised + (1 - ac[t_next]).sqrt() * eps_hat
        torch.testing.assert_close(outs[i].prev_sample, expected, rtol=1e-5, atol=1e-5)
        z_in = outs[i].prev_sample


def test_step_deterministic_update_formula():
    sched = CoDiScheduler(prediction_type="epsilon")
    sched.set_timesteps(2)
    g = torch.Generator().manual_seed(1)
    z, out = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    res = sched.step(out, 999, z)
    ac = sched.alphas_cumprod
    a, s = ac[999].sqrt(), (1 - ac[999]).sqrt()
    u = 999 * 10.0
    c_skip, c_out = 0.25 / (u * u + 0.25), u / (u * u + 0.25) ** 0.5
    x0 = (z - s * out) / a
    denoised = c_skip * z + c_out * x0
    torch.testing.assert_close(res.denoised, denoised)
    a2, s2 = ac[499].sqrt(), (1 - ac[499]).sqrt()
    torch.testing.assert_close(res.prev_sample, a2 * denoised + s2 * out)
    prev, den = sched.step(out, torch.tensor(499), z, return_dict=False)
    assert torch.equal(prev, den)  # last step returns the estimate itself


def test_stochastic_mode_renoises_with_generator():
    kind = "v_prediction"
    g = torch.Generator().manual_seed(0)
    z0, zT = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    det = CoDiScheduler(prediction_type=kind)
    sto = CoDiScheduler(prediction_type=kind, stochastic=True)
    det.set_timesteps(3)
    sto.set_timesteps(3)
    fn = _oracle(z0, kind, det.alphas_cumprod)
    _, outs_det = _sample(det, fn, zT)
    z_a, outs_a = _sample(sto, fn, zT, torch.Generator().manual_seed(5))
    z_b, _ = _sample(sto, fn, zT, torch.Generator().manual_seed(5))
    z_c, _ = _sample(sto, fn, zT, torch.Generator().manual_seed(6))
    assert torch.equal(z_a, z_b)
    assert not torch.allclose(outs_a[0].prev_sample, outs_det[0].prev_sample)
    torch.testing.assert_close(z_a, z0, rtol=1e-4, atol=1e-4)  # a perfect model still lands on z0
    torch.testing.assert_close(z_c, z0, rtol=1e-4, atol=1e-4)
    # the fresh noise is standard normal: prev = a * x0 + s * n
    ac = sto.alphas_cumprod
    t1 = int(sto.timesteps[1])
    n = (outs_a[0].prev_sample - ac[t1].sqrt() * outs_a[0].denoised) / (1 - ac[t1]).sqrt()
    assert abs(n.mean().item()) < 0.3 and abs(n.std().item() - 1.0) < 0.3


def test_step_errors_and_utilities():
    sched = CoDiScheduler()
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(z, 999, z)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="not in the current schedule"):
        sched.step(z, 500, z)
    assert sched.scale_model_input(z, 999) is z
    assert sched.init_noise_sigma == 1.0 and sched.order == 1 and len(sched) == 1000
    half = torch.randn(1, 4, 2, 2).half()
    assert sched.step(half, 999, half).prev_sample.dtype == torch.float16
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([3, 999])
    x, n = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(sched.add_noise(x, n, t), ref.add_noise(x, n, t))


# ------------------------------------------------------------------------------- config
def test_config_round_trip(tmp_path):
    sched = CoDiScheduler(prediction_type="vprediction", num_grid=25, beta_schedule="linear", beta_start=1e-4,
                          beta_end=0.02, stochastic=True, timestep_scaling=5.0)
    assert sched.config.prediction_type == "v_prediction"
    sched.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "CoDiScheduler" and saved["num_grid"] == 25
    loaded = CoDiScheduler.from_pretrained(tmp_path)
    again = CoDiScheduler.from_config(sched.config)
    for other in (loaded, again):
        public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
        assert public(other.config) == public(sched.config)
        assert torch.equal(other.alphas_cumprod, sched.alphas_cumprod)
        other.set_timesteps(3)
        sched.set_timesteps(3)
        assert torch.equal(other.timesteps, sched.timesteps)


@pytest.mark.parametrize("cls", [DDIMScheduler, PNDMScheduler, DDPMScheduler, LCMScheduler])
def test_from_teacher_scheduler_config(cls):
    teacher = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                  steps_offset=1)
    sched = CoDiScheduler.from_config(teacher.config)
    assert sched.config.prediction_type == "v_prediction"
    assert torch.equal(sched.alphas_cumprod, teacher.alphas_cumprod)
    # keys of the teacher's scheduler (steps_offset, timestep_spacing, ...) are kept as hidden config by
    # diffusers so one can switch back, but they do not move the sampling grid
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]
    assert CoDiScheduler.from_config(sched.config).config.prediction_type == "v_prediction"
    override = CoDiScheduler.from_config(teacher.config, num_grid=20, stochastic=True)
    assert override.config.num_grid == 20 and override.config.stochastic is True


def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        CoDiScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule"):
        CoDiScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="num_grid"):
        CoDiScheduler(num_grid=30)
    with pytest.raises(ValueError, match="v_prediction"):
        CoDiScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon")
    zsnr = CoDiScheduler(rescale_betas_zero_snr=True, prediction_type="v")
    assert zsnr.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ stock pipelines
def _tiny_tokenizer(path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=16)


@pytest.fixture(scope="module")
def tiny_components(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
    ).eval()
    teacher_sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=teacher_sched)


def _record_timesteps(unet):
    seen = []
    handle = unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).flatten()[0])),
        with_kwargs=True,
    )
    return seen, handle


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_runs_in_stable_diffusion_pipeline(tiny_components, guidance_scale):
    from diffusers import StableDiffusionPipeline

    c = tiny_components
    pipe = StableDiffusionPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.scheduler = CoDiScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen, handle = _record_timesteps(pipe.unet)
    try:
        out = pipe(["a red cat", "a dog"], height=32, width=32, num_inference_steps=4, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()
    assert seen == [999, 759, 499, 259]
    latents = pipe(["a red cat"], height=32, width=32, num_inference_steps=1, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def _controlnet_pipeline(c, pipeline_class):
    """A stock ControlNet pipeline of ``pipeline_class`` on the tiny components, with the stochastic CoDiScheduler."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(c["unet"], conditioning_embedding_out_channels=(4, 8)).eval()
    pipe = pipeline_class(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        controlnet=controlnet, scheduler=CoDiScheduler.from_config(c["scheduler"].config, stochastic=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_runs_in_controlnet_pipeline(tiny_components):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = _controlnet_pipeline(tiny_components, StableDiffusionControlNetPipeline)
    control = torch.rand(1, 3, 32, 32)
    kwargs = dict(image=control, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(a, b)  # the stochastic re-noising uses the pipeline's generator


def test_runs_in_controlnet_img2img_pipeline_from_a_start_timestep(tiny_components):
    """The stock img2img pipeline's ``strength`` picks the start: 2 steps at strength 0.5 is one
    step from t=499 on the image noised there, the path the sr and inpaint docs show."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    pipe = _controlnet_pipeline(tiny_components, StableDiffusionControlNetImg2ImgPipeline)
    init, control = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    seen, handle = _record_timesteps(pipe.unet)
    try:
        for steps, strength, expected in [(2, 0.5, [499]), (4, 0.5, [499, 259]), (4, 1.0, [999, 759, 499, 259])]:
            seen.clear()
            out = pipe("a cat", image=init, control_image=control, num_inference_steps=steps, strength=strength,
                       guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images
            assert seen == expected and out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    finally:
        handle.remove()


def test_a_one_step_start_in_the_config_is_a_dict_on_the_grid():
    from condistill.method.codi_scheduler import CoDiScheduler

    with pytest.raises(ValueError, match="must be null or"):
        CoDiScheduler(one_step_start=499)
    with pytest.raises(ValueError, match="timestep 500 must be a timestep of the training grid"):
        CoDiScheduler(one_step_start={"timestep": 500, "from": "zero"})
    scheduler = CoDiScheduler(one_step_start={"timestep": 499, "from": "zero"})
    scheduler.set_timesteps(timesteps=[499])  # what stock pipelines pass when given timesteps=: the same start
    assert scheduler.init_noise_sigma == pytest.approx(float((1 - scheduler.alphas_cumprod[499]).sqrt()))
    scheduler.set_timesteps(timesteps=[999, 499])
    assert scheduler.init_noise_sigma == 1.0
    scheduler = CoDiScheduler(one_step_start={"timestep": 499, "from": "input"})
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [499] and scheduler.init_noise_sigma == 1.0  # img2img noises image=
