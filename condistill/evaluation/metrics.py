"""Image-quality metrics used by the evaluation (pure functions, no model state).

All functions accept ``torch.Tensor`` or ``numpy`` arrays and compute in float64 where
precision matters. Per-image metrics take a ``reduction``: ``"mean"`` (default) returns a
Python float averaged over the images, ``"none"`` returns a float64 tensor ``[N]``.

* :func:`frechet_distance` - Frechet distance between two feature sets (FID-style).
* :func:`psnr` - peak signal-to-noise ratio, optionally restricted to a mask.
* :func:`ssim` - structural similarity with an 11x11 Gaussian window (sigma 1.5).
* :func:`edge_f1` / :func:`edge_scores` - edge-map F1 with a pixel tolerance.
* :func:`depth_error` - mean absolute error after per-image least-squares scale-and-shift
  alignment (the usual relative-depth protocol).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "none")


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t


def _reduce(values: torch.Tensor, reduction: str):
    if reduction == "mean":
        return float(values.mean())
    return values


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


# --------------------------------------------------------------------------- Frechet


def _sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    vals, vecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, with unbiased
    covariances, all in float64. The trace term is computed as
    ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))``: that matrix is symmetric PSD, so both square
    roots come from symmetric eigendecompositions (negative round-off eigenvalues are
    clipped to 0) instead of a general ``sqrtm`` of the non-symmetric ``S_a S_b``. The
    result is clipped at 0; identical sets give 0 up to float noise. Like FID, the
    estimate is biased upwards for small sets: compare values computed with equal set sizes.
    """
    a = _as_tensor(feats_a, "feats_a").double()
    b = _as_tensor(feats_b, "feats_b").double()
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"features must be 2-D [N, D], got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("features contain NaN or infinite values")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return max(float(value), 0.0)


# --------------------------------------------------------------------------- PSNR / SSIM


def _as_images(x, name: str) -> torch.Tensor:
    t = _as_tensor(x, name).double()
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W], [C, H, W] or [H, W], got shape {tuple(t.shape)}")
    return t


