"""The judge: a small CNN trained on the synthetic scenes that measures generated images.

It answers three questions about an image of the embedded world:

* attributes: the background colour, the main object's colour and its shape (the main
  object is ``attributes["objects"][0]``, the nearest one, always fully visible);
* features: the penultimate vector (256-d) used for a Frechet distance between image sets
  (the role Inception features play for FID on natural images);
* depth: a disparity map at the image's own resolution (1 = near, 0 = far).

The network works at its training resolution (64 x 64); other sizes are resized to it
(antialiased bilinear) and depth maps are resized back. Weights live in
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from condistill.utils import count_parameters
from condistill.world.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, parse_caption

WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "config.json"
DEPTH_WEIGHTS_NAME = "depth_net.safetensors"
DEPTH_CONFIG_NAME = "depth_net.json"
DEPTH_RECIPE = "python tools/train_depth_judge.py"
METRICS_NAME = "metrics.json"
DEFAULT_PATH = "embedded:judge"
TRAIN_RECIPE = "python tools/train_judge.py"
ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape")


def default_labels() -> dict[str, list[str]]:
    """Class names of every attribute head, in the index order of ``scenes.attribute_labels``."""
    return {
        "background": list(BACKGROUND_COLOURS),
        "colour": list(OBJECT_COLOURS),
        "shape": list(SHAPES),
    }


@dataclass
class JudgeConfig:
    """Architecture of the judge network (stored as ``config.json`` next to the weights).

    Attributes:
        resolution: side of the square images the network sees; other sizes are resized.
        widths: channels of the encoder convs at full, 1/2, 1/4 and 1/8 resolution.
        decoder_widths: channels of the depth decoder at 1/8, 1/4, 1/2 and full resolution.
        reduce_channels: channels of the 1x1 reduction of the 1/16 map before flattening.
        feature_dim: size of the feature vector (the penultimate layer the heads read).
        labels: class names per attribute head.
    """

    resolution: int = 64
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    decoder_widths: tuple[int, int, int, int] = (64, 32, 16, 8)
    reduce_channels: int = 64
    feature_dim: int = 256
    labels: dict[str, list[str]] = field(default_factory=default_labels)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.decoder_widths = tuple(int(w) for w in self.decoder_widths)
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 and at least 16, got {self.resolution}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be four positive channel counts, got {self.widths}")
        if len(self.decoder_widths) != 4 or min(self.decoder_widths) < 1:
            raise ValueError(f"decoder_widths must be four positive channel counts, got {self.decoder_widths}")
        if self.reduce_channels < 1 or self.feature_dim < 1:
            raise ValueError(f"reduce_channels and feature_dim must be positive, got {self.reduce_channels}, "
                             f"{self.feature_dim}")
        missing = [a for a in ATTRIBUTES if a not in self.labels]
        if missing:
            raise ValueError(f"labels lacks attribute(s) {missing}; expected keys {list(ATTRIBUTES)}")
        for name, classes in self.labels.items():
            if len(classes) < 2:
                raise ValueError(f"attribute {name!r} needs at least two classes, got {classes}")


    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["decoder_widths"] = list(self.decoder_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _conv1x1_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


N_MOMENTS = 16


def mask_moments(mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable shape descriptor of soft masks ``[N, H, W]`` in [0, 1] -> ``[N, 16]``.

    Coordinates are normalised to [-1, 1]. Returns the area fraction, centroid (2), radius of
    gyration ``s`` and, for the centred coordinates divided by ``s`` (so translation and
    scale invariant), the 2nd (3), 3rd (4) and 4th (5) order moments: these separate the
    scene shapes (e.g. ``E[u^2 v^2]`` is 1/4 for a square, 1/6 for a disc, 1/10 for a
    diamond; a triangle has non-zero 3rd moments).
    """
    N, H, W = mask.shape
    ys = (torch.arange(H, dtype=mask.dtype, device=mask.device) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, dtype=mask.dtype, device=mask.device) + 0.5) / W * 2 - 1
    yy, xx = ys[:, None].expand(H, W), xs[None, :].expand(H, W)
    mass = mask.sum(dim=(1, 2))
    w = mask / (mass[:, None, None] + eps)

    def expect(t: torch.Tensor) -> torch.Tensor:
        return (w * t).sum(dim=(1, 2))

    mx, my = expect(xx), expect(yy)
    cx, cy = xx - mx[:, None, None], yy - my[:, None, None]
    s = torch.sqrt(expect(cx * cx + cy * cy) + eps)
    u, v = cx / s[:, None, None], cy / s[:, None, None]
    terms = [mass / (H * W), mx, my, s,
             expect(u * u), expect(v * v), expect(u * v),
             expect(u ** 3), expect(v ** 3), expect(u * u * v), expect(u * v * v),
             expect(u ** 4), expect(v ** 4), expect(u * u * v * v), expect(u ** 3 * v), expect(u * v ** 3)]
    return torch.stack(terms, dim=1)


