"""Tests of the CoDi loss, classifier-free guidance and the baseline diffusion loss."""
from __future__ import annotations

import math

import pytest
import torch

from condistill.method.guidance import guided_output
from condistill.method.losses import codi_loss, diffusion_loss, distance, sample_grid_index
from condistill.method.schedule import make_alphas_cumprod, skip_grid

AC = make_alphas_cumprod()
GRID = skip_grid(1000, 50)


def _lcm_scalings(t: int, sigma_data=0.5, scaling=10.0):
    u = t * scaling
    return sigma_data**2 / (u**2 + sigma_data**2), u / math.sqrt(u**2 + sigma_data**2)


def _oracle(z0: torch.Tensor, kind: str):
    """A perfect model for data z0: returns the exact target of its prediction type at (z, t)."""

    def fn(z, t):
        abar = AC[t].reshape(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (z - a * z0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * z0, "sample": z0.expand_as(z)}[kind]

    return fn


# ----------------------------------------------------------------------------- distance
def test_distance_l2_is_per_sample_mse():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).reshape(2, 2, 1, 1)
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]]).reshape(2, 2, 1, 1)
    torch.testing.assert_close(distance(pred, target), torch.tensor([2.5, 5.0]))


def test_distance_pseudo_huber_of_rms():
    pred, target = torch.full((3, 4, 2, 2), 0.3), torch.zeros(3, 4, 2, 2)
    pred[1] = 0.0
    c = 0.01
    d = distance(pred, target, "huber", huber_c=c)
    expected = torch.tensor([math.sqrt(0.09 + c * c) - c, 0.0, math.sqrt(0.09 + c * c) - c])
    torch.testing.assert_close(d, expected)
    # finite gradient at pred == target (no sqrt of a bare zero)
    p = torch.zeros(2, 3, requires_grad=True)
    distance(p, torch.zeros(2, 3), "huber").sum().backward()
    assert torch.isfinite(p.grad).all()


def test_distance_errors():
    with pytest.raises(ValueError, match="l2"):
        distance(torch.zeros(2, 3), torch.zeros(2, 3), kind="l1")
    with pytest.raises(ValueError, match="shape"):
        distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="huber_c"):
        distance(torch.zeros(2, 3), torch.zeros(2, 3), kind="huber", huber_c=0.0)


