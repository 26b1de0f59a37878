"""CLIPScore: text-image agreement of generated images with their prompts, from a local CLIP model.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning", https://arxiv.org/abs/2104.08718) of an image and its prompt is
``100 * max(cos(E_image, E_text), 0)`` with CLIP's projected image and text embeddings (the
scale 100 instead of the paper's 2.5, as torchmetrics and most text-to-image papers report it).

It is computed only when ``transformers`` can load a CLIP model WITHOUT any download: the model
:data:`CLIP_MODEL` (``openai/clip-vit-base-patch32``) or the one named by the environment
variable :data:`CLIP_MODEL_ENV` (``CONDISTILL_CLIP_MODEL``: a local folder written by
``save_pretrained``, or a hub id), looked up in the local Hugging Face hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``). Everything is
loaded with ``local_files_only=True`` from the resolved local folder. Images are resized
(shortest side, bicubic with antialiasing), centre-cropped and normalised in torch with the
model's own ``CLIPImageProcessor`` settings; prompts are truncated to the tokenizer's maximum
length (77 tokens for OpenAI's CLIP).

This module is registered by :mod:`condistill.evaluation.third_party` as its metric
``"clip_score"`` (``set_backend("clip_score", factory)`` of :mod:`condistill.evaluation.backends`, which
both modules import, injects a stand-in network).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from condistill.evaluation import backends



CLIP_MODEL = "openai/clip-vit-base-patch32"  # the default model id, looked up in the local HF cache only
CLIP_MODEL_ENV = "CONDISTILL_CLIP_MODEL"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HOW_TO = (f"to enable it, run `hf download {CLIP_MODEL}` (or `huggingface-cli download {CLIP_MODEL}`) on a "
           "machine with internet and copy its Hugging Face cache folder (~/.cache/huggingface/hub) here "
           f"(or point HF_HUB_CACHE / HF_HOME at it), or set {CLIP_MODEL_ENV} to a local folder holding a "
           "CLIP model saved with save_pretrained (config.json, model.safetensors, tokenizer and "
           "preprocessor_config.json)")


def clip_model_id() -> str:
    """The CLIP model to use: ``$CONDISTILL_CLIP_MODEL`` when set, else :data:`CLIP_MODEL`."""
    return os.environ.get(CLIP_MODEL_ENV, "").strip() or CLIP_MODEL


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time (:func:`condistill.hub.hub_cache_dir`)."""
    from condistill.hub import hub_cache_dir

    return Path(hub_cache_dir())


def _missing_files(folder: Path) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    if not ((folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))):
        missing.append("tokenizer.json or vocab.json + merges.txt")
    if not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    return missing


def resolve_clip_model() -> tuple[Path | None, str]:
    """``(local folder, reason)``: the folder of :func:`clip_model_id` (a local folder, or its snapshot
    in the local hub cache; never downloaded), or ``None`` and what is missing."""
    model = clip_model_id()
    folder = Path(model).expanduser()
    if not folder.is_dir():
        if os.environ.get(CLIP_MODEL_ENV, "").strip() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            return None, f"{CLIP_MODEL_ENV}={model!r} is not an existing folder"
        cache = hf_cache_dir()
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, cache_dir=str(cache), local_files_only=True))
        except Exception as error:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or a bad id
            return None, f"model {model!r} is not in the local Hugging Face cache {cache} ({type(error).__name__})"
    missing = _missing_files(folder)
    if missing:
        return None, f"the CLIP model folder {folder} lacks " + ", ".join(missing)
    return folder, f"{model} from {folder}"


def clip_status() -> tuple[bool, str]:
    """``(available, reason)`` for CLIPScore; ``reason`` says what is missing and how to enable it."""
    if "clip_score" in backends.BACKENDS:
        return True, "CLIPScore: injected backend"
    if backends.try_import("transformers") is None:
        return False, "CLIPScore skipped: Python package 'transformers' is not installed (pip install transformers)"
    folder, reason = resolve_clip_model()
    if folder is None:
        return False, f"CLIPScore skipped: {reason}; {_HOW_TO}"
    return True, f"CLIPScore (100 * max(cos, 0)) with {reason}"


