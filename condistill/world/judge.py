"""The judge: a small CNN trained on the synthetic scenes that measures generated images.

It answers three questions about an image of the embedded world:

* attributes: the background colour, the main object's colour and its shape (the main
  object is ``attributes["objects"][0]``, the nearest one, always fully visible);
* features: the penultimate vector (256-d) used for a Frechet distance between image sets
  (the role Inception features play for FID on natural images);
* depth: a disparity map at the image's own resolution (1 = near, 0 = far).

The network works at its training resolution (64 x 64); other sizes are resized to it
(antialiased bilinear) and depth maps are resized back. The networks themselves are in
:mod:`condistill.world.judge_nets` (re-exported here). Weights live in
``condistill/assets/judge/`` (``judge.safetensors`` + ``config.json``) and are made by
``python tools/train_judge.py``; see ``docs/judge.md``.

Typical use::

    judge = load_judge()                     # embedded:judge, on CPU
    judge.predict(images)                    # {"background": [...], "colour": [...], "shape": [...]}
    judge.score(images, prompts)             # prompt adherence accuracies
    judge.features(images)                   # [N, D] for metrics.frechet_distance
    judge.depth(images)                      # [N, H, W] disparity
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from condistill.utils import count_parameters
from condistill.world.judge_nets import (
    ATTRIBUTES,
    N_MOMENTS,
    DepthNet,
    DepthNetConfig,
    JudgeConfig,
    JudgeNet,
    default_labels,
    mask_moments,
)
from condistill.world.scenes import SHAPES, parse_caption

__all__ = [
    "ATTRIBUTES", "CONFIG_NAME", "DEFAULT_PATH", "DEPTH_CONFIG_NAME", "DEPTH_RECIPE", "DEPTH_WEIGHTS_NAME",
    "METRICS_NAME", "N_MOMENTS", "TRAIN_RECIPE", "WEIGHTS_NAME", "DepthNet", "DepthNetConfig", "Judge",
    "JudgeConfig", "JudgeNet", "default_labels", "evaluate_on_records", "images_to_tensor", "load_depth_net",
    "load_judge", "mask_moments", "resolve_judge_path", "save_depth_net", "save_judge",
]

WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "config.json"
DEPTH_WEIGHTS_NAME = "depth_net.safetensors"
DEPTH_CONFIG_NAME = "depth_net.json"
DEPTH_RECIPE = "python tools/train_depth_judge.py"
METRICS_NAME = "metrics.json"
DEFAULT_PATH = "embedded:judge"
TRAIN_RECIPE = "python tools/train_judge.py"


def images_to_tensor(images) -> torch.Tensor:
    """Turn a PIL image, a list of PIL images or a float tensor into ``float32 [N, 3, H, W]`` in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensors must be [N, 3, H, W] (or [3, H, W]), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"image tensors must be floating point in [0, 1], got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError("got an empty batch of images")
        lo, hi = float(x.min()), float(x.max())
        if lo < -0.05 or hi > 1.05:
            raise ValueError(
                f"image tensors must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]; "
                "convert [-1, 1] images with (x + 1) / 2"
            )
        return x.float().clamp(0, 1)
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("got an empty list of images")
        arrays = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}] is a {type(im).__name__}; expected PIL images or a tensor")
            arrays.append(np.asarray(im.convert("RGB")))
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"all images of a batch must have one size, got {sorted(sizes)}")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return x.float() / 255.0
    raise TypeError(f"images must be a PIL image, a list of PIL images or a tensor, got {type(images).__name__}")


