"""The training loop: frozen base + trainable adapter + condition + data -> adapter files.

One visible loop (``distill``). The loss is the objective built once from the config
(:mod:`condistill.training.objective`) over the pure functions of :mod:`condistill.method.losses`;
every random draw of step ``i`` comes from a generator seeded by ``(seed, i)``, so a resumed run
replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from condistill.adapters import build_student
from condistill.adapters.save_load import save_adapter
from condistill.conditions import get_condition
from condistill.config import DistillConfig
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.report import REPORT_NAME, SkipMonitor
from condistill.data.skips import EmptySourceError
from condistill.data.sources import IndexedSource, open_source
from condistill.frozen import load_base, native_resolution
from condistill.method.guidance import make_model_fn
from condistill.plots import plot_loss_curve, save_validation_grid
from condistill.seeding import BATCH_ORDER_STRIDE, torch_generator
from condistill.training.checkpoint import (RunHealth, check_step, guarded_step, load_checkpoint, reset_run_to,
                                           resolve_resume, save_checkpoint)
from condistill.training.ema import EMA
from condistill.training.lr import warmup_schedule
from condistill.training.objective import DTYPES, build_objective
from condistill.training.run_folder import check_output_dir, check_resume, run_lock, set_learning_rate


class StepBatchSampler(Sampler):
    """Index batches for optimizer micro-steps ``start, start+1, ...``.

    Epoch ``e`` visits the data in a permutation seeded by ``(seed, e)``, so the batch of a
    given micro-step does not depend on where the run was (re)started.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int):
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop

    def batch(self, micro_step: int) -> list[int]:
        first = micro_step * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, i = divmod(pos, self.size)
            perm = torch.randperm(self.size, generator=torch_generator(self.seed, epoch, BATCH_ORDER_STRIDE))
            out.append(int(perm[i]))
        return out

    def __iter__(self):
        return (self.batch(m) for m in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def distill(cfg: DistillConfig) -> Path:
    """Train ``cfg.adapter`` on ``cfg.condition`` against the frozen ``cfg.base``; return the run folder.

    The run folder holds the EMA adapter export at its root (what ``load_adapter`` reads),
    ``checkpoints/`` (resumable training state), ``logs/`` (TensorBoard), ``loss.jsonl``,
    ``loss.png``, ``config.json`` and ``validation/step-*.png`` grids.
    """
    out = Path(cfg.output_dir)
    resume_from = resolve_resume(out, cfg.resume, log=_log)  # the newest healthy checkpoint for 'latest'
    check_output_dir(out, cfg, resume_from)
    changes = check_resume(resume_from, cfg) if resume_from else []
    out.mkdir(parents=True, exist_ok=True)
    # one writer per run folder: the main process holds the lock for the whole run
    with run_lock(out, log=_log) if PartialState().is_main_process else contextlib.nullcontext():
        return _distill(cfg, out, resume_from, changes)


def _log(message: str) -> None:
    print(f"condistill: {message}", file=sys.stderr, flush=True)


def _distill(cfg: DistillConfig, out: Path, resume_from: Path | None, changes: list[str]) -> Path:
    # the data first: a bad --data fails in a second, before any model loads
    resolution = cfg.resolution or native_resolution(cfg.base)
    condition = get_condition(cfg.condition, **cfg.condition_options)
    dataset = _open_dataset(cfg, condition, resolution)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device = accelerator.device
    base = load_base(cfg.base, device=device, dtype=DTYPES[cfg.mixed_precision])
    student = build_student(cfg.adapter, base, condition.channels, **cfg.adapter_options).to(device)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params = student.trainable_named_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = warmup_schedule(optimizer, cfg.lr_warmup_steps)
    ema = EMA(params)
    start = load_checkpoint(resume_from, params, ema, optimizer, lr_scheduler) if resume_from else 0
    health = RunHealth.start(resume_from, params)  # the loss/weight history each checkpoint's health verdict reads
    if changes and accelerator.is_main_process:
        _log(f"resuming from {resume_from} (step {start}) with changed options: " + "; ".join(changes))
    if any(change.startswith("learning_rate:") for change in changes):
        set_learning_rate(optimizer, lr_scheduler, cfg.learning_rate)
    cfg.save(out / "config.json")

    monitor = SkipMonitor.for_dataset(dataset, cfg.max_skip_fraction,  # skips: lines, data_report.json, a stop
                                      report_path=out / REPORT_NAME if accelerator.is_main_process else None)
    accum = cfg.gradient_accumulation_steps
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start * accum, cfg.max_steps * accum)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=cfg.num_workers)
    model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    accelerator.init_trackers("condistill", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})

    objective = build_objective(cfg, student, model, ema, base)
    validation = _validation_batch(cfg, condition, resolution)
    log_path = out / "loss.jsonl"
    if accelerator.is_main_process:  # stale temp folders, checkpoints after `start`, loss.jsonl lines after it
        reset_run_to(out, start, log_path, log=_log)
    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.condition}/{cfg.adapter}", disable=not accelerator.is_main_process)
    it, t_last, seen = iter(loader), time.perf_counter(), 0
    for step in range(start, cfg.max_steps):
        student.train()
        for j in range(accum):
            batch = monitor.update(next(it))
            with accelerator.accumulate(model):
                loss, info = objective(batch, step * accum + j)
                accelerator.backward(loss.mean())
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                # an overflow inside the optimizer stops the run as a FloatingPointError
                guarded_step(optimizer, out, step + 1, cfg.learning_rate, cfg.mixed_precision)
                optimizer.zero_grad(set_to_none=True)
            seen += batch["pixel_values"].shape[0]
        lr_scheduler.step()
        ema.update(params, cfg.ema_decay_at(step))
        done = step + 1
        loss_value = loss.mean().item()  # one device sync per step
        # a non-finite loss or weights stop the run before any checkpoint is written from them
        largest = check_step(out, done, loss_value, params, cfg.learning_rate, cfg.mixed_precision)
        health.add(done, loss_value, largest)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            now = time.perf_counter()
            record = {"step": done, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                      "images_per_s": seen / max(now - t_last, 1e-9),
                      **{k: float(v.float().mean()) for k, v in info.items() if k in ("distill", "regression")}}
            t_last, seen = now, 0
            accelerator.log(record, step=done)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
        bar.update(1)
        if accelerator.is_main_process:
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.max_steps:
                save_checkpoint(out, done, params, ema, optimizer, lr_scheduler, cfg.to_dict(), cfg.keep_checkpoints,
                                health=health)
            if cfg.validate_every and done % cfg.validate_every == 0 and done != cfg.max_steps:
                _validate(out, done, base, student, ema, validation, cfg, accelerator)
    bar.close()
    monitor.finish()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out, cfg.max_steps, params, ema, optimizer, lr_scheduler, cfg.to_dict(), cfg.keep_checkpoints,
                        health=health)
        _validate(out, cfg.max_steps, base, student, ema, validation, cfg, accelerator)
        with ema.swapped_in(student):
            save_adapter(student, out, base_name_or_path=cfg.base, base_fingerprint=base.fingerprint(),
                         condition_name=cfg.condition, condition_config=condition.config(), num_grid=cfg.num_grid,
                         prediction_type=base.prediction_type, recommended_steps=cfg.recommended_steps,
                         recommended_guidance=cfg.sampling_guidance, stochastic=cfg.stochastic_sampling,
                         resolution=resolution, noise_schedule=base.noise_schedule_config(),
                         extra={"loss": cfg.loss, "steps_trained": cfg.max_steps})
        plot_loss_curve(log_path, out / "loss.png")
        from condistill.publish.card import write_model_card  # the export's README.md and samples.png
        write_model_card(out, num_processes=accelerator.num_processes)
    accelerator.end_training()
    return out


