"""The distribution-matching math: the score difference, its sign, its normaliser and what gets gradients."""
import pytest
import torch

from condistill.method.distribution_matching import (dmd_gradient, dmd_loss, dmd_timesteps, gan_discriminator_loss,
                                                     gan_generator_loss)
from condistill.method.losses import codi_loss
from condistill.method.schedule import alpha_sigma, make_alphas_cumprod, skip_grid

ALPHAS = make_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")


def _x0_predictor(x0_of):
    """An epsilon-prediction model whose clean-latent estimate at (z, t) is ``x0_of(z, t)``."""
    def fn(z, t):
        a, s = alpha_sigma(ALPHAS, t, ndim=z.ndim)
        return (z - a * x0_of(z, t)) / s
    return fn


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.randint(20, 980, (b,), generator=g)
    return x, noise, t


def test_gradient_is_the_normalised_score_difference():
    x, noise, t = _inputs()
    real_target = torch.full_like(x, 0.5)
    fake_target = torch.full_like(x, -0.25)
    g, info = dmd_gradient(x, (_x0_predictor(lambda z, tt: real_target), _x0_predictor(lambda z, tt: fake_target)),
                           noise, t, ALPHAS, "epsilon")
    normaliser = (x - real_target).abs().mean(dim=(1, 2, 3))
    expected = (fake_target - real_target) / normaliser.view(-1, 1, 1, 1)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(info["normaliser"], normaliser, rtol=1e-5, atol=1e-6)


def test_real_and_fake_scores_see_the_same_noised_sample_and_timestep():
    x, noise, t = _inputs()
    seen = {}

    def recorder(name):
        def fn(z, tt):
            seen[name] = (z.clone(), tt.clone())
            return torch.zeros_like(z)
        return fn

    _, info = dmd_gradient(x, (recorder("real"), recorder("fake")), noise, t, ALPHAS, "epsilon")
    a, s = alpha_sigma(ALPHAS, t, ndim=4)
    torch.testing.assert_close(seen["real"][0], a * x + s * noise)
    assert torch.equal(seen["real"][0], seen["fake"][0]) and torch.equal(seen["real"][1], seen["fake"][1])
    assert torch.equal(seen["real"][1], t)
    assert torch.equal(info["x_t"], seen["real"][0])


def test_descending_the_loss_moves_the_sample_towards_the_real_score():
    """Real score says 'the data is at +1', fake says 'the student is where it is': x must move towards +1."""
    x, noise, t = _inputs()
    x = x.requires_grad_(True)
    target = torch.ones_like(x)
    real = _x0_predictor(lambda z, tt: target)
    snapshot = x.detach().clone()
    fake = _x0_predictor(lambda z, tt: snapshot)
    loss, _ = dmd_loss(x, (real, fake), noise, t, ALPHAS, "epsilon")
    loss.sum().backward()
    with torch.no_grad():
        moved = x - 0.1 * x.grad * x[0].numel()  # a small step along -g
    before = (snapshot - target).pow(2).mean(dim=(1, 2, 3))
    after = (moved - target).pow(2).mean(dim=(1, 2, 3))
    assert bool((after < before).all())


def test_loss_gradient_is_g_over_numel_and_no_score_network_gets_one():
    x, noise, t = _inputs()
    x = x.requires_grad_(True)
    real_net, fake_net = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)
    real = lambda z, tt: real_net(z)  # noqa: E731
    fake = lambda z, tt: fake_net(z)  # noqa: E731
    loss, info = dmd_loss(x, (real, fake), noise, t, ALPHAS, "epsilon")
    g, _ = dmd_gradient(x, (real, fake), noise, t, ALPHAS, "epsilon")
    loss.sum().backward()
    torch.testing.assert_close(x.grad, g / x[0].numel(), rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in [*real_net.parameters(), *fake_net.parameters()])
    assert loss.shape == (3,) and info["dmd_grad_norm"].shape == (3,)


def test_equal_scores_give_no_gradient():
    x, noise, t = _inputs()
    same = _x0_predictor(lambda z, tt: torch.zeros_like(z))
    g, _ = dmd_gradient(x, (same, same), noise, t, ALPHAS, "epsilon")
    assert torch.equal(g, torch.zeros_like(g))


def test_v_prediction_scores_are_converted_to_clean_latents():
    x, noise, t = _inputs()
    real_target, fake_target = torch.full_like(x, 0.3), torch.full_like(x, -0.1)

    def v_model(x0_value):
        def fn(z, tt):
            a, s = alpha_sigma(ALPHAS, tt, ndim=z.ndim)
            eps = (z - a * x0_value) / s
            return a * eps - s * x0_value
        return fn

    g, _ = dmd_gradient(x, (v_model(real_target), v_model(fake_target)), noise, t, ALPHAS, "v_prediction")
    normaliser = (x - real_target).abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    torch.testing.assert_close(g, (fake_target - real_target) / normaliser, rtol=1e-3, atol=1e-4)


def test_dmd_timesteps_stay_inside_the_range_and_reject_an_empty_one():
    t = dmd_timesteps(10_000, 1000, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 20 and int(t.max()) <= 979 and t.dtype == torch.long
    with pytest.raises(ValueError, match="empty"):
        dmd_timesteps(4, 1000, t_min=0.5, t_max=0.5)


def test_gan_losses_are_the_softplus_pairs():
    real, fake = torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [3.0]])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(gan_generator_loss(fake), sp(-fake).flatten())
    torch.testing.assert_close(gan_discriminator_loss(real, fake), (sp(-real) + sp(fake)).flatten())


def test_codi_loss_without_the_consistency_term_runs_no_target_branch():
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    grid, k = skip_grid(1000, 50), torch.tensor([3, 49])
    online = lambda z, t: 0.1 * z  # noqa: E731

    def never(z, t):
        raise AssertionError("the ODE and target branches must not run without the consistency term")

    loss, info = codi_loss(online, never, never, z0, noise, k, grid, ALPHAS, "epsilon", regression_weight=2.0,
                           consistency_weight=0.0)
    full, full_info = codi_loss(online, online, online, z0, noise, k, grid, ALPHAS, "epsilon", regression_weight=2.0)
    torch.testing.assert_close(loss, 2.0 * full_info["regression"])
    assert torch.equal(info["distill"], torch.zeros(2))
    torch.testing.assert_close(full, full_info["distill"] + 2.0 * full_info["regression"])