class JudgeNet(nn.Module):
    """Conv/max-pool encoder + a feature vector and linear attribute heads + a top-down depth decoder.

    Input: ``float32 [N, 3, R, R]`` in ``[0, 1]`` at the configured resolution ``R``.
    Output: dict with ``features [N, D]``, ``logits_<attr> [N, K]`` per attribute and
    ``depth [N, R, R]`` in ``[0, 1]`` (disparity, 1 = near), and ``dense [N, S + 2, R/2, R/2]``:
    per-pixel logits of "no object" + the ``S`` shapes, then a main-object mask logit
    (supervised during training). The feature vector joins a flattened coarse map of the
    whole scene with a descriptor of the main object: features pooled over the predicted
    mask and the mask's normalised moments (:func:`mask_moments`).
    """

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        w, d = config.widths, config.decoder_widths
        # encoder: a 3x3 conv at each scale, 2x2 max-pool between scales (full, 1/2, 1/4, 1/8)
        self.enc = nn.ModuleList([_conv_bn(3, w[0]), _conv_bn(w[0], w[1]), _conv_bn(w[1], w[2]), _conv_bn(w[2], w[3])])
        # scene layout (which object is lowest = nearest matters): the 1/16 map, reduced by a
        # 1x1 conv and flattened
        cells = (config.resolution // 16) ** 2
        self.reduce = _conv1x1_bn(w[3], config.reduce_channels)
        n_shapes = len(config.labels["shape"])
        object_dim = d[2] + (n_shapes + 1) + 3 + w[1] + N_MOMENTS
        self.embed = nn.Sequential(nn.Linear(config.reduce_channels * cells + object_dim, config.feature_dim),
                                   nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(classes))
                                    for name, classes in config.labels.items()})
        # decoder: top-down from 1/8 with 1x1 lateral connections and a 3x3 fuse per scale
        self.top = _conv1x1_bn(w[3], d[0])
        self.lat = nn.ModuleList([_conv1x1_bn(w[2], d[1]), _conv1x1_bn(w[1], d[2]), _conv1x1_bn(w[0], d[3])])
        self.fuse = nn.ModuleList([_conv_bn(d[0] + d[1], d[1]), _conv_bn(d[1] + d[2], d[2]),
                                   _conv_bn(d[2] + d[3] + 3, d[3])])
        self.depth_out = nn.Conv2d(d[3], 1, 3, padding=1)
        # dense outputs at 1/2 resolution: per-pixel object shape (0 = no object, 1.. = shape
        # class) and a main-object mask logit; the mask steers the pooling of the object descriptor
        self.dense_out = nn.Conv2d(d[2], n_shapes + 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = (x - 0.5) / 0.25
        e = []
        for i, conv in enumerate(self.enc):
            h = conv(h if i == 0 else F.max_pool2d(h, 2))
            e.append(h)
        e0, e1, e2, e3 = e  # full, 1/2, 1/4, 1/8
        layout = self.reduce(F.max_pool2d(e3, 2)).flatten(1)
        y = self.top(e3)
        y = self.fuse[0](torch.cat([_up_to(y, e2), self.lat[0](e2)], dim=1))  # 1/4
        y = self.fuse[1](torch.cat([_up_to(y, e1), self.lat[1](e1)], dim=1))  # 1/2
        dense = self.dense_out(y)
        # "find the main object, then describe it": pool half-resolution decoder features,
        # per-pixel shape probabilities, colour and encoder features over the predicted
        # main-object mask, and take the mask's normalised moments
        attn = torch.sigmoid(dense[:, -1:])
        attn = attn / (attn.sum(dim=(2, 3), keepdim=True) + 1e-6)
        local = torch.cat([y, dense[:, :-1].softmax(dim=1), F.avg_pool2d(x, 2), e1], dim=1)
        obj = (local * attn).sum(dim=(2, 3))
        mask = torch.sigmoid(F.interpolate(dense[:, -1:], size=x.shape[-2:], mode="bilinear", align_corners=False))
        moments = mask_moments(mask[:, 0])
        features = self.embed(torch.cat([layout, obj, moments], dim=1))
        out = {"features": features, "dense": dense}
        for name, head in self.heads.items():
            out[f"logits_{name}"] = head(features)
        y = self.fuse[2](torch.cat([_up_to(y, e0), self.lat[2](e0), x], dim=1))  # full resolution
        out["depth"] = torch.sigmoid(self.depth_out(y)).squeeze(1)
        return out


@dataclass
class DepthNetConfig:
    """Architecture of the judge's dedicated depth estimator (``depth_net.json`` next to the weights).

    Attributes:
        resolution: side of the square images the network sees (the judge's resolution).
        widths: channels at full, 1/2, 1/4 and 1/8 resolution (two 3x3 convs per scale going
            down, one per scale coming back up through skip connections).
    """

    resolution: int = 64
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 and at least 16, got {self.resolution}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be four positive channel counts, got {self.widths}")

    def to_dict(self) -> dict:
        return {"resolution": self.resolution, "widths": list(self.widths)}


class DepthNet(nn.Module):
    """A small U-Net for disparity only: ``[N, 3, R, R]`` in [0, 1] -> ``[N, R, R]`` in [0, 1] (1 = near).

    The judge's own depth head shares its encoder with the attribute heads and ends in 8
    channels at full resolution; its error on real scenes (0.037) is a floor under every
    depth-fidelity figure measured with it. This network spends its whole capacity on depth,
    keeps full-resolution skips (object boundaries are depth discontinuities) and leaves
    the judge's features, and so every Frechet distance, unchanged.
    """

    def __init__(self, config: DepthNetConfig | None = None):
        super().__init__()
        self.config = config or DepthNetConfig()
        w = self.config.widths
        ins = (3, w[0], w[1], w[2])
        self.down = nn.ModuleList([nn.Sequential(_conv_bn(i, o), _conv_bn(o, o)) for i, o in zip(ins, w)])
        self.up = nn.ModuleList([_conv_bn(w[3] + w[2], w[2]), _conv_bn(w[2] + w[1], w[1]),
                                 _conv_bn(w[1] + w[0] + 3, w[0])])
        self.out = nn.Conv2d(w[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = (x - 0.5) / 0.25, []
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        y = skips[3]
        for block, skip in zip(self.up, (skips[2], skips[1], torch.cat([skips[0], x], dim=1))):
            y = block(torch.cat([_up_to(y, skip), skip], dim=1))
        return torch.sigmoid(self.out(y)).squeeze(1)


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


def save_judge(net: JudgeNet, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``judge.safetensors`` and ``config.json`` (architecture + ``extra`` info) to ``path``."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    cfg = {"architecture": net.config.to_dict(), "parameters": count_parameters(net)}
    if extra:
        cfg.update(extra)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


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
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / DEPTH_WEIGHTS_NAME))
    cfg = {"architecture": net.config.to_dict(), "parameters": count_parameters(net)}
    cfg.update(extra or {})
    (out / DEPTH_CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


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