def psnr(a, b, max_val: float = 1.0, mask=None, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB, per image, between ``a`` and ``b`` (``[N, C, H, W]``).

    ``mask`` (optional, ``[N, 1|C, H, W]``, ``[N, H, W]`` or ``[H, W]``; bool or 0/1, 1 =
    counted) restricts the mean squared error to a region, e.g. the inpainted hole. Images
    that are identical (over the region) get ``inf``; the mean over a batch containing one
    is then ``inf`` too (use ``reduction="none"`` to see each image).
    """
    _check_reduction(reduction)
    if max_val <= 0:
        raise ValueError(f"max_val must be positive, got {max_val}")
    x, y = _as_images(a, "a"), _as_images(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    err = (x - y).pow(2)
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = _as_tensor(mask, "mask").double()
        if m.dim() == 2:
            m = m[None, None]
        elif m.dim() == 3:
            m = m[:, None]
        if m.dim() != 4 or m.shape[-2:] != x.shape[-2:] or m.shape[1] not in (1, x.shape[1]) \
                or m.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mask of shape {tuple(_as_tensor(mask, 'mask').shape)} does not match images "
                             f"of shape {tuple(x.shape)}")
        m = (m > 0).double().expand_as(x)
        count = m.flatten(1).sum(1)
        if (count == 0).any():
            empty = torch.nonzero(count == 0).flatten().tolist()
            raise ValueError(f"mask selects no pixel in image(s) {empty}")
        mse = (err * m).flatten(1).sum(1) / count
    values = 10 * torch.log10(max_val ** 2 / mse)  # mse == 0 -> inf
    return _reduce(values, reduction)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a, b, max_val: float = 1.0, window_size: int = 11, sigma: float = 1.5, reduction: str = "mean"):
    """Structural similarity (Wang et al. 2004) between ``a`` and ``b`` (``[N, C, H, W]``).

    Local means, variances and covariance come from a normalised Gaussian window
    (``window_size`` x ``window_size``, std ``sigma``) applied to each channel without
    padding ("valid" positions only); constants ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``
    with ``L = max_val``. The SSIM map is averaged over positions and channels per image.
    Identical images give exactly 1.
    """
    _check_reduction(reduction)
    if max_val <= 0:
        raise ValueError(f"max_val must be positive, got {max_val}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd number, got {window_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x, y = _as_images(a, "a"), _as_images(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    N, C, H, W = x.shape
    if H < window_size or W < window_size:
        raise ValueError(f"images of {H}x{W} are smaller than the {window_size}x{window_size} SSIM window; "
                         "pass a smaller window_size")
    win = _gaussian_window(window_size, sigma).expand(C, 1, window_size, window_size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=C)

    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    values = (num / den).flatten(1).mean(1)
    return _reduce(values, reduction)


# --------------------------------------------------------------------------- edges


def _as_maps(x, name: str) -> torch.Tensor:
    """``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]`` -> ``[N, H, W]``."""
    t = _as_tensor(x, name)
    if t.dim() == 2:
        t = t[None]
    elif t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name} must have one channel when 4-D ([N, 1, H, W]), got shape {tuple(t.shape)}")
        t = t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name} must be [H, W], [N, H, W] or [N, 1, H, W], got shape {tuple(t.shape)}")
    return t


def _as_binary_maps(x, name: str) -> torch.Tensor:
    t = _as_maps(x, name)
    if t.dtype == torch.bool:
        return t
    return t.double() > 0.5


def _dilate(maps: torch.Tensor, tolerance: int) -> torch.Tensor:
    if tolerance == 0:
        return maps
    k = 2 * tolerance + 1
    return F.max_pool2d(maps[:, None].double(), k, stride=1, padding=tolerance)[:, 0] > 0


def edge_scores(pred_edges, target_edges, tolerance: int = 1) -> dict[str, torch.Tensor]:
    """Per-image edge precision, recall and F1 (each a float64 tensor ``[N]``).

    Maps are binary (bool, or numbers thresholded at 0.5), ``[H, W]``, ``[N, H, W]`` or
    ``[N, 1, H, W]``. A predicted edge pixel is correct if a target edge pixel lies within
    ``tolerance`` pixels of it in Chebyshev distance (the ``(2t+1) x (2t+1)`` square around
    it, so diagonal neighbours count); recall is the same with the roles swapped. An image
    with no edge in either map scores 1 on all three; an image with edges in only one of
    the two maps scores 0.
    """
    if not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer number of pixels, got {tolerance!r}")
    p, t = _as_binary_maps(pred_edges, "pred_edges"), _as_binary_maps(target_edges, "target_edges")
    if p.shape != t.shape:
        raise ValueError(f"pred_edges and target_edges must have the same shape, got {tuple(p.shape)} "
                         f"and {tuple(t.shape)}")
    n_pred = p.flatten(1).sum(1).double()
    n_target = t.flatten(1).sum(1).double()
    matched_pred = (p & _dilate(t, int(tolerance))).flatten(1).sum(1).double()
    matched_target = (t & _dilate(p, int(tolerance))).flatten(1).sum(1).double()
    precision = torch.where(n_pred > 0, matched_pred / n_pred.clamp(min=1), (n_target == 0).double())
    recall = torch.where(n_target > 0, matched_target / n_target.clamp(min=1), (n_pred == 0).double())
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(denom))
    return {"precision": precision, "recall": recall, "f1": f1}


def edge_f1(pred_edges, target_edges, tolerance: int = 1, reduction: str = "mean"):
    """Edge F1 with a ``tolerance``-pixel match radius; see :func:`edge_scores`. Identical maps give 1."""
    _check_reduction(reduction)
    return _reduce(edge_scores(pred_edges, target_edges, tolerance)["f1"], reduction)


# --------------------------------------------------------------------------- depth


def _as_depth(x, name: str) -> torch.Tensor:
    return _as_maps(x, name).double()


def align_scale_shift(pred, target, mask=None) -> torch.Tensor:
    """``s * pred + t`` with per-image ``(s, t)`` minimising ``sum((s * pred + t - target)^2)``
    over the (masked) pixels; returns float64 ``[N, H, W]``. A constant prediction gets
    ``s = 0`` and ``t = mean(target)``."""
    p, g = _as_depth(pred, "pred"), _as_depth(target, "target")
    if p.shape != g.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(g.shape)}")
    if mask is None:
        m = torch.ones_like(p)
    else:
        m = _as_depth(mask, "mask")
        if m.shape != p.shape:
            m = m.expand_as(p) if m.shape[0] == 1 and m.shape[1:] == p.shape[1:] else None
            if m is None:
                raise ValueError(f"mask of shape {tuple(_as_tensor(mask, 'mask').shape)} does not match depth "
                                 f"of shape {tuple(p.shape)}")
        m = (m > 0).double()
    count = m.flatten(1).sum(1)
    if (count == 0).any():
        raise ValueError(f"mask selects no pixel in image(s) {torch.nonzero(count == 0).flatten().tolist()}")
    cnt = count[:, None, None]
    mean_p = (p * m).flatten(1).sum(1)[:, None, None] / cnt
    mean_g = (g * m).flatten(1).sum(1)[:, None, None] / cnt
    dp, dg = (p - mean_p) * m, (g - mean_g) * m
    var_p = dp.pow(2).flatten(1).sum(1)
    cov = (dp * dg).flatten(1).sum(1)
    # relative threshold: a prediction that is constant up to round-off gets no scale
    flat = var_p <= 1e-12 * torch.clamp(mean_p.flatten().pow(2) * count, min=1e-12)
    scale = torch.where(flat, torch.zeros_like(var_p), cov / var_p.clamp(min=1e-300))
    shift = mean_g.flatten() - scale * mean_p.flatten()
    return scale[:, None, None] * p + shift[:, None, None]


def depth_error(pred, target, mask=None, reduction: str = "mean"):
    """Mean absolute error between ``pred`` and ``target`` depth after a per-image
    least-squares scale-and-shift alignment of ``pred`` to ``target``.

    This is the usual protocol for relative (affine-invariant) depth, e.g. MiDaS: a
    monocular estimate is only defined up to scale and shift, so for each image
    ``(s, t) = argmin sum((s * pred + t - target)^2)`` is solved in closed form over the
    valid pixels and the error is ``mean(|s * pred + t - target|)``. Hence the error is
    invariant to any (non-zero) scale and any shift of ``pred``; it is in the units of
    ``target`` (disparity in [0, 1] in the embedded world). Maps are ``[H, W]``,
    ``[N, H, W]`` or ``[N, 1, H, W]``; ``mask`` (same shape, 1 = valid) restricts both the
    fit and the error.
    """
    _check_reduction(reduction)
    aligned = align_scale_shift(pred, target, mask)
    g = _as_depth(target, "target")
    if mask is None:
        values = (aligned - g).abs().flatten(1).mean(1)
    else:
        m = (_as_depth(mask, "mask") > 0).double().expand_as(g)
        values = ((aligned - g).abs() * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return _reduce(values, reduction)


def edge_maps(images: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Canny edge maps ``(B, H, W)`` of images ``(B, 3, H, W)`` in [-1, 1], as the edge condition makes them."""
    from condistill.conditions.edge import canny_edges
    from condistill.plots import to_pil

    return torch.stack([torch.from_numpy(canny_edges(to_pil(im), low, high)) for im in images])


__all__ = ["edge_maps", 
    "frechet_distance",
    "psnr",
    "ssim",
    "edge_scores",
    "edge_f1",
    "align_scale_shift",
    "depth_error",
]