def _preprocess_settings(processor) -> tuple[int, tuple[int, int], torch.Tensor, torch.Tensor]:
    size = getattr(processor, "size", None) or {"shortest_edge": 224}
    short = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
    crop = getattr(processor, "crop_size", None) or {"height": short, "width": short}
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return int(short), (int(crop["height"]), int(crop["width"])), mean, std


def load_clip(device: str | torch.device = "cpu") -> Callable:
    """``fn(images, prompts) -> [B]``: CLIPScore ``100 * max(cos, 0)`` (Hessel et al. 2021) of each image
    ``images[i]`` (``[B, 3, H, W]`` in [0, 1]) with its prompt ``prompts[i]``; raises ``RuntimeError``
    with the reason if no CLIP model is available locally. Honours ``set_backend("clip_score", factory)``."""
    if "clip_score" in backends.BACKENDS:
        return backends.BACKENDS["clip_score"](device)
    ok, reason = clip_status()
    if not ok:
        raise RuntimeError(reason)
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    folder, _ = resolve_clip_model()
    with backends.no_downloads():
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    short, crop, mean, std = _preprocess_settings(processor)
    max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                     int(model.config.text_config.max_position_embeddings))
    dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = images.to(device=device, dtype=torch.float32).clamp(0, 1)
        scale = short / min(x.shape[-2:])
        size = (max(crop[0], round(x.shape[-2] * scale)), max(crop[1], round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
        x = (x[..., top:top + crop[0], left:left + crop[1]] - mean.to(x.device)) / std.to(x.device)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
                    pixel_values=x.to(dtype))
        image, text = F.normalize(out.image_embeds.float(), dim=-1), F.normalize(out.text_embeds.float(), dim=-1)
        return 100 * (image * text).sum(-1).clamp(min=0)

    return score


@torch.no_grad()
def clip_scores(images: torch.Tensor, prompts: Sequence[str], net: Callable | None = None, *,
                device: str | torch.device = "cpu", batch_size: int = 32) -> torch.Tensor:
    """Per-image CLIPScores ``[N]`` (float64, CPU) of ``images [N, 3, H, W]`` in [0, 1] with ``prompts``."""
    x = backends.check_images(images, "images")
    if isinstance(prompts, str) or len(prompts) != x.shape[0]:
        raise ValueError(f"clip_score needs one prompt per image: got {x.shape[0]} images and "
                         f"{'a single string' if isinstance(prompts, str) else f'{len(prompts)} prompts'}")
    if net is None:
        net = load_clip(device)
    prompts = [str(p) for p in prompts]
    return torch.cat([torch.as_tensor(net(x[i:i + batch_size], prompts[i:i + batch_size])).flatten().double().cpu()
                      for i in range(0, x.shape[0], batch_size)])


def clip_score(images: torch.Tensor, prompts: Sequence[str], net: Callable | None = None, *,
               device: str | torch.device = "cpu", reduction: str = "mean", batch_size: int = 32):
    """CLIPScore ``100 * max(cos, 0)`` (Hessel et al. 2021) of ``images [N, 3, H, W]`` in [0, 1] with
    ``prompts`` (one per image): a float for ``reduction="mean"`` / ``"sum"``, the ``[N]`` tensor of
    per-image scores for ``"none"``. ``net`` is a :func:`load_clip` callable (loaded when ``None``)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    scores = clip_scores(images, prompts, net, device=device, batch_size=batch_size)
    if reduction == "none":
        return scores
    return float(scores.mean() if reduction == "mean" else scores.sum())


__all__ = ["CLIP_MODEL", "CLIP_MODEL_ENV", "clip_model_id", "clip_score", "clip_scores", "clip_status",
           "hf_cache_dir", "load_clip", "resolve_clip_model"]