PROBE_ITEMS = 64


def _open_dataset(cfg: DistillConfig, condition, resolution: int) -> ConditionDataset:
    """The training dataset; a data source that cannot be used is reported against ``--data``.

    A separate copy of a sized source is probed first: when none of its first
    :data:`PROBE_ITEMS` items is usable (all of them, for a smaller source), the run stops
    here, before any model loads (unless ``max_skip_fraction`` is 1).
    """
    try:
        probe = open_source(cfg.data, resolution=resolution, **cfg.data_options)
        if isinstance(probe, IndexedSource) and cfg.max_skip_fraction < 1:
            count = min(len(probe), PROBE_ITEMS)
            if not any(probe.load(i) is not None for i in range(count)):
                if count == len(probe):
                    raise probe.stats.empty_error()
                raise EmptySourceError(f"none of the first {count} items is usable: {probe.stats.summary()}")
        return ConditionDataset(open_source(cfg.data, resolution=resolution, **cfg.data_options), condition,
                                resolution, seed=cfg.seed)
    except (EmptySourceError, FileNotFoundError) as error:
        raise type(error)(f"--data {cfg.data!r}: {error}") from error


def _validation_batch(cfg: DistillConfig, condition, resolution: int, count: int = 8) -> dict:
    """The validation items: ``cfg.validation_images`` with their prompts, else ``count`` held-out scenes.

    A user's images are plain images; their condition is derived by ``condition`` as in training.
    """
    if cfg.validation_images:
        from condistill.config import validation_pairs
        from condistill.data.images import open_image, to_rgb
        from condistill.data.record import Record

        records = [Record(image=to_rgb(open_image(path)), caption=prompt, key=path)
                   for path, prompt in validation_pairs(cfg.validation_images, cfg.validation_prompts)]
        items = ConditionDataset(records, condition, resolution, seed=cfg.seed + 1)
        return collate([items[i] for i in range(len(items))])
    spec = "synthetic:heldout:64" if cfg.data.startswith("synthetic") else cfg.data
    source = open_source(spec, resolution=resolution, **({} if spec.startswith("synthetic") else cfg.data_options))
    items = ConditionDataset(source, condition, resolution, seed=cfg.seed + 1)
    return collate([items[i] for i in range(min(count, len(items)))])