# ------------------------------------------------------------------------------ guidance
class _RecordingModel:
    """Output = embedding value + 10 * control value + 100 * t (per sample), so every input's order shows."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, emb, control=None, extra=None):
        self.calls.append({"z": z.clone(), "t": t, "emb": emb.clone(), "control": control, "extra": extra})
        out = emb[:, 0, 0].reshape(-1, 1, 1, 1) + torch.zeros_like(z)
        if control is not None:
            out = out + 10 * control.reshape(-1, 1, 1, 1)
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            out = out + 100 * t.reshape(-1, 1, 1, 1).to(out.dtype)
        return out


def _embs(batch):
    cond = torch.full((batch, 2, 3), 3.0)
    uncond = torch.full((1, 2, 3), 1.0)
    return cond, uncond


def test_guided_output_order_uncond_then_cond():
    model = _RecordingModel()
    z = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([1, 2, 3])
    control = torch.tensor([0.0, 1.0, 2.0])
    cond, uncond = _embs(3)
    w = torch.tensor([0.0, 1.0, 2.5])
    out = guided_output(model, z, t, cond, uncond, w, control=control, extra={"x": [control]})
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["z"].shape[0] == 6
    assert call["emb"][:3].eq(1.0).all() and call["emb"][3:].eq(3.0).all()  # [uncond, cond]
    assert call["t"].tolist() == [1, 2, 3, 1, 2, 3]
    assert call["control"].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    assert call["extra"]["x"][0].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    base = 10 * control + 100 * t.float()
    # w = 0 -> exactly the unconditional output, w = 1 -> exactly the conditional one
    assert torch.equal(out[0], torch.full_like(out[0], 1.0 + base[0].item()))
    assert torch.equal(out[1], torch.full_like(out[1], 3.0 + base[1].item()))
    assert torch.equal(out[2], torch.full_like(out[2], 1.0 + 2.5 * 2.0 + base[2].item()))


def test_guided_output_float_scale_and_scalar_t():
    model = _RecordingModel()
    z = torch.zeros(2, 1, 2, 2)
    cond, uncond = _embs(2)
    out = guided_output(model, z, 500, cond, uncond.expand(2, 2, 3), 7.5)
    assert model.calls[0]["t"] == 500 and model.calls[0]["z"].shape[0] == 4
    torch.testing.assert_close(out, torch.full_like(out, 1.0 + 7.5 * 2.0))


@pytest.mark.parametrize("w", [None, 1.0, 1, torch.ones(2)])
def test_guided_output_scale_one_is_single_conditional_pass(w):
    model = _RecordingModel()
    z = torch.zeros(2, 1, 2, 2)
    cond, _ = _embs(2)
    out = guided_output(model, z, torch.tensor([0, 0]), cond, None, w)
    assert len(model.calls) == 1 and model.calls[0]["z"].shape[0] == 2
    assert torch.equal(out, torch.full_like(out, 3.0))


def test_guided_output_errors():
    model = _RecordingModel()
    z = torch.zeros(2, 1, 2, 2)
    cond, uncond = _embs(2)
    with pytest.raises(ValueError, match="uncond_emb is required"):
        guided_output(model, z, 0, cond, None, 2.0)
    with pytest.raises(ValueError, match="control"):
        guided_output(model, z, 0, cond, uncond, 2.0, control=torch.zeros(3))
    with pytest.raises(ValueError, match="guidance"):
        guided_output(model, z, 0, cond, uncond, torch.ones(3) * 2)
    with pytest.raises(ValueError, match="cond_emb"):
        guided_output(model, z, 0, torch.zeros(3, 2, 3), uncond, 2.0)


# -------------------------------------------------------------------------- grid index
def test_sample_grid_index_range_and_determinism():
    g = torch.Generator().manual_seed(0)
    k = sample_grid_index(4000, 50, g)
    assert k.dtype == torch.long and k.shape == (4000,)
    assert k.min().item() == 1 and k.max().item() == 49
    assert set(k.tolist()) == set(range(1, 50))
    k1 = sample_grid_index(8, 50, torch.Generator().manual_seed(3))
    k2 = sample_grid_index(8, 50, torch.Generator().manual_seed(3))
    assert torch.equal(k1, k2)
    with pytest.raises(ValueError, match="num_grid"):
        sample_grid_index(4, 1)


def test_sample_grid_index_top_fraction():
    # p = 0 is the uniform draw, on the same random stream
    assert torch.equal(sample_grid_index(64, 50, torch.Generator().manual_seed(5), top_fraction=0.0),
                       sample_grid_index(64, 50, torch.Generator().manual_seed(5)))
    k = sample_grid_index(20000, 50, torch.Generator().manual_seed(0), top_fraction=0.25)
    assert k.min().item() == 1 and k.max().item() == 49
    expected = 0.25 + 0.75 / 49
    assert abs((k == 49).float().mean().item() - expected) < 0.01
    # the rest stays uniform over 1..48
    rest = k[k != 49]
    counts = torch.bincount(rest, minlength=49)[1:49].float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    assert bool((sample_grid_index(16, 50, torch.Generator().manual_seed(1), top_fraction=1.0) == 49).all())
    with pytest.raises(ValueError, match="top_fraction"):
        sample_grid_index(4, 50, top_fraction=1.5)


# ------------------------------------------------------------------------------ CoDi loss
def _data(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 4, 4, generator=g), torch.randn(batch, 4, 4, 4, generator=g)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_codi_loss_with_oracle_matches_hand_computation(kind):
    """Perfect models in each prediction type: every quantity has a closed form, so v/eps mix-ups show."""
    z0, eps = _data()
    k = torch.tensor([1, 25, 49])
    oracle = _oracle(z0, kind)
    lam = 0.7
    loss, info = codi_loss(oracle, oracle, oracle, z0, eps, k, GRID, AC, kind, regression_weight=lam)
    assert loss.shape == (3,)
    assert info["t"].tolist() == [39, 519, 999] and info["s"].tolist() == [19, 499, 979]
    for i in range(3):
        t, s = int(GRID[k[i]]), int(GRID[k[i] - 1])
        at, st = AC[t].sqrt(), (1 - AC[t]).sqrt()
        as_, ss = AC[s].sqrt(), (1 - AC[s]).sqrt()
        z_t = at * z0[i] + st * eps[i]
        z_s = as_ * z0[i] + ss * eps[i]  # exact ODE step: x0_hat = z0, eps_hat = eps
        cs_t, co_t = _lcm_scalings(t)
        cs_s, co_s = _lcm_scalings(s)
        online = cs_t * z_t + co_t * z0[i]
        target = cs_s * z_s + co_s * z0[i]
        distill = ((online - target) ** 2).mean()
        reg = ((online - z0[i]) ** 2).mean()
        torch.testing.assert_close(info["distill"][i], distill, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(info["regression"][i], reg, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(loss[i], distill + lam * reg, rtol=1e-3, atol=1e-9)


def test_codi_loss_branches_times_and_grad_isolation():
    z0, eps = _data(batch=2)
    k = torch.tensor([3, 10])
    theta = torch.tensor(0.5, requires_grad=True)
    seen = {}

    def online(z, t):
        seen["online"] = (t.clone(), torch.is_grad_enabled())
        return theta * z

    def target(z, t):
        seen["target"] = (t.clone(), torch.is_grad_enabled(), z.clone())
        return theta * z  # shares the parameter: must not receive gradient from this branch

    def ode(z, t):
        seen["ode"] = (t.clone(), torch.is_grad_enabled(), z.clone())
        return theta * z

    loss, _ = codi_loss(online, target, ode, z0, eps, k, GRID, AC, "eps")
    assert seen["online"][0].tolist() == GRID[k].tolist() and seen["online"][1] is True
    assert seen["ode"][0].tolist() == GRID[k].tolist() and seen["ode"][1] is False
    assert seen["target"][0].tolist() == GRID[k - 1].tolist() and seen["target"][1] is False
    # the ODE input is z_t and the target input is the DDIM step from it
    at, st = AC[GRID[k]].sqrt().view(-1, 1, 1, 1), (1 - AC[GRID[k]]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["ode"][2], at * z0 + st * eps)
    loss.sum().backward()
    grad_all = theta.grad.clone()

    # same loss with target/ode on a detached constant: identical gradient => only online gets grads
    theta.grad = None
    const = theta.detach().clone()
    loss2, _ = codi_loss(online, lambda z, t: const * z, lambda z, t: const * z, z0, eps, k, GRID, AC, "eps")
    loss2.sum().backward()
    torch.testing.assert_close(theta.grad, grad_all)
    torch.testing.assert_close(loss2, loss.detach())


def test_codi_loss_ode_from_the_online_output_is_the_detached_online_prediction():
    """ode_fn=None: one online call, made before the target branch, whose output solves the ODE step detached."""
    z0, eps = _data(batch=2)
    k = torch.tensor([4, 20])
    theta = torch.tensor(0.7, requires_grad=True)
    calls = []

    def online(z, t):
        calls.append("online")
        return theta * z + 0.2

    def target(z, t):
        calls.append("target")
        return theta.detach() * z + 0.2

    loss, info = codi_loss(online, target, None, z0, eps, k, GRID, AC, "epsilon")
    assert calls == ["online", "target"]
    loss.sum().backward()
    grad = theta.grad.clone()
    theta.grad = None
    calls.clear()
    reference, ref_info = codi_loss(online, target, lambda z, t: online(z, t).detach(), z0, eps, k, GRID, AC, "epsilon")
    reference.sum().backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=0, atol=0)
    torch.testing.assert_close(info["distill"], ref_info["distill"], rtol=0, atol=0)
    # the ODE step carries no gradient: only the online term of the loss does, in both forms
    torch.testing.assert_close(grad, theta.grad, rtol=0, atol=0)
    # and it is a different ODE than a separate model's
    other, _ = codi_loss(online, target, lambda z, t: 0.5 * z, z0, eps, k, GRID, AC, "epsilon")
    assert not torch.allclose(other.detach(), loss.detach())


def test_codi_loss_depends_on_ode_branch_and_regression_weight():
    z0, eps = _data()
    k = torch.tensor([5, 6, 7])

    def student(z, t):  # not an oracle, so the target depends on where the ODE step lands
        return 0.9 * z

    def teacher(z, t):
        return 0.9 * z + 0.3

    l_student, _ = codi_loss(student, student, student, z0, eps, k, GRID, AC, "epsilon")
    l_teacher, _ = codi_loss(student, student, teacher, z0, eps, k, GRID, AC, "epsilon")
    assert not torch.allclose(l_student, l_teacher)
    l0, info0 = codi_loss(student, student, teacher, z0, eps, k, GRID, AC, "epsilon", regression_weight=0.0)
    torch.testing.assert_close(l0, info0["distill"])
    lh, infoh = codi_loss(student, student, teacher, z0, eps, k, GRID, AC, "epsilon", distance="huber",
                          huber_c=0.01, regression_weight=2.0)
    torch.testing.assert_close(lh, infoh["distill"] + 2.0 * infoh["regression"])
    torch.testing.assert_close(infoh["regression"], info0["regression"])


@pytest.mark.parametrize("bad", [[0, 3], [3, 50]])
def test_codi_loss_rejects_bad_grid_index(bad):
    z0, eps = _data(batch=2)
    fn = _oracle(z0, "epsilon")
    with pytest.raises(ValueError, match=r"\[1, 49\]"):
        codi_loss(fn, fn, fn, z0, eps, torch.tensor(bad), GRID, AC, "epsilon")


def test_codi_loss_rejects_bad_prediction_type():
    z0, eps = _data(batch=2)
    fn = _oracle(z0, "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        codi_loss(fn, fn, fn, z0, eps, torch.tensor([1, 2]), GRID, AC, "x_prediction")


# ------------------------------------------------------------------------ diffusion loss
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_zero_for_oracle_and_nonzero_for_wrong_type(kind):
    z0, eps = _data()
    t = torch.tensor([10, 500, 990])
    loss = diffusion_loss(_oracle(z0, kind), z0, eps, t, AC, kind)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3), atol=1e-6, rtol=0)
    other = {"epsilon": "v_prediction", "v_prediction": "sample", "sample": "epsilon"}[kind]
    assert (diffusion_loss(_oracle(z0, other), z0, eps, t, AC, kind) > 1e-3).all()
