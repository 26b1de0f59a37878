"""The training loop: frozen base + trainable adapter + condition + data -> adapter files.

One visible loop (``distill``). The loss is the objective built once from the config
(:mod:`condistill.training.objective`) over the pure functions of :mod:`condistill.method.losses`;
every random draw of step ``i`` comes from a generator seeded by ``(seed, i)``, so a resumed run
replays exactly what an uninterrupted one would have done.

Several processes (``torchrun`` / ``accelerate launch``) train data-parallel: each draws its own
part of every global batch (:mod:`condistill.training.batches`), gradients are averaged across
processes before each optimizer step (DDP, synchronised on the last micro-step of an accumulation
only), and every process keeps the same EMA, which its target and ODE branches need. The main
process alone writes: checkpoints, validation grids, ``loss.jsonl``, the data report, the export
and its card.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from condistill.adapters import build_student
from condistill.adapters.save_load import save_adapter
from condistill.conditions import get_condition
from condistill.config import DistillConfig, SettingError, check_resolution
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.fingerprint import source_fingerprint
from condistill.data.report import REPORT_NAME, SkipMonitor
from condistill.data.skips import EmptySourceError
from condistill.data.cache import CachedDataset, is_cache
from condistill.data.sources import IndexedSource, open_source
from condistill.data.streaming import StreamingConditionDataset, is_streaming
from condistill.frozen import load_base
from condistill.method.guidance import make_model_fn
from condistill.method.one_step import trained_start
from condistill.method.schedule import skip_grid
from condistill.plots import plot_loss_curve, save_validation_grid
from condistill.training.batches import Part, StepBatchSampler, batch_length, require_data_parallel, start_processes
from condistill.training.checkpoint import (UNHEALTHY, RunHealth, check_step, guarded_step, load_checkpoint, read_state,
                                           reset_run_to, resolve_resume, save_checkpoint)
from condistill.training.ema import EMA
from condistill.training.fake_score import FakeScore
from condistill.training.lr import build_optimizer, warmup_schedule
from condistill.training.objective import DTYPES, build_objective
from condistill.files import staged_folder
from condistill.training.run_folder import (EXPORT_SUBFOLDER, ResumeMismatchError, RunLockedError, already_finished,
                                           check_output_dir, check_resume, retire_root_export, run_lock,
                                           set_learning_rate)

__all__ = ["StepBatchSampler", "distill"]


def distill(cfg: DistillConfig) -> Path:
    """Train ``cfg.adapter`` on ``cfg.condition`` against the frozen ``cfg.base``; return the run folder.

    The run folder holds the EMA adapter export in ``adapter/`` (what ``load_adapter`` reads from the
    run folder; replaced whole, never a mix of two exports), ``checkpoints/`` (resumable training
    state), ``logs/`` (TensorBoard), ``loss.jsonl``, ``loss.png``, ``config.json`` and
    ``validation/step-*.png`` grids (docs/runs.md). Every process of a multi-process launch calls it;
    it returns once the main process has written the export.
    """
    state = start_processes()
    check_precision(cfg.mixed_precision, state.device)
    resolution = check_resolution(cfg.base, cfg.resolution)  # refused in one line before anything is written
    out = Path(cfg.output_dir)
    log = _log if state.is_main_process else _quiet
    resume_from = resolve_resume(out, cfg.resume, log=log)  # the newest healthy checkpoint for 'latest'
    check_output_dir(out, cfg, resume_from)
    data = source_fingerprint(cfg.data, cfg.data_options)  # recorded in every checkpoint, compared on resume
    changes = check_resume(resume_from, cfg, processes=state.num_processes, data=data, log=log) if resume_from else []
    done = already_finished(out, int(read_state(resume_from)["step"]), cfg.max_steps, changes) if resume_from else None
    if done is not None:
        log(f"the run is already finished at step {cfg.max_steps}; its export is {done} (nothing was written; "
            "pass a larger --max-steps to train on)")
        return out
    state.wait_for_everyone()  # every process has read the folder before the main process changes it
    out.mkdir(parents=True, exist_ok=True)
    # one writer per run folder: the main process holds the lock for the whole run
    with _main_process_lock(state, out):
        return _distill(cfg, out, resume_from, changes, resolution, data, cpu=state.device.type == "cpu")


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse fp16 anywhere but on CUDA: elsewhere there is no fp16 autocast with loss scaling
    (half-precision weights would meet float32 activations). bf16 runs on CPUs and GPUs."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise SettingError(f"--mixed-precision fp16 needs a CUDA GPU and this run is on {device.type}; use "
                             "--mixed-precision bf16 (or no)")


def _fresh_accelerator_state() -> None:
    """Forget the mixed precision of an earlier run in this process (one process only): accelerate keeps its
    state per process and refuses a second ``Accelerator`` with another ``mixed_precision``."""
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _log(message: str) -> None:
    print(f"condistill: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """The log of the other processes: the main process says everything once."""


@contextlib.contextmanager
def _main_process_lock(state, out: Path):
    """:func:`run_lock` on the main process; when it is refused, every process stops with its error."""
    with contextlib.ExitStack() as stack:
        refused = [None]
        if state.is_main_process:
            try:
                stack.enter_context(run_lock(out, log=_log))
            except RunLockedError as error:
                refused = [str(error)]
        refused = broadcast_object_list(refused) if state.num_processes > 1 else refused
        if refused[0] is not None:
            raise RunLockedError(refused[0])
        yield


def _distill(cfg: DistillConfig, out: Path, resume_from: Path | None, changes: list[str], resolution: int,
             data: dict, cpu: bool) -> Path:
    # the data first: a bad --data fails in a second, before any model loads
    condition = get_condition(cfg.condition, **cfg.condition_options)
    condition.check()  # e.g. a depth estimator that is not on this machine
    dataset = _open_dataset(cfg, condition, resolution)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    _fresh_accelerator_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        cpu=cpu,
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    require_data_parallel(accelerator.distributed_type)
    device, main, processes = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    base = load_base(cfg.base, device=device, dtype=DTYPES[cfg.mixed_precision])
    student = build_student(cfg.adapter, base, condition.channels, **cfg.adapter_options).to(device)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params = student.trainable_named_parameters()
    optimizer = build_optimizer(cfg.optimizer, params.values(), cfg.learning_rate, cfg.weight_decay, device)
    lr_scheduler = warmup_schedule(optimizer, cfg.lr_warmup_steps)
    ema = EMA(params)
    extra = {"fake_score": FakeScore.from_config(cfg, student, base)} if cfg.distribution_matching else {}
    start = load_checkpoint(resume_from, params, ema, optimizer, lr_scheduler, extra) if resume_from else 0
    health = RunHealth.start(resume_from, params)  # the loss/weight history each checkpoint's health verdict reads
    if changes and main:
        _log(f"resuming from {resume_from} (step {start}) with changed options: " + "; ".join(changes))
    if any(change.startswith("learning_rate:") for change in changes):
        set_learning_rate(optimizer, lr_scheduler, cfg.learning_rate)
    accum = cfg.gradient_accumulation_steps
    if main and cfg.distribution_matching and cfg.mixed_precision == "fp16":
        _log("note: the fake score's own update is not loss-scaled under fp16 and its gradients may underflow; "
             "--mixed-precision bf16 is the safer choice with --loss " + cfg.loss)
    if main:
        cfg.save(out / "config.json")
        _log(f"training {cfg.condition}/{cfg.adapter} on {device.type}, processes: {processes}; global batch "
             f"{cfg.batch_size} x {processes} x {accum} = {cfg.batch_size * processes * accum} images per step")

    if is_streaming(dataset):
        dataset = StreamingConditionDataset(dataset, condition, resolution, cfg.seed, batch_size=cfg.batch_size,
                                            rank=accelerator.process_index, world_size=processes,
                                            start_micro_step=start * accum)
    monitor = SkipMonitor.for_dataset(dataset, cfg.max_skip_fraction,  # skips: lines, data_report.json, a stop
                                      report_path=out / REPORT_NAME if main else None)
    part = Part(processes, accelerator.process_index)
    if isinstance(dataset, CachedDataset):  # the cache's own base check, now that the base is known
        from condistill.data.cache_writer import encoders_digest

        dataset.check(base.fingerprint(), resolution, cfg.condition, condition.config(), cfg.seed,
                      encoders_digest=encoders_digest(cfg.base))
    loader = _loader(dataset, cfg, condition, resolution, part, start * accum, changes)
    model, optimizer = accelerator.prepare(student, optimizer)
    accelerator.init_trackers("condistill", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})

    objective = build_objective(cfg, student, model, ema, base, part, fake_score=extra.get("fake_score"),
                                condition=condition)
    validation = _validation_batch(cfg, condition, resolution, base) if main else None
    log_path = out / "loss.jsonl"
    accelerator.wait_for_everyone()  # every process has read its checkpoint
    if main:  # stale temp folders, checkpoints after `start`, loss.jsonl lines after it
        reset_run_to(out, start, log_path, log=_log)
    save = dict(config=cfg.to_dict(), keep=cfg.keep_checkpoints, health=health, processes=processes, extra=extra,
                data=data)
    it, t_last, seen = iter(loader), time.perf_counter(), 0
    # the bar as a context: an error ends its line before the error is printed
    with tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.condition}/{cfg.adapter}", disable=not main) as bar:
        for step in range(start, cfg.max_steps):
            student.train()
            for j in range(accum):
                batch = monitor.update(next(it))
                with accelerator.accumulate(model):
                    with accelerator.autocast():  # every forward of the step: online, EMA, teacher, real and fake scores
                        loss, info = objective(batch, step * accum + j)
                    accelerator.backward(loss.mean())
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                    # an overflow inside the optimizer stops the run as a FloatingPointError
                    guarded_step(optimizer, out, step + 1, cfg.learning_rate, cfg.mixed_precision)
                    optimizer.zero_grad(set_to_none=True)
                seen += batch_length(batch) * processes
            lr_scheduler.step()
            ema.update(params, cfg.ema_decay_at(step))  # on every process: the same weights give the same EMA
            done = step + 1
            # the global batch's mean losses (one device sync per step): every process takes the same decisions
            means = _global_means({"loss": loss, **{k: v for k, v in info.items() if k in LOGGED_TERMS}}, accelerator)
            loss_value = means.pop("loss")
            # a non-finite loss or weights stop the run before any checkpoint is written from them
            largest = check_step(out, done, loss_value, params, cfg.learning_rate, cfg.mixed_precision)
            health.add(done, loss_value, largest)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                record = {"step": done, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                          "images_per_s": seen / max(now - t_last, 1e-9), **means}
                t_last, seen = now, 0
                accelerator.log(record, step=done)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                if main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            bar.update(1)
            if main:
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.max_steps:
                    _checkpoint(out, done, params, ema, optimizer, lr_scheduler, save)
                if cfg.validate_every and done % cfg.validate_every == 0 and done != cfg.max_steps:
                    _validate(out, done, base, student, ema, validation, cfg, accelerator, condition)
    if main:  # the report and summary of the items this process read
        monitor.finish()
    accelerator.wait_for_everyone()
    if main:
        _checkpoint(out, cfg.max_steps, params, ema, optimizer, lr_scheduler, save)
        _validate(out, cfg.max_steps, base, student, ema, validation, cfg, accelerator, condition)
        plot_loss_curve(log_path, out / "loss.png", validation_steps=_validation_steps(out))
        _export(out, cfg, student, ema, base, condition, resolution, processes, same_weights=start == cfg.max_steps)
    accelerator.wait_for_everyone()  # no process returns before the export is complete
    accelerator.end_training()
    return out


def _checkpoint(out: Path, step: int, params, ema, optimizer, lr_scheduler, save: dict) -> Path:
    path = save_checkpoint(out, step, params, ema, optimizer, lr_scheduler, **save)
    if path.parent.name == UNHEALTHY:
        _log(f"the checkpoint of step {step} is unhealthy ({save['health'].verdict()[1]}); it is kept in {path} "
             "and --resume latest passes over it")
    return path


def _export(out: Path, cfg: DistillConfig, student, ema, base, condition, resolution: int, processes: int,
            same_weights: bool = False) -> Path:
    """The EMA export and its card, written whole beside ``out/adapter`` and swapped in (never a mix).

    ``same_weights``: no step was trained (a finished run resumed to change a sampling option), so the
    results the old card records still measure these weights and are kept."""
    import shutil

    from condistill.publish.card import CARD_NAME, write_model_card  # the export's README.md and samples.png
    from condistill.training.run_folder import finished_export

    old = finished_export(out)
    with staged_folder(out / EXPORT_SUBFOLDER, log=_log) as stage, ema.swapped_in(student):
        save_adapter(student, stage, base_name_or_path=cfg.base, base_fingerprint=base.fingerprint(),
                     condition_name=cfg.condition, condition_config=condition.config(), num_grid=cfg.num_grid,
                     prediction_type=base.prediction_type, recommended_steps=cfg.recommended_steps,
                     recommended_guidance=cfg.sampling_guidance, stochastic=cfg.stochastic_sampling,
                     resolution=resolution, noise_schedule=base.noise_schedule_config(),
                     one_step_start=trained_start(cfg.loss, cfg.dmd_start_timestep, condition.has_start_image(),
                                                  int(skip_grid(base.num_train_timesteps, cfg.num_grid)[-1])),
                     extra={"loss": cfg.loss, "steps_trained": cfg.max_steps})
        keep = same_weights and old is not None and (old / CARD_NAME).is_file()
        if keep:
            shutil.copyfile(old / CARD_NAME, stage / CARD_NAME)
        write_model_card(stage, run=out, source=out / EXPORT_SUBFOLDER, num_processes=processes, keep_results=keep)
    retire_root_export(out, log=_log)
    return out / EXPORT_SUBFOLDER


#: the per-sample terms of the objective's diagnostics logged beside the loss
LOGGED_TERMS = ("distill", "regression", "dmd", "fake_score", "gan_g", "gan_d")


def _global_means(values: dict[str, torch.Tensor], accelerator) -> dict[str, float]:
    """The means over the global batch of per-sample values (every process holds the same number)."""
    names = list(values)
    local = torch.stack([values[k].detach().float().mean() for k in names])
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="mean")
    return dict(zip(names, local.cpu().tolist()))


PROBE_ITEMS = 64


def _open_dataset(cfg: DistillConfig, condition, resolution: int):
    """The training data: a ``ConditionDataset``, a ``CachedDataset``, or a stream-only source.

    A latent cache is checked here for everything but the base (resolution, condition, seed);
    the base is checked once it is loaded. A separate copy of a sized source is probed first:
    when none of its first :data:`PROBE_ITEMS` items is usable (all of them, for a smaller
    source), the run stops here, before any model loads (unless ``max_skip_fraction`` is 1). A
    stream-only source (tar shards, streamed ``datasets``) is returned as it is and becomes a
    :class:`StreamingConditionDataset` once the process count is known.
    """
    try:
        if is_cache(cfg.data):
            cached = CachedDataset(cfg.data)
            cached.check(cached.base_fingerprint, resolution, cfg.condition, condition.config(), cfg.seed)
            return cached
        own = condition.record_conditioning
        probe = open_source(cfg.data, resolution=resolution, conditioning=own, **cfg.data_options)
        if isinstance(probe, IndexedSource) and cfg.max_skip_fraction < 1:
            count = min(len(probe), PROBE_ITEMS)
            if not any(probe.load(i) is not None for i in range(count)):
                if count == len(probe):
                    raise probe.stats.empty_error()
                raise EmptySourceError(f"none of the first {count} items is usable: {probe.stats.summary()}")
        source = open_source(cfg.data, resolution=resolution, conditioning=own, **cfg.data_options)
        if is_streaming(source):
            return source
        return ConditionDataset(source, condition, resolution, seed=cfg.seed)
    except (EmptySourceError, FileNotFoundError) as error:
        raise type(error)(f"--data {cfg.data!r}: {error}") from error


def _loader(dataset, cfg: DistillConfig, condition, resolution: int, part: Part, start: int, changes: list[str]):
    """This process's loader of micro-batches ``start, start + 1, ...`` (its part of each global batch).

    The loader is not handed to accelerate to shard: each process reads only its own part.
    """
    if isinstance(dataset, StreamingConditionDataset):
        moved = [c for c in changes if c.startswith(("num_workers:", "batch_size:"))]
        if moved:
            raise ResumeMismatchError(
                "a streamed data source resumes at the exact sample only with the processes, --batch-size and "
                f"--num-workers it was trained with; changed: {'; '.join(moved)}. Resume with the checkpoint's values.")
        return DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=dataset.collate, num_workers=cfg.num_workers)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start, cfg.max_steps * cfg.gradient_accumulation_steps,
                               processes=part.processes, rank=part.rank)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=cfg.num_workers)


def _validation_batch(cfg: DistillConfig, condition, resolution: int, base, count: int = 8) -> dict:
    """The validation items: ``cfg.validation_images`` with their prompts, else ``count`` held-out scenes.

    A user's images are plain images; their condition is derived by ``condition`` as in training.
    From a latent cache, the first ``count`` cached items, their images decoded by ``base``.
    """
    if cfg.validation_images:
        from condistill.config import validation_pairs
        from condistill.data.images import open_image, to_rgb
        from condistill.data.record import Record

        # a condition that takes the data's control images is shown the validation images as control images
        given = condition.record_conditioning == "required"
        records = [Record(image=image, caption=prompt, key=path, conditioning=image if given else None)
                   for path, prompt in validation_pairs(cfg.validation_images, cfg.validation_prompts)
                   for image in [to_rgb(open_image(path))]]
        items = ConditionDataset(records, condition, resolution, seed=cfg.seed + 1)
        return collate([items[i] for i in range(len(items))])
    if is_cache(cfg.data):
        cached = CachedDataset(cfg.data)
        batch = cached.collate([cached[i] for i in range(min(count, len(cached)))])
        batch["pixel_values"] = base.decode_latents(batch["latents"].to(base.device, base.dtype)).float().cpu()
        return batch
    spec = "synthetic:heldout:64" if cfg.data.startswith("synthetic") else cfg.data
    source = open_source(spec, resolution=resolution, conditioning=condition.record_conditioning,
                         **({} if spec.startswith("synthetic") else cfg.data_options))
    if is_streaming(source):  # the stream's first records, never the whole stream
        source = list(itertools.islice(iter(source), count))
    items = ConditionDataset(source, condition, resolution, seed=cfg.seed + 1)
    return collate([items[i] for i in range(min(count, len(items)))])


VALIDATION_CHUNK = 8  # validation images sampled together (more are sampled in chunks of this many)


@torch.no_grad()
def _validate(out: Path, step: int, base, student, ema, batch: dict, cfg: DistillConfig, accelerator=None,
              condition=None) -> Path:
    """Sample ``batch`` at 1, 2, 4 and ``cfg.recommended_steps`` steps into ``validation/step-*.png`` (and the trackers).

    One step starts where the run trains it (``--dmd-start-timestep``: the ``condition``'s image or the zero
    latent noised there), as the export's pipeline samples it (a ControlNet's: T2I-Adapter and LoRA
    students have no img2img pipeline). Sampling draws from its own seeded
    generators, never from the training streams.
    """
    from condistill.method.sampler import sample_images, start_latents

    student.eval()
    device = base.device
    step_counts = sorted({1, 2, 4, cfg.recommended_steps})
    rows: dict[int, list[torch.Tensor]] = {steps: [] for steps in step_counts}
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with ema.swapped_in(student), autocast:
        for first in range(0, len(batch["caption"]), VALIDATION_CHUNK):
            cond = batch["conditioning"][first:first + VALIDATION_CHUNK].to(device)
            captions = batch["caption"][first:first + VALIDATION_CHUNK]
            features = student.encode_condition(cond)
            fn = make_model_fn(student, features, cond.shape[0])
            for steps in step_counts:
                start = cfg.dmd_start_timestep if steps == 1 and cfg.distribution_matching else 0
                rows[steps].append(sample_images(base, fn, captions, steps, sampler=cfg.student_sampler,
                                                 num_grid=cfg.num_grid, seed=cfg.seed + first,
                                                 guidance_scale=cfg.sampling_guidance, size=tuple(cond.shape[-2:]),
                                                 init_latents=start_latents(base, condition, cond) if start else None,
                                                 start_timestep=start or None))
    student.train()
    names = [f"{steps} step" + ("s" if steps > 1 else "") for steps in step_counts]
    path = save_validation_grid(out / "validation" / f"step-{step:07d}.png", batch,
                                [torch.cat(rows[steps]) for steps in step_counts], names)
    _log_grid(accelerator, path, step)
    return path


def _validation_steps(out: Path) -> list[int]:
    """The steps whose validation grids the run folder holds (``validation/step-NNNNNNN.png``)."""
    return sorted(int(p.stem.split("-")[1]) for p in (out / "validation").glob("step-*.png")
                  if p.stem.split("-")[1].isdigit())


def _log_grid(accelerator, path: Path, step: int) -> None:
    """Log a validation grid to the run's trackers (tensorboard, wandb); ``--report-to none`` has none."""
    import numpy as np
    from PIL import Image

    for tracker in accelerator.trackers if accelerator is not None else []:
        if tracker.name in ("tensorboard", "wandb"):
            image = np.asarray(Image.open(path).convert("RGB"))
            extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({"validation": image[None] if extra else [image]}, step=step, **extra)
