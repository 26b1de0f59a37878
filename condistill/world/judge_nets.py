"""The judge's networks: the attribute/feature/depth CNN and the dedicated depth U-Net.

:class:`JudgeNet` (architecture :class:`JudgeConfig`) reads a scene image at its training
resolution and returns the feature vector, the attribute logits, a disparity map and the
dense shape/main-object maps it is trained with; :class:`DepthNet` (:class:`DepthNetConfig`)
does depth alone. Loading, resizing and scoring live in :mod:`condistill.world.judge`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from condistill.world.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES

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
