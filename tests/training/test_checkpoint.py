"""Checkpoints that cannot poison or lose a run: health records, divergence stops, loss.jsonl on
resume, disk safety (faults injected in-process; the loop runs a few steps on the tiny base)."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import condistill.training.checkpoint as ckpt
import condistill.training.health as health_module
import condistill.training.loop as loop
from condistill.training.checkpoint import (CHECKPOINT_FILES, RunHealth, UnhealthyCheckpointError, checkpoint_health,
                                            list_checkpoints, reset_run_to, resolve_resume, save_checkpoint)
from condistill.training.ema import EMA
from condistill.training.loop import distill
from condistill.training.lr import warmup_schedule
from helpers import tiny_run_config as _cfg


def _log_steps(out):
    return [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def _names(out):
    return [p.name for p in list_checkpoints(out)]


def _patch_objective(monkeypatch, change):
    """Wrap the real objective: ``change(loss, micro_step) -> loss``."""
    real = loop.build_objective

    def build(*args, **kwargs):
        objective = real(*args, **kwargs)

        def wrapped(batch, micro_step):
            loss, info = objective(batch, micro_step)
            return change(loss, micro_step), info
        return wrapped

    monkeypatch.setattr(loop, "build_objective", build)


class _Tiny:
    """Parameters, EMA, optimizer and schedule of a toy model, for save_checkpoint without the loop."""

    def __init__(self):
        self.params = {"w": torch.nn.Parameter(torch.arange(64.0))}
        self.ema = EMA(self.params)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=1e-3)
        self.lr_scheduler = warmup_schedule(self.optimizer, 0)

    def save(self, out, step, keep=2, health=None):
        return save_checkpoint(out, step, self.params, self.ema, self.optimizer, self.lr_scheduler, {"seed": 0},
                               keep, health=health)


def _health(losses, weights=None):
    h = RunHealth()
    for i, v in enumerate(losses, 1):
        h.add(i, v, None if weights is None else weights[i - 1])
    return h


# ------------------------------------------------------------------------------------ health rule

def test_health_rule_compares_the_last_window_with_the_median_of_earlier_ones():
    k, m = ckpt.HEALTH_WINDOW, ckpt.HEALTH_FACTOR
    assert _health([]).verdict()[0] and _health([5.0] * 3).verdict()[0]  # nothing earlier: finiteness only
    assert not _health([1.0, float("nan")]).verdict()[0]
    assert not _health([1.0, float("inf")]).verdict()[0]
    steady = [1.0] * (3 * k)
    assert _health(steady).verdict()[0]
    assert _health(steady + [m * 0.9] * k).verdict()[0]
    ok, reason = _health(steady + [m * 1.5] * k).verdict()
    assert not ok and "mean loss of steps" in reason and "exploding" in reason and "earlier windows" in reason
    # a median, not a mean: one early spike does not hide a later explosion
    assert not _health([1e6] * k + steady + [m * 2] * k).verdict()[0]
    # only windows that end before the last K steps are compared (the current one would dilute it)
    assert not _health([1.0] * k + [1.0] * (k // 2) + [m * 2] * k).verdict()[0]
    # the history survives a resume exactly
    h = _health(steady + [3.0] * 4)
    again = RunHealth(json.loads(json.dumps(h.state_dict())))
    for i in range(3 * k + 5, 4 * k + 5):
        h.add(i, 50.0)
        again.add(i, 50.0)
    assert again.state_dict() == h.state_dict() and again.verdict() == h.verdict()


def test_exploding_weights_are_unhealthy_from_the_first_step():
    t = _Tiny()
    h = RunHealth.start(None, t.params)  # the initial weights (largest |w| = 63) are the first window
    h.add(1, 1.0, 70.0)
    assert h.verdict()[0]
    h = RunHealth.start(None, t.params)
    h.add(1, 1.0, 1e30)
    ok, reason = h.verdict()
    assert not ok and "largest |adapter weight|" in reason and "exploding" in reason
    k = ckpt.HEALTH_WINDOW
    assert not _health([1.0] * (3 * k), [1.0] * (2 * k) + [float("inf")] * k).verdict()[0]


def test_checkpoint_records_health_and_weights(tmp_path):
    t = _Tiny()
    path = t.save(tmp_path, 1, health=_health([1.0] * 30 + [100.0] * 10))
    state = json.loads((path / "state.json").read_text())
    assert state["health"]["healthy"] is False and "exploding" in state["health"]["reason"]
    assert state["health"]["rule"] == f"K={ckpt.HEALTH_WINDOW}, M={ckpt.HEALTH_FACTOR:g}"
    with torch.no_grad():
        t.params["w"][3] = float("nan")
    healthy, reason = checkpoint_health(t.save(tmp_path, 2, health=_health([1.0])))
    assert not healthy and "non-finite adapter weights (w" in reason


def test_old_checkpoints_without_health_count_as_healthy(tmp_path):
    t = _Tiny()
    path = t.save(tmp_path, 3)
    state = json.loads((path / "state.json").read_text())
    del state["health"]
    (path / "state.json").write_text(json.dumps(state))
    assert checkpoint_health(path)[0]
    assert resolve_resume(tmp_path, "latest") == path
    assert resolve_resume(tmp_path, str(path)) == path


def test_exploding_loss_marks_checkpoints_and_resume_picks_the_last_healthy(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(health_module, "HEALTH_WINDOW", 2)
    out = tmp_path / "run"
    # steps 7 and 8 report a loss 1e6 times larger (finite: the run goes on, AdamW barely notices)
    _patch_objective(monkeypatch, lambda loss, i: loss * 1e6 if i >= 6 else loss)
    distill(_cfg(tiny_base, out, max_steps=8, checkpoint_every=2, keep_checkpoints=1))
    # the unhealthy checkpoint of step 8 is kept aside, not counted by keep=1 and not pruned
    assert _names(out) == ["step-0000006"]
    assert checkpoint_health(out / "checkpoints/step-0000006")[0]
    healthy, reason = checkpoint_health(out / "checkpoints/unhealthy/step-0000008")
    assert not healthy and "exploding" in reason
    assert "the checkpoint of step 8 is unhealthy" in capsys.readouterr().err
    with pytest.raises(UnhealthyCheckpointError, match="last healthy one is .*step-0000006"):
        distill(_cfg(tiny_base, out, max_steps=8, resume=str(out / "checkpoints/unhealthy/step-0000008")))
    monkeypatch.undo()
    monkeypatch.setattr(health_module, "HEALTH_WINDOW", 2)
    # the export of step 8 came after step 6: resuming from 6 replaces it only with --overwrite
    with pytest.raises(FileExistsError, match="would delete the finished export of step 8"):
        distill(_cfg(tiny_base, out, max_steps=8, checkpoint_every=2, keep_checkpoints=1, resume="latest"))
    capsys.readouterr()
    distill(_cfg(tiny_base, out, max_steps=8, checkpoint_every=2, keep_checkpoints=1, resume="latest", overwrite=True))
    err = capsys.readouterr().err
    assert "resuming from" in err and "step-0000006, the newest healthy checkpoint" in err
    assert _log_steps(out) == list(range(1, 9))
    assert checkpoint_health(out / "checkpoints/step-0000008")[0]  # the resumed run's
    assert (out / "checkpoints/unhealthy/step-0000008").is_dir()  # still kept
    kept = (out / "checkpoints/unhealthy/loss-after-step-0000006.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [7, 8]  # the cut lines of the diverged stretch


# ------------------------------------------------------------------------------ divergence stops

def _all_listed_weights_finite(out):
    for path in list_checkpoints(out):
        for name in ("online.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(path / name)).values()), path


def test_nan_loss_stops_naming_the_step_and_the_last_healthy_checkpoint(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _patch_objective(monkeypatch, lambda loss, i: loss * float("nan") if i >= 2 else loss)
    with pytest.raises(FloatingPointError) as err:
        distill(_cfg(tiny_base, out, max_steps=5, checkpoint_every=1))
    text = str(err.value)
    for part in ("diverged at step 3", "loss became nan", "step-0000002", "--resume latest", "--learning-rate"):
        assert part in text
    assert _names(out) == ["step-0000001", "step-0000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    _all_listed_weights_finite(out)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradients_stop_before_a_checkpoint(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _patch_objective(monkeypatch, lambda loss, i: _NanGrad.apply(loss) if i >= 1 else loss)
    with pytest.raises(FloatingPointError, match=r"at step 2: the adapter weights became non-finite.*step-0000001"):
        distill(_cfg(tiny_base, out, max_steps=4, checkpoint_every=1, max_grad_norm=0))
    assert _names(out) == ["step-0000001"]
    _all_listed_weights_finite(out)


def test_optimizer_overflow_is_a_floating_point_error(tiny_base, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        distill(_cfg(tiny_base, out, learning_rate=1e39, lr_warmup_steps=0, checkpoint_every=1))
    text = str(err.value)
    assert "at step 1: the optimizer step overflowed" in text and "no healthy checkpoint yet" in text
    assert "--learning-rate (now 1e+39" in text
    assert isinstance(err.value.__cause__, RuntimeError)
    assert _names(out) == []


def test_huge_finite_learning_rate_marks_the_exploded_checkpoint_unhealthy(tiny_base, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="diverged at step 2.*no healthy checkpoint yet"):
        distill(_cfg(tiny_base, out, learning_rate=1e30, lr_warmup_steps=0, max_steps=6, checkpoint_every=1))
    _all_listed_weights_finite(out)
    # step 1 blew the weights up (finite, ~1e30) before any loss could show it: its checkpoint is unhealthy
    healthy, reason = checkpoint_health(out / "checkpoints/unhealthy/step-0000001")
    assert not healthy and "largest |adapter weight|" in reason
    assert resolve_resume(out, "latest") is None
    log = (out / "loss.jsonl").read_bytes()
    # starting again from step 0 would cut loss.jsonl: refused without --overwrite, and nothing moves
    with pytest.raises(FileExistsError, match="every checkpoint of .* is unhealthy .*step-0000001.*--overwrite"):
        distill(_cfg(tiny_base, out, max_steps=2, checkpoint_every=1, resume="latest"))
    assert (out / "loss.jsonl").read_bytes() == log
    distill(_cfg(tiny_base, out, max_steps=2, checkpoint_every=1, resume="latest", overwrite=True))
    assert (out / "checkpoints/unhealthy/step-0000001").is_dir()  # kept, never removed
    assert (out / "checkpoints/unhealthy/loss-after-step-0000000.jsonl").read_bytes() == log


def test_mixed_precision_hint(tmp_path):
    assert "--mixed-precision no (now fp16)" in str(ckpt.divergence_error(tmp_path, 4, "x", 1e-3, "fp16"))
    assert "--mixed-precision" not in str(ckpt.divergence_error(tmp_path, 4, "x", 1e-3, "no"))


def test_other_optimizer_errors_are_not_disguised(tmp_path):
    class Broken:
        def step(self):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        ckpt.guarded_step(Broken(), tmp_path, 1, 1e-3)


# ---------------------------------------------------------------------------- loss.jsonl, resume

def test_resume_after_a_kill_keeps_one_log_line_per_step_and_cleans_stale_folders(tiny_base, tmp_path, monkeypatch):
    full = distill(_cfg(tiny_base, tmp_path / "full", max_steps=4))
    out = tmp_path / "part"

    def killed(loss, i):
        if i == 3:
            raise KeyboardInterrupt
        return loss

    _patch_objective(monkeypatch, killed)
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(tiny_base, out, max_steps=4, checkpoint_every=2))
    monkeypatch.undo()
    assert _log_steps(out) == [1, 2, 3] and _names(out) == ["step-0000002"]
    for stale in (".tmp-step-0000004", ".trash-step-0000001"):
        (out / "checkpoints" / stale).mkdir()
        (out / "checkpoints" / stale / "state.json").write_text("{}")
    distill(_cfg(tiny_base, out, max_steps=4, checkpoint_every=2, resume="latest"))
    assert _log_steps(out) == [1, 2, 3, 4]
    assert _losses(out) == _losses(full)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    a = load_file(str(full / "checkpoints/step-0000004/online.safetensors"))
    b = load_file(str(out / "checkpoints/step-0000004/online.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncate_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6, "lo')
    assert ckpt.truncate_log(log, 3) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    ckpt.truncate_log(log, 0)
    assert not log.exists()


# ----------------------------------------------------------------------------------- disk safety

def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced descriptors")
def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), rename(a, b))[1])
    _Tiny().save(tmp_path, 5)
    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step-0000005"
    at = events.index(("rename", str(tmp), str(root / "step-0000005")))
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert {os.path.realpath(tmp / name) for name in CHECKPOINT_FILES} | {os.path.realpath(tmp)} <= synced_before
    assert ("fsync", os.path.realpath(root)) in events[at:]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["save_file", "torch.save"])
def test_disk_full_is_named_and_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch, where):
    t = _Tiny()
    t.save(tmp_path, 1)
    before = {name: (tmp_path / "checkpoints/step-0000001" / name).read_bytes() for name in CHECKPOINT_FILES}
    if where == "save_file":
        real = ckpt.save_file

        def partial(tensors, path):  # writes the first file, then the disk is full
            if path.endswith("ema.safetensors"):
                _enospc()
            real(tensors, path)
        monkeypatch.setattr(ckpt, "save_file", partial)
    else:
        monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises(OSError) as err:
        t.save(tmp_path, 2)
    assert err.value.errno == errno.ENOSPC
    text = str(err.value)
    assert str(tmp_path / "checkpoints") in text and "step 2" in text and "MB" in text and "step-0000001" in text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]
    assert {name: (tmp_path / "checkpoints/step-0000001" / name).read_bytes() for name in CHECKPOINT_FILES} == before


def test_a_torch_write_failure_on_a_full_disk_is_reported_as_disk_full(tmp_path, monkeypatch):
    def stream_error(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", stream_error)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 10))
    with pytest.raises(OSError, match="disk full") as err:
        _Tiny().save(tmp_path, 1)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", stream_error)  # with room left it is another error: not disguised
    with pytest.raises(RuntimeError, match="basic_ios"):
        _Tiny().save(tmp_path, 1)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_disk_full_in_a_run_then_resume(tiny_base, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = torch.save

    def full_at_step_4(obj, path, *args, **kwargs):
        if "0000004" in str(path):
            _enospc()
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_4)
    with pytest.raises(OSError, match=r"disk full while writing the checkpoint of step 4"):
        distill(_cfg(tiny_base, out, max_steps=6, checkpoint_every=2))
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    distill(_cfg(tiny_base, out, max_steps=6, checkpoint_every=2, resume="latest"))
    assert _names(out) == ["step-0000004", "step-0000006"] and _log_steps(out) == list(range(1, 7))


def test_a_kill_during_pruning_never_leaves_a_listed_checkpoint_without_weights(tmp_path, monkeypatch):
    t = _Tiny()
    for step in (1, 2):
        t.save(tmp_path, step)
    real = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes the weights, then the process dies
        os.remove(os.path.join(path, "online.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        t.save(tmp_path, 3)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert _names(tmp_path) == ["step-0000002", "step-0000003"]
    assert (tmp_path / "checkpoints/.trash-step-0000001").is_dir()
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoints/step-0000003"
    reset_run_to(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_incomplete_folders_are_not_checkpoints(tmp_path):
    t = _Tiny()
    good = t.save(tmp_path, 1)
    half = tmp_path / "checkpoints/step-0000002"
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"step": 2}))
    assert list_checkpoints(tmp_path) == [good]
    assert resolve_resume(tmp_path, "latest") == good
    with pytest.raises(FileNotFoundError, match="incomplete .*online.safetensors"):
        resolve_resume(tmp_path, str(half))