class Judge:
    """A loaded judge network with batched, resolution-agnostic inference helpers."""

    def __init__(self, net: JudgeNet, device: str | torch.device = "cpu", batch_size: int = 256,
                 info: dict | None = None, depth_net: DepthNet | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.depth_net = depth_net.to(self.device).eval() if depth_net is not None else None
        self.config = net.config
        self.batch_size = int(batch_size)
        self.info = info or {}

    @property
    def labels(self) -> dict[str, list[str]]:
        return self.config.labels

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @torch.no_grad()
    def _batched(self, images, net: nn.Module, resolution: int) -> tuple[list, tuple[int, int]]:
        """``net`` applied batch by batch at ``resolution`` (resized when needed); the outputs and the input size."""
        x = images_to_tensor(images)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            xb = x[start:start + self.batch_size].to(self.device)
            if size != (resolution, resolution):
                xb = F.interpolate(xb, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                   antialias=True)
            outs.append(net(xb))
        return outs, size

    def _run(self, images, keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        outs, size = self._batched(images, self.net, self.config.resolution)
        return {k: torch.cat([o[k].float().cpu() for o in outs]) for k in keys}, size

    def _run_depth_net(self, images) -> tuple[torch.Tensor, tuple[int, int]]:
        outs, size = self._batched(images, self.depth_net, self.depth_net.config.resolution)
        return torch.cat([o.float().cpu() for o in outs]), size

    def logits(self, images) -> dict[str, torch.Tensor]:
        """Raw logits per attribute, ``{attr: [N, K]}``."""
        keys = tuple(f"logits_{a}" for a in self.labels)
        out, _ = self._run(images, keys)
        return {a: out[f"logits_{a}"] for a in self.labels}

    def predict(self, images) -> dict[str, list[str]]:
        """Predicted class names per attribute: ``{"background": [...], "colour": [...], "shape": [...]}``."""
        return {a: [self.labels[a][i] for i in lg.argmax(dim=1).tolist()] for a, lg in self.logits(images).items()}

    def features(self, images) -> torch.Tensor:
        """Pooled penultimate features ``float32 [N, D]`` (inputs to a Frechet distance)."""
        return self._run(images, ("features",))[0]["features"]

    @property
    def depth_source(self) -> str:
        """``"depth_net"`` when the dedicated depth estimator is loaded, else ``"judge_head"``."""
        return "depth_net" if self.depth_net is not None else "judge_head"

    def depth(self, images) -> torch.Tensor:
        """Predicted disparity ``float32 [N, H, W]`` in [0, 1] at the input resolution (1 = near).

        Uses the dedicated :class:`DepthNet` when the judge folder holds one
        (``depth_net.safetensors``), else the judge network's own depth head.
        """
        if self.depth_net is None:
            out, (H, W) = self._run(images, ("depth",))
            d = out["depth"]
        else:
            d, (H, W) = self._run_depth_net(images)
        if d.shape[-2:] != (H, W):
            d = F.interpolate(d.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False).squeeze(1)
        return d

    def segment(self, images, classes: Sequence[str] = ("none", *SHAPES)) -> torch.Tensor:
        """Which class covers each pixel: ``int64 [N, H, W]`` at the input resolution, indices into ``classes``
        ("none" = no object, then shape names), from the dense head's per-pixel shape logits (made at half the
        judge's resolution and resized bilinearly before the argmax)."""
        names = ["none", *self.labels["shape"]]
        missing = sorted(set(classes) - set(names))
        if missing or len(set(classes)) != len(names) or len(classes) != len(names):
            raise ValueError(f"classes must name each of {names} once, got {list(classes)}")
        out, (H, W) = self._run(images, ("dense",))
        logits = out["dense"][:, :len(names)]
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        order = torch.tensor([names.index(c) for c in classes])
        return logits[:, order].argmax(dim=1)

    def score(self, images, prompts: Sequence[str]) -> dict:
        """Prompt adherence: how often the judged attributes match what each prompt names.

        Each prompt is parsed with :func:`condistill.world.scenes.parse_caption`; an attribute the
        prompt does not name is skipped for that image. Returns accuracies in [0, 1] (or
        ``None`` when no prompt names the attribute) for ``background``, ``colour``
        (main object colour), ``shape`` (main object shape) and ``both`` (background *and*
        object colour right, over prompts naming both), plus ``n_<key>``: how many images
        each accuracy is over, and ``n_images``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        preds = self.predict(images)
        n = len(preds["background"])
        if len(prompts) != n:
            raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt per image")
        hits: dict[str, list[bool]] = {"background": [], "colour": [], "both": [], "shape": []}
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}; expected a string")
            want = parse_caption(prompt)
            ok = {}
            for attr in ("background", "colour", "shape"):
                if want[attr] is not None:
                    ok[attr] = preds[attr][i] == want[attr]
                    hits[attr].append(ok[attr])
            if "background" in ok and "colour" in ok:
                hits["both"].append(ok["background"] and ok["colour"])
        result: dict = {}
        for key, values in hits.items():
            result[key] = float(np.mean(values)) if values else None
            result[f"n_{key}"] = len(values)
        result["n_images"] = n
        return result


def evaluate_on_records(judge: Judge, records: Sequence, images=None) -> dict:
    """Accuracy per attribute (and ``both`` = background and colour, ``all`` = all three) and
    depth error of ``judge`` on synthetic scene records, against their exact labels and depth.

    ``images`` optionally replaces the records' own images (e.g. degraded copies).
    ``depth_error`` is the scale-and-shift aligned MAE of :func:`condistill.evaluation.metrics.depth_error`;
    ``depth_mae`` is the plain MAE of the raw prediction.
    """
    from condistill.evaluation.metrics import depth_error
    from condistill.world.scenes import attribute_labels

    records = list(records)
    if not records:
        raise ValueError("evaluate_on_records needs at least one record")
    if images is None:
        images = [r.image for r in records]
    logits = judge.logits(images)
    truth = {a: torch.tensor([attribute_labels(r)[a] for r in records]) for a in ATTRIBUTES}
    correct = {a: logits[a].argmax(1) == truth[a] for a in ATTRIBUTES}
    out = {a: float(correct[a].float().mean()) for a in ATTRIBUTES}
    out["both"] = float((correct["background"] & correct["colour"]).float().mean())
    out["all"] = float((correct["background"] & correct["colour"] & correct["shape"]).float().mean())
    if all(r.depth is not None for r in records):
        pred = judge.depth(images)
        gt = torch.from_numpy(np.stack([np.asarray(r.depth, dtype=np.float32) for r in records]))
        out["depth_error"] = depth_error(pred, gt)
        out["depth_mae"] = float((pred - gt).abs().mean())
    out["n"] = len(records)
    return out


def resolve_judge_path(path: str | Path = DEFAULT_PATH) -> Path:
    """The judge folder ``path`` names: a local folder, or a packaged one (``embedded:judge``, the
    default; see :mod:`condistill.hub`)."""
    from condistill.hub import embedded_path

    p = Path(path)
    if p.is_dir():
        return p
    return embedded_path(path) or p


def _save_net(net: nn.Module, path: str | Path, weights_name: str, config_name: str, extra: dict | None) -> Path:
    """Write ``net``'s weights (safetensors) and a JSON config (architecture, parameter count, ``extra``)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / weights_name))
    cfg = {"architecture": net.config.to_dict(), "parameters": count_parameters(net)}
    cfg.update(extra or {})
    (out / config_name).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def save_judge(net: JudgeNet, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``judge.safetensors`` and ``config.json`` (architecture + ``extra`` info) to ``path``."""
    return _save_net(net, path, WEIGHTS_NAME, CONFIG_NAME, extra)


def load_judge(path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu", batch_size: int = 256) -> Judge:
    """Load the judge from a folder holding ``judge.safetensors`` and ``config.json``.

    ``path`` is a local folder or ``embedded:judge`` (the packaged judge, the default), so the
    default works from any working directory, with or without a checkout.
    """
    from safetensors.torch import load_file

    folder = resolve_judge_path(path)
    weights, config_file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    for f in (weights, config_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"judge file {f} is missing (looked for {path!r} from {Path.cwd()}); "
                f"train the judge with `{TRAIN_RECIPE} --output-dir {path}` or pass the folder that holds "
                f"{WEIGHTS_NAME} and {CONFIG_NAME}"
            )
    info = json.loads(config_file.read_text())
    if "architecture" not in info:
        raise ValueError(f"{config_file} has no 'architecture' entry; is it a judge config written by {TRAIN_RECIPE}?")
    net = JudgeNet(JudgeConfig.from_dict(info["architecture"]))
    state = load_file(str(weights))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the architecture in {config_file}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return Judge(net, device=device, batch_size=batch_size, info=info, depth_net=load_depth_net(folder))


def save_depth_net(net: DepthNet, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``depth_net.safetensors`` and ``depth_net.json`` (architecture + ``extra``) into a judge folder."""
    return _save_net(net, path, DEPTH_WEIGHTS_NAME, DEPTH_CONFIG_NAME, extra)


def load_depth_net(folder: str | Path) -> DepthNet | None:
    """The dedicated depth estimator of a judge folder, or ``None`` when it has none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config_file = folder / DEPTH_WEIGHTS_NAME, folder / DEPTH_CONFIG_NAME
    if not weights.is_file() and not config_file.is_file():
        return None
    for f in (weights, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing but its companion is present; re-run `{DEPTH_RECIPE} "
                                    f"--output-dir {folder}` or delete both {DEPTH_WEIGHTS_NAME} and {DEPTH_CONFIG_NAME}")
    info = json.loads(config_file.read_text())
    if "architecture" not in info:
        raise ValueError(f"{config_file} has no 'architecture' entry; is it written by {DEPTH_RECIPE}?")
    arch = info["architecture"]
    net = DepthNet(DepthNetConfig(resolution=arch["resolution"], widths=tuple(arch["widths"])))
    try:
        missing, unexpected = net.load_state_dict(load_file(str(weights)), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{weights} does not match the architecture in {config_file}: "
                         f"{str(err).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the architecture in {config_file}: "
                         f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return net.float()
