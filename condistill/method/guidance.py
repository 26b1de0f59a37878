"""Classifier-free guidance as a model wrapper, and the batch doubling it needs.

``guided_output`` turns any ``model_fn(z, t, emb, **kwargs)`` into its guided prediction
``uncond + w * (cond - uncond)`` with one model call on the batch ``[uncond, cond]``;
:func:`repeat_batch` is the one helper that repeats per-sample inputs (condition features,
ControlNet images, SDXL extras) for that doubled batch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["guided_output", "guided_with_copy", "make_model_fn", "repeat_batch"]


def repeat_batch(value: Any, copies: int, batch: int, name: str = "value") -> Any:
    """``[B, ...]`` tensors -> ``[copies * B, ...]`` (``cat([v] * copies)``), the batch of a CFG call.

    Lists, tuples and dicts are repeated element-wise (recursively), 0-d tensors and other values
    are returned unchanged.

    Raises:
        ValueError: a tensor's leading size is not ``batch``.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return value
        if value.shape[0] != batch:
            raise ValueError(
                f"model kwarg {name!r} has leading size {value.shape[0]} but the batch size is {batch}; "
                "pass per-sample tensors [B, ...] (expand them first) or a 0-d tensor."
            )
        return torch.cat([value] * copies, dim=0)
    if isinstance(value, Mapping):
        return {k: repeat_batch(v, copies, batch, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_batch(v, copies, batch, f"{name}[{i}]") for i, v in enumerate(value))
    return value


def _expand_batch(emb, batch: int, name: str):
    if isinstance(emb, Mapping):  # SDXL's text conditioning: a dict of [B, ...] tensors
        return {k: _expand_batch(v, batch, f"{name}.{k}") for k, v in emb.items()}
    if not isinstance(emb, torch.Tensor) or emb.ndim < 1:
        raise ValueError(f"{name} must be a tensor [B, ...] or [1, ...], got {type(emb).__name__}.")
    if emb.shape[0] == batch:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(batch, *emb.shape[1:])
    raise ValueError(f"{name} has batch size {emb.shape[0]}; expected {batch} (the latent batch) or 1.")


def _uncond_then_cond(uncond, cond, name: str = "emb"):
    """``cat([uncond, cond])``, for a tensor or element-wise for a dict of them (same keys and shapes)."""
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError(f"uncond_emb and cond_emb must hold the same entries, got "
                             f"{sorted(uncond) if isinstance(uncond, Mapping) else type(uncond).__name__} and "
                             f"{sorted(cond)}.")
        return {k: _uncond_then_cond(uncond[k], cond[k], f"{name}.{k}") for k in cond}
    if uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"uncond_emb shape {tuple(uncond.shape)} and cond_emb shape {tuple(cond.shape)} must match "
            "after the batch dimension (encode the empty prompt with the same tokenizer length)."
        )
    return torch.cat([uncond, cond], dim=0)