VALIDATION_CHUNK = 8  # validation images sampled together (more are sampled in chunks of this many)


@torch.no_grad()
def _validate(out: Path, step: int, base, student, ema, batch: dict, cfg: DistillConfig, accelerator=None) -> Path:
    """Sample ``batch`` at 1, 2, 4 and ``cfg.recommended_steps`` steps into ``validation/step-*.png`` (and the trackers).

    Sampling draws from its own seeded generators, never from the training streams.
    """
    from condistill.method.sampler import sample_images

    student.eval()
    device = base.device
    step_counts = sorted({1, 2, 4, cfg.recommended_steps})
    rows: dict[int, list[torch.Tensor]] = {steps: [] for steps in step_counts}
    with ema.swapped_in(student):
        for first in range(0, len(batch["caption"]), VALIDATION_CHUNK):
            cond = batch["conditioning"][first:first + VALIDATION_CHUNK].to(device)
            captions = batch["caption"][first:first + VALIDATION_CHUNK]
            features = student.encode_condition(cond)
            fn = make_model_fn(student, features, cond.shape[0])
            for steps in step_counts:
                rows[steps].append(sample_images(base, fn, captions, steps, sampler=cfg.student_sampler,
                                                 num_grid=cfg.num_grid, seed=cfg.seed + first,
                                                 guidance_scale=cfg.sampling_guidance))
    student.train()
    names = [f"{steps} step" + ("s" if steps > 1 else "") for steps in step_counts]
    path = save_validation_grid(out / "validation" / f"step-{step:07d}.png", batch,
                                [torch.cat(rows[steps]) for steps in step_counts], names)
    _log_grid(accelerator, path, step)
    return path


def _log_grid(accelerator, path: Path, step: int) -> None:
    """Log a validation grid to the run's trackers (tensorboard, wandb); ``--report-to none`` has none."""
    import numpy as np
    from PIL import Image

    for tracker in accelerator.trackers if accelerator is not None else []:
        if tracker.name in ("tensorboard", "wandb"):
            image = np.asarray(Image.open(path).convert("RGB"))
            extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({"validation": image[None] if extra else [image]}, step=step, **extra)
