"""Train the judge's dedicated depth estimator and measure it on held-out scenes.

    python tools/train_depth_judge.py                    # adds depth_net.* to condistill/assets/judge (CPU, 1 thread)
    python tools/train_depth_judge.py --smoke --output-dir runs/depth-judge-smoke

The judge network's own depth head (``tools/train_judge.py``) shares its encoder with the
attribute heads and has 8 channels at full resolution; its aligned error on real held-out
scenes is a floor under every depth-fidelity figure measured with it. This recipe trains a
small U-Net (:class:`condistill.world.judge.DepthNet`) on depth alone, with the same scenes,
colour-preserving degradations and L1 + gradient-L1 loss as the judge, and writes
``depth_net.safetensors`` + ``depth_net.json`` into the judge folder. ``load_judge`` then
uses it for ``judge.depth``; the judge's weights, features and Frechet distances are not
touched. ``depth_net.json`` records the held-out error of both estimators.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from condistill.evaluation.metrics import depth_error
from condistill.world.judge import DepthNet, DepthNetConfig, load_judge, save_depth_net
from condistill.world.scenes import SyntheticScenes
from train_judge import SceneTrainingConfig, TrainJudgeConfig, augment_batch, depth_loss
from worldbuild.cli import config_from_args, parser_from_dataclass
from worldbuild.render import render_scenes


@dataclass
class TrainDepthConfig(SceneTrainingConfig):
    """Everything that determines a depth-estimator training run."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        super().__post_init__()
        DepthNetConfig(widths=self.widths)  # validates the architecture

    @classmethod
    def smoke(cls, **overrides) -> "TrainDepthConfig":
        values = dict(output_dir="runs/depth-judge-smoke", train_scenes=32, heldout_scenes=8, steps=3,
                      batch_size=8, warmup_steps=1, log_every=1, widths=(4, 8, 8, 8))
        values.update(overrides)
        return cls(**values)


def log(msg: str) -> None:
    print(f"[train_depth_judge {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def heldout_depth_errors(folder: Path, count: int, seed: int) -> dict:
    """Aligned depth error of the dedicated estimator and of the judge's own head on held-out scenes."""
    judge = load_judge(folder)
    scenes = SyntheticScenes("heldout", count, judge.config.resolution, seed)
    records = [scenes[i] for i in range(count)]
    gt = torch.from_numpy(np.stack([np.asarray(r.depth, dtype=np.float32) for r in records]))
    images = [r.image for r in records]
    out = {"scenes": count, "depth_net": float(depth_error(judge.depth(images), gt))}
    head = judge.depth_net
    judge.depth_net = None
    out["judge_head"] = float(depth_error(judge.depth(images), gt))
    judge.depth_net = head
    return out


def train(cfg: TrainDepthConfig, command: str) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    if not (out_dir / "judge.safetensors").is_file():
        raise FileNotFoundError(f"{out_dir} holds no judge; the depth estimator is added to an existing judge "
                                f"folder (train one with `python tools/train_judge.py --output-dir {out_dir}`)")
    resolution = load_judge(out_dir).config.resolution
    t0 = time.perf_counter()
    scenes = render_scenes("train", cfg.train_scenes, resolution, cfg.seed)
    images, depth_all = scenes.images, torch.from_numpy(scenes.depth)
    log(f"rendered {cfg.train_scenes} scenes in {time.perf_counter() - t0:.0f}s")
    net = DepthNet(DepthNetConfig(resolution=resolution, widths=cfg.widths))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    augment = TrainJudgeConfig()  # the judge's own degradations
    t1, running = time.perf_counter(), 0.0
    for step in range(cfg.steps):
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.choice(cfg.train_scenes, cfg.batch_size, replace=False)
        x, target, _ = augment_batch(images[idx], depth_all[idx].float(), rng, augment)
        loss = depth_loss(net(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            log(f"step {step + 1}/{cfg.steps} loss={running / n:.4f} lr={lr:.2e} "
                f"({(step + 1) * cfg.batch_size / (time.perf_counter() - t1):.0f} img/s)")
            running = 0.0
    train_seconds = time.perf_counter() - t1
    net.eval()
    training = {"config": asdict(cfg), "seconds": round(train_seconds, 1),
                "images_per_second": round(cfg.steps * cfg.batch_size / train_seconds, 1), "command": command,
                "torch": torch.__version__}
    save_depth_net(net, out_dir, extra={"training": training})
    errors = heldout_depth_errors(out_dir, cfg.heldout_scenes, cfg.seed)
    save_depth_net(net, out_dir, extra={"training": training, "heldout_depth_error": errors})
    log(f"saved {out_dir}; held-out depth error: {json.dumps(errors)}")
    return {"training": training, "heldout_depth_error": errors}


def build_parser() -> argparse.ArgumentParser:
    parser = parser_from_dataclass(TrainDepthConfig, __doc__.split("\n\n")[0].strip() + " See docs/judge.md.")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few scenes (end-to-end check)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(TrainDepthConfig, args, parser, TrainDepthConfig.smoke if args.smoke else None)
    command = ("python tools/train_depth_judge.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    return train(cfg, command)


if __name__ == "__main__":
    main()
