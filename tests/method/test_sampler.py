"""The latent samplers: starting from a noised image instead of pure noise."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from condistill.method.codi_scheduler import CoDiScheduler
from condistill.method.sampler import sample_latents


def _recording_oracle(x0, alphas_cumprod, seen):
    """The exact epsilon for data that is the single point ``x0``; records each call's inputs."""

    def fn(z, t, text, **kwargs):
        seen.append((z.clone(), t.clone()))
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        return (z - a * x0) / s

    return fn


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("steps, start, expected", [(1, 499, [499]), (2, 499, [499, 259]), (1, 259, [259])])
def test_start_from_an_image_noises_it_to_the_start_and_steps_from_there(stochastic, steps, start, expected):
    sched = CoDiScheduler(stochastic=stochastic)
    shape = (2, 4, 8, 8)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    seen = []
    text = torch.zeros(2, 3, 5)
    z = sample_latents(_recording_oracle(x0, sched.alphas_cumprod, seen), sched, shape, text, text, steps,
                       generator=torch.Generator().manual_seed(7), init_latents=x0, start_timestep=start)
    assert [int(t[0]) for _, t in seen] == expected
    # the first model input is the image noised to the start with the generator's first draw
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(seen[0][0], sched.add_noise(x0, noise, start))
    # an exact model of that one image brings it back from any start
    torch.testing.assert_close(z, x0, rtol=1e-4, atol=1e-4)


def test_start_from_pure_noise_is_unchanged_by_the_new_arguments():
    sched = CoDiScheduler()
    shape = (1, 4, 8, 8)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    seen = []
    text = torch.zeros(1, 3, 5)
    sample_latents(_recording_oracle(x0, sched.alphas_cumprod, seen), sched, shape, text, text, 2,
                   generator=torch.Generator().manual_seed(3))
    assert [int(t[0]) for _, t in seen] == [999, 499]
    torch.testing.assert_close(seen[0][0], torch.randn(shape, generator=torch.Generator().manual_seed(3)))


def test_start_arguments_are_checked():
    sched = CoDiScheduler()
    shape = (1, 4, 8, 8)
    text = torch.zeros(1, 3, 5)
    fn = _recording_oracle(torch.zeros(shape), sched.alphas_cumprod, [])
    with pytest.raises(ValueError, match="go together"):
        sample_latents(fn, sched, shape, text, text, 1, init_latents=torch.zeros(shape))
    with pytest.raises(ValueError, match="go together"):
        sample_latents(fn, sched, shape, text, text, 1, start_timestep=499)
    with pytest.raises(ValueError, match="expected \\(1, 4, 8, 8\\)"):
        sample_latents(fn, sched, shape, text, text, 1, init_latents=torch.zeros(2, 4, 8, 8), start_timestep=499)
    with pytest.raises(ValueError, match="needs a CoDi sampler"):
        sample_latents(fn, DDIMScheduler(), shape, text, text, 1, init_latents=torch.zeros(shape), start_timestep=499)
    with pytest.raises(ValueError, match="not a point of the training grid"):
        sample_latents(fn, sched, shape, text, text, 1, init_latents=torch.zeros(shape), start_timestep=500)


def test_sample_images_takes_one_start_not_both(base_path):
    from condistill.frozen import load_base
    from condistill.method.sampler import sample_images

    base = load_base(base_path)
    h = base.resolution // base.vae_scale_factor
    with pytest.raises(ValueError, match="not both"):
        sample_images(base, base.predict, ["a"], 1, init_images=torch.zeros(1, 3, base.resolution, base.resolution),
                      init_latents=torch.zeros(1, base.latent_channels, h, h), start_timestep=499)


def test_sample_latents_sets_the_timesteps_before_scaling_the_noise():
    """A scheduler whose one-step schedule starts from the zero latent scales the first latent by s_t, and the next
    call (four steps from the top) by 1 again: ``sample_latents`` sets the timesteps first, as the pipelines do."""
    from condistill.method.codi_scheduler import CoDiScheduler
    from condistill.method.sampler import sample_latents

    scheduler = CoDiScheduler(one_step_start={"timestep": 499, "from": "zero"})
    seen = []

    def model(z, t, text):
        seen.append((int(t[0]), z.clone()))
        return torch.zeros_like(z)

    text = torch.zeros(1, 2, 4)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    sample_latents(model, scheduler, (1, 4, 8, 8), text, text, 1, generator=torch.Generator().manual_seed(0))
    sample_latents(model, scheduler, (1, 4, 8, 8), text, text, 4, generator=torch.Generator().manual_seed(0))
    assert [t for t, _ in seen] == [499, 999, 759, 499, 259]
    torch.testing.assert_close(seen[0][1], noise * scheduler.alphas_cumprod[499].sub(1).neg().sqrt())
    torch.testing.assert_close(seen[1][1], noise)
