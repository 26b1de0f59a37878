"""Known-answer tests of condistill.evaluation.metrics."""
import math

import numpy as np
import pytest
import torch

from condistill.evaluation.metrics import align_scale_shift, depth_error, edge_f1, edge_scores, frechet_distance, psnr, ssim


def _feats(n=400, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    return torch.randn(n, d, generator=g) @ mix + 0.3


# ----------------------------------------------------------------- Frechet


def test_frechet_identical_sets_is_zero():
    a = _feats()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a.numpy(), a.clone()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_mean_shift_known_value_and_grows():
    a = _feats()
    # a pure mean shift by v leaves the covariances equal, so the distance is |v|^2
    d = a.shape[1]
    values = [frechet_distance(a, a + s) for s in (0.1, 0.5, 1.0, 2.0)]
    for s, v in zip((0.1, 0.5, 1.0, 2.0), values):
        assert v == pytest.approx(d * s * s, rel=1e-6)
    assert all(x < y for x, y in zip(values, values[1:]))


def test_frechet_covariance_scale_known_value():
    # N(0, I) vs N(0, 4 I) in d dims: tr(I) + tr(4I) - 2 tr(2I) = d (for exact covariances)
    a = _feats(n=3000, d=8, seed=1)
    a = (a - a.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(a.T))).T  # whiten exactly
    assert frechet_distance(a, 2 * a) == pytest.approx(8.0, rel=1e-6)


def test_frechet_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.4 + 0.7
    ca, cb = np.cov(a.T), np.cov(b.T)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy_linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)


def test_frechet_rank_deficient_sets_stay_finite_and_small_for_same_distribution():
    a, b = _feats(n=40, d=64, seed=2), _feats(n=40, d=64, seed=2)
    assert frechet_distance(a, b) == pytest.approx(0.0, abs=1e-6)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 3), float("nan")), torch.zeros(5, 3))
    with pytest.raises(TypeError):
        frechet_distance([[1.0, 2.0]], torch.zeros(5, 2))


# ----------------------------------------------------------------- PSNR / SSIM


def _images(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)


def test_psnr_identical_is_inf_and_known_value():
    x = _images()
    assert psnr(x, x) == math.inf
    assert torch.isinf(psnr(x, x, reduction="none")).all()
    # constant error 0.1 everywhere -> mse 0.01 -> 20 dB
    y = torch.zeros(2, 3, 16, 16)
    assert psnr(y, y + 0.1) == pytest.approx(20.0, abs=1e-5)  # 0.1 is not exact in float32
    assert psnr(y.double() * 255, y.double() * 255 + 25.5, max_val=255) == pytest.approx(20.0, abs=1e-9)


def test_psnr_and_ssim_drop_with_noise():
    x = _images()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    p_small, p_big = psnr(x, (x + 0.02 * noise).clamp(0, 1)), psnr(x, (x + 0.1 * noise).clamp(0, 1))
    s_small, s_big = ssim(x, (x + 0.02 * noise).clamp(0, 1)), ssim(x, (x + 0.1 * noise).clamp(0, 1))
    assert math.isfinite(p_small) and p_small > p_big > 10
    assert 1.0 > s_small > s_big > 0


def test_psnr_mask_restricts_region():
    x = torch.zeros(1, 3, 16, 16)
    y = x.clone()
    y[..., :8] = 0.5  # left half differs
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, :, 8:] = True
    assert psnr(x, y, mask=mask) == math.inf  # right half identical
    mask_left = ~mask
    assert psnr(x, y, mask=mask_left) == pytest.approx(10 * math.log10(1 / 0.25))
    assert psnr(x, y, mask=mask_left[0]) == pytest.approx(10 * math.log10(1 / 0.25))  # [H, W] mask
    with pytest.raises(ValueError, match="no pixel"):
        psnr(x, y, mask=torch.zeros(16, 16))
    with pytest.raises(ValueError, match="does not match"):
        psnr(x, y, mask=torch.ones(8, 8))


def test_ssim_identical_is_one_and_symmetric():
    x = _images()
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    y = (x * 0.8 + 0.1).clamp(0, 1)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)
    assert ssim(x, y, reduction="none").shape == (3,)


def test_ssim_structure_loss_scores_low():
    x = _images()
    shuffled = x.flatten(2)[..., torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))].reshape(x.shape)
    assert ssim(x, shuffled) < 0.3


def test_psnr_ssim_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="reduction"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), reduction="sum")
    with pytest.raises(ValueError, match="odd"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), window_size=4)