def guided_output(
    model_fn: Callable[..., torch.Tensor],
    z: torch.Tensor,
    t: int | torch.Tensor,
    cond_emb: torch.Tensor,
    uncond_emb: torch.Tensor | None,
    guidance: float | torch.Tensor | None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Classifier-free guidance with one model call: ``out = uncond + w * (cond - uncond)``.

    ``model_fn(z, t, emb, **model_kwargs)`` is called:

    * once on ``(z, t, cond_emb)`` when ``guidance`` is ``None`` or every scale equals 1 (no doubling);
    * otherwise once on the batch concatenated as **[uncond, cond]**: ``z``, a per-sample ``t`` and
      every per-sample tensor in ``model_kwargs`` (also inside lists/tuples/dicts, e.g. ControlNet
      conditioning or SDXL ``added_cond_kwargs``) are duplicated as ``cat([x, x])``, the embeddings as
      ``cat([uncond_emb, cond_emb])`` (entry by entry for a dict); the output is split in that
      same order (first half uncond).

    Args:
        model_fn: callable returning ``[B', C, H, W]`` for a batch of ``B'`` latents.
        z: ``[B, C, H, W]`` latents.
        t: LongTensor ``[B]`` or a scalar timestep (not duplicated).
        cond_emb: ``[B, L, D]`` (or ``[1, L, D]``) conditional text embedding, or a dict of such
            ``[B or 1, ...]`` tensors (SDXL's text conditioning), doubled entry by entry.
        uncond_emb: the unconditional (empty-prompt) embedding of the same form; may be
            ``None`` only when no guidance is applied.
        guidance: ``w`` as a float, a tensor ``[B]`` (one scale per sample) or ``None``.

    Returns:
        ``[B, C, H, W]`` guided output.
    """
    batch = z.shape[0]
    cond_emb = _expand_batch(cond_emb, batch, "cond_emb")
    if guidance is None:
        return model_fn(z, t, cond_emb, **model_kwargs)
    if isinstance(guidance, torch.Tensor):
        w = guidance.to(device=z.device, dtype=torch.float32)
        if w.ndim == 0:
            w = w.reshape(1)
        if w.ndim != 1 or w.shape[0] not in (1, batch):
            raise ValueError(f"guidance must be a float or a tensor [B] with B={batch}, got shape {tuple(guidance.shape)}.")
        single = bool((w == 1).all())
    else:
        w = torch.tensor([float(guidance)], device=z.device, dtype=torch.float32)
        single = float(guidance) == 1.0
    if single:
        return model_fn(z, t, cond_emb, **model_kwargs)
    if uncond_emb is None:
        raise ValueError("uncond_emb is required when guidance != 1; pass the empty-prompt embedding.")
    emb = _uncond_then_cond(_expand_batch(uncond_emb, batch, "uncond_emb"), cond_emb)
    t_in = t
    if isinstance(t, torch.Tensor) and t.ndim >= 1:
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"t must be a scalar or have shape [B] with B={batch}, got {tuple(t.shape)}.")
        if t.shape[0] == batch:
            t_in = torch.cat([t, t], dim=0)
    kwargs = {k: repeat_batch(v, 2, batch, k) for k, v in model_kwargs.items()}
    out = model_fn(torch.cat([z, z], dim=0), t_in, emb, **kwargs)
    if out.shape[0] != 2 * batch:
        raise ValueError(f"model_fn returned batch {out.shape[0]} for an input batch of {2 * batch}.")
    uncond, cond = out[:batch], out[batch:]
    w = w.reshape(-1, *([1] * (out.ndim - 1))).to(out.dtype)
    return uncond + w * (cond - uncond)


def _cat_text(parts: list, name: str = "emb"):
    """``cat(parts)`` along the batch, for tensors or element-wise for dicts of them (SDXL)."""
    if isinstance(parts[0], Mapping):
        return {k: _cat_text([p[k] for p in parts], f"{name}.{k}") for k in parts[0]}
    return torch.cat(parts, dim=0)


def guided_with_copy(
    model_fn: Callable[..., torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    cond_emb,
    uncond_emb,
    guidance: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`guided_output` and the raw conditional output of one more copy of the batch, in one model call.

    The call runs on ``[uncond, cond, cond]`` (``[cond, cond]`` when ``guidance`` is None or 1), so a
    caller whose hooks change the last ``B`` rows (distribution matching's fake-score LoRA,
    :meth:`condistill.training.fake_score.FakeScore.on_last`) gets two models' outputs from the frozen
    weights' single pass. ``t`` is a per-sample LongTensor ``[B]``.

    Returns:
        ``(guided [B, ...], copy [B, ...])``.
    """
    batch = z.shape[0]
    cond_emb = _expand_batch(cond_emb, batch, "cond_emb")
    guided = guidance is not None and float(guidance) != 1.0
    if guided and uncond_emb is None:
        raise ValueError("uncond_emb is required when guidance != 1; pass the empty-prompt embedding.")
    texts = [_expand_batch(uncond_emb, batch, "uncond_emb"), cond_emb, cond_emb] if guided else [cond_emb, cond_emb]
    copies = len(texts)
    out = model_fn(torch.cat([z] * copies), torch.cat([t] * copies), _cat_text(texts))
    if out.shape[0] != copies * batch:
        raise ValueError(f"model_fn returned batch {out.shape[0]} for an input batch of {copies * batch}.")
    parts = out.split(batch)
    if not guided:
        return parts[0], parts[-1]
    w = torch.tensor(float(guidance), device=out.device, dtype=out.dtype)
    return parts[0] + w * (parts[1] - parts[0]), parts[-1]


def make_model_fn(model, features, batch: int, use_adapter: bool = True) -> Callable[..., torch.Tensor]:
    """``fn(z, t, emb)`` calling a student ``model(z, t, emb, features, use_adapter=...)``.

    ``features`` (from ``student.encode_condition``, for a batch of ``batch`` images) are
    repeated to follow a CFG-doubled latent batch, so the function can go to
    :func:`guided_output` as is.
    """

    def fn(z, t, emb):
        feats = features if z.shape[0] == batch else repeat_batch(features, z.shape[0] // batch, batch, "features")
        return model(z, t, emb, feats, use_adapter=use_adapter)

    return fn
