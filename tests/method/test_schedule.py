"""Tests of the pure schedule math against closed forms and diffusers' own schedulers."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from condistill.method.schedule import (
    add_noise,
    alpha_sigma,
    boundary_scalings,
    consistency_function,
    ddim_step,
    make_alphas_cumprod,
    normalize_prediction_type,
    sampling_timesteps,
    skip_grid,
    split_prediction,
)


# --------------------------------------------------------------------- prediction type
@pytest.mark.parametrize(
    "name, expected",
    [
        ("epsilon", "epsilon"),
        ("eps", "epsilon"),
        (" EPS ", "epsilon"),
        ("v_prediction", "v_prediction"),
        ("v", "v_prediction"),
        ("vprediction", "v_prediction"),
        ("v-prediction", "v_prediction"),
        ("V_Prediction", "v_prediction"),
        ("sample", "sample"),
        ("x0", "sample"),
    ],
)
def test_normalize_prediction_type_aliases(name, expected):
    assert normalize_prediction_type(name) == expected


@pytest.mark.parametrize("bad", ["flow", "", "v_predictions", None, 3])
def test_normalize_prediction_type_rejects_with_valid_names(bad):
    with pytest.raises(ValueError, match="v_prediction"):
        normalize_prediction_type(bad)


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ours = make_alphas_cumprod(1000, 0.00085, 0.012, beta_schedule)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.alphas_cumprod, rtol=0, atol=0)


def test_alphas_cumprod_trained_betas_and_zero_snr():
    betas = torch.linspace(1e-4, 2e-2, 100)
    ours = make_alphas_cumprod(100, trained_betas=betas.tolist())
    torch.testing.assert_close(ours, torch.cumprod(1 - betas, 0))
    ref = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012)
    zsnr = make_alphas_cumprod(1000, rescale_betas_zero_snr=True)
    assert zsnr[-1].item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(zsnr, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one beta per training timestep"):
        make_alphas_cumprod(1000, trained_betas=[0.1] * 10)
    with pytest.raises(ValueError, match="scaled_linear"):
        make_alphas_cumprod(1000, beta_schedule="sigmoidal")


# -------------------------------------------------------------------------------- grid
def test_skip_grid_values():
    grid = skip_grid(1000, 50)
    assert grid.dtype == torch.long and grid.shape == (50,)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1].item() == 999
    assert torch.all(grid[1:] - grid[:-1] == 20)
    assert skip_grid(1000, 1).tolist() == [999]
    assert skip_grid(1000, 1000).tolist() == list(range(1000))


@pytest.mark.parametrize("n", [0, -1, 1001, 30])
def test_skip_grid_rejects_bad_sizes(n):
    with pytest.raises(ValueError, match="num_grid"):
        skip_grid(1000, n)


@pytest.mark.parametrize("n", [10, 20, 25, 40, 50, 100])
def test_sampling_timesteps_match_lcm_and_lie_on_grid(n):
    grid = skip_grid(1000, n)
    lcm = LCMScheduler(original_inference_steps=n)
    for k in range(1, n + 1):
        ts = sampling_timesteps(grid, k)
        assert ts.dtype == torch.long and ts.shape == (k,)
        assert ts[0].item() == 999
        assert torch.all(ts[1:] < ts[:-1])
        assert torch.isin(ts, grid).all(), f"off-grid timesteps for N={n}, K={k}: {ts.tolist()}"
        lcm.set_timesteps(k)
        assert ts.tolist() == lcm.timesteps.tolist()


def test_sampling_timesteps_known_values_and_errors():
    grid = skip_grid(1000, 50)
    assert sampling_timesteps(grid, 1).tolist() == [999]
    assert sampling_timesteps(grid, 2).tolist() == [999, 499]
    assert sampling_timesteps(grid, 4).tolist() == [999, 759, 499, 259]
    for bad in (0, 51, 2.5, -1):
        with pytest.raises(ValueError, match="between 1 and"):
            sampling_timesteps(grid, bad)


# ------------------------------------------------------------------------ coefficients
def test_alpha_sigma_shapes_and_values():
    ac = make_alphas_cumprod()
    t = torch.tensor([0, 499, 999])
    a, s = alpha_sigma(ac, t)
    assert a.shape == (3, 1, 1, 1) and s.shape == (3, 1, 1, 1)
    torch.testing.assert_close(a.flatten() ** 2 + s.flatten() ** 2, torch.ones(3))
    torch.testing.assert_close(a.flatten(), ac[t].sqrt())
    a1, s1 = alpha_sigma(ac, 499)
    assert a1.shape == (1, 1, 1, 1)
    assert a1.item() == a[1].item() and s1.item() == s[1].item()
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        alpha_sigma(ac, 1000)


def test_boundary_scalings_identical_to_lcm():
    lcm = LCMScheduler(timestep_scaling=10.0)
    ts = torch.arange(0, 1000)
    c_skip, c_out = boundary_scalings(ts)
    assert c_skip.shape == (1000, 1, 1, 1)
    for t in range(0, 1000, 7):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert c_skip[t].item() == ref_skip.item() and c_out[t].item() == ref_out.item()
        py_skip, py_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip[t].item() == pytest.approx(py_skip, rel=1e-6, abs=1e-12)
        assert c_out[t].item() == pytest.approx(py_out, rel=1e-6)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    s5, o5 = boundary_scalings(5, sigma_data=0.3, timestep_scaling=2.0)
    assert s5.item() == pytest.approx(0.09 / (100 + 0.09)) and o5.item() == pytest.approx(10 / (100.09) ** 0.5)


# ----------------------------------------------------------------- model output algebra
@pytest.mark.parametrize("kind", ["epsilon", "v", "sample"])
def test_split_prediction_recovers_truth(kind):
    g = torch.Generator().manual_seed(0)
    ac = make_alphas_cumprod()
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    eps = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([19, 500, 999])
    a, s = alpha_sigma(ac, t)
    z = a * x0 + s * eps
    out = {"epsilon": eps, "v": a * eps - s * x0, "sample": x0}[kind]
    x0_hat, eps_hat = split_prediction(out, z, a, s, kind)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=2e-4)
    # a DDIM step with the exact estimates lands exactly on the forward process at the new level
    a2, s2 = alpha_sigma(ac, torch.tensor([0, 250, 500]))
    torch.testing.assert_close(ddim_step(x0_hat, eps_hat, a2, s2), a2 * x0 + s2 * eps, rtol=1e-4, atol=2e-4)


def test_v_and_epsilon_are_not_interchangeable():
    ac = make_alphas_cumprod()
    x0, eps = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), -0.5)
    a, s = alpha_sigma(ac, 600)
    z = a * x0 + s * eps
    v = a * eps - s * x0
    wrong, _ = split_prediction(v, z, a, s, "epsilon")
    assert not torch.allclose(wrong, x0, atol=1e-2)


def test_split_prediction_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        split_prediction(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 3, 3), torch.ones(1, 1, 1, 1),
                         torch.zeros(1, 1, 1, 1), "epsilon")


def test_consistency_function_matches_lcm_step():
    g = torch.Generator().manual_seed(1)
    lcm = LCMScheduler(prediction_type="v_prediction")
    lcm.set_timesteps(1)  # single step: prev_sample is exactly the denoised estimate
    z = torch.randn(1, 4, 6, 6, generator=g)
    out = torch.randn(1, 4, 6, 6, generator=g)
    t = lcm.timesteps[0]
    ref = lcm.step(out, t, z).denoised
    F, x0_hat, eps_hat = consistency_function(out, z, t.reshape(1), lcm.alphas_cumprod, "vprediction")
    torch.testing.assert_close(F, ref, rtol=1e-6, atol=1e-6)
    c_skip, c_out = boundary_scalings(t.reshape(1))
    torch.testing.assert_close(F, c_skip * z + c_out * x0_hat)


def test_consistency_function_boundary_at_t0_is_identity():
    ac = make_alphas_cumprod()
    z = torch.randn(2, 4, 3, 3)
    F, _, _ = consistency_function(torch.randn(2, 4, 3, 3), z, torch.tensor([0, 0]), ac, "epsilon")
    torch.testing.assert_close(F, z)


def test_add_noise_matches_diffusers_and_keeps_dtype():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ours = add_noise(z0, eps, t, ref.alphas_cumprod)
    torch.testing.assert_close(ours, ref.add_noise(z0, eps, t))
    assert add_noise(z0.half(), eps.half(), t, ref.alphas_cumprod).dtype == torch.float16


# --------------------------------------------------------------------- start timestep
def test_sampling_timesteps_from_a_start_point_choose_on_the_grid_below_it():
    grid = skip_grid(1000, 50)
    for k in (1, 2, 4):
        assert torch.equal(sampling_timesteps(grid, k, start=999), sampling_timesteps(grid, k))
    for start in (19, 259, 499, 739):
        for k in range(1, min(4, (start + 1) // 20) + 1):
            ts = sampling_timesteps(grid, k, start=start)
            below = grid[grid <= start]
            # the same rule as from the top, applied to the grid points up to ``start``
            assert torch.equal(ts, sampling_timesteps(below, k))
            assert int(ts[0]) == start and all(bool((grid == t).any()) for t in ts)
    assert sampling_timesteps(grid, 2, start=499).tolist() == [499, 259]
    with pytest.raises(ValueError, match="not a point of the training grid"):
        sampling_timesteps(grid, 1, start=498)
    with pytest.raises(ValueError, match="not a point of the training grid"):
        sampling_timesteps(grid, 1, start=True)
    with pytest.raises(ValueError, match="up to the start timestep 19"):
        sampling_timesteps(grid, 2, start=19)