# ----------------------------------------------------------------- edges


def _square_outline(size=32, lo=8, hi=23):
    e = torch.zeros(size, size, dtype=torch.bool)
    e[lo, lo:hi + 1] = e[hi, lo:hi + 1] = True
    e[lo:hi + 1, lo] = e[lo:hi + 1, hi] = True
    return e


def test_edge_f1_identical_is_one():
    e = _square_outline()
    assert edge_f1(e, e) == 1.0
    assert edge_f1(e, e, tolerance=0) == 1.0
    assert edge_f1(e.float().numpy(), e.float().numpy()) == 1.0


def test_edge_f1_far_apart_is_zero():
    a = torch.zeros(32, 32, dtype=torch.bool)
    b = torch.zeros(32, 32, dtype=torch.bool)
    a[:, 3] = True
    b[:, 20] = True
    assert edge_f1(a, b, tolerance=2) == 0.0


def test_edge_f1_shift_within_tolerance():
    e = _square_outline()
    shifted = torch.roll(e, shifts=(1, 1), dims=(0, 1))  # one pixel diagonally
    assert edge_f1(shifted, e, tolerance=1) == 1.0
    assert edge_f1(torch.roll(e, 1, 1), e, tolerance=1) == 1.0
    assert edge_f1(shifted, e, tolerance=0) < 0.5
    assert edge_f1(torch.roll(e, 3, 1), e, tolerance=1) < edge_f1(torch.roll(e, 3, 1), e, tolerance=3) == 1.0


def test_edge_precision_recall_asymmetry():
    target = _square_outline()
    pred = target.clone()
    pred[2, :] = True  # a spurious line far from every target edge
    s = edge_scores(pred, target)
    assert s["recall"].item() == 1.0
    n_pred, n_extra = pred.sum().item(), 32
    assert s["precision"].item() == pytest.approx((n_pred - n_extra) / n_pred)
    f1 = 2 * s["precision"] * s["recall"] / (s["precision"] + s["recall"])
    assert s["f1"].item() == pytest.approx(f1.item())


def test_edge_f1_empty_maps_and_batch():
    empty = torch.zeros(2, 16, 16)
    full = torch.zeros(2, 16, 16)
    full[:, 5, :] = 1
    assert edge_f1(empty, empty) == 1.0
    assert edge_f1(empty, full) == 0.0
    assert edge_f1(full, empty) == 0.0
    assert edge_f1(full[:, None], full[:, None], reduction="none").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(full, full, tolerance=-1)
    with pytest.raises(ValueError, match="same shape"):
        edge_f1(full, full[0])


# ----------------------------------------------------------------- depth


def _depth(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 24, 24, generator=g, dtype=torch.float64)


def test_depth_error_scale_shift_invariant():
    gt = _depth()
    assert depth_error(gt, gt) == pytest.approx(0.0, abs=1e-12)
    assert depth_error(3.5 * gt - 1.2, gt) == pytest.approx(0.0, abs=1e-12)
    assert depth_error(-0.5 * gt + 7, gt) == pytest.approx(0.0, abs=1e-12)
    noisy = gt + 0.1 * _depth(1)
    base = depth_error(noisy, gt)
    assert base > 0.01
    assert depth_error(10 * noisy + 3, gt) == pytest.approx(base, rel=1e-9)
    assert depth_error(noisy[:, None], gt[:, None], reduction="none").shape == (3,)


def test_depth_error_known_value_and_constant_prediction():
    gt = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    # a constant prediction cannot be aligned: best fit is the mean 0.5, error 0.5
    assert depth_error(torch.full((2, 2), 0.3), gt) == pytest.approx(0.5)
    aligned = align_scale_shift(torch.tensor([[5.0, 7.0], [5.0, 7.0]]), gt)
    assert torch.allclose(aligned, gt[None])


def test_depth_error_mask():
    gt = _depth()
    pred = 2 * gt + 1
    pred[:, :4] = 99.0  # garbage outside the valid region
    mask = torch.ones_like(gt, dtype=torch.bool)
    mask[:, :4] = False
    assert depth_error(pred, gt, mask=mask) == pytest.approx(0.0, abs=1e-12)
    assert depth_error(pred, gt) > 0.05
    with pytest.raises(ValueError, match="no pixel"):
        depth_error(pred, gt, mask=torch.zeros_like(gt))
    with pytest.raises(ValueError, match="same shape"):
        depth_error(pred[:, :10], gt)
