"""The run folder: no silent overwrite, one writer at a time, resume options checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from condistill.config import DistillConfig
from condistill.training.loop import distill
from condistill.training.run_folder import LOCK_NAME, ResumeMismatchError, RunLockedError, resume_changes, run_lock
from helpers import tiny_run_config as _cfg


def test_file_in_the_way_is_named(tiny_base, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
            distill(_cfg(tiny_base, out))
    assert blocker.read_text() == "x"


def test_finished_export_without_checkpoints_needs_overwrite(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run"))
    for ckpt in (out / "checkpoints").iterdir():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    before = (out / "condistill_config.json").read_bytes()
    for resume in (None, "latest"):
        with pytest.raises(FileExistsError, match="finished adapter export .* --overwrite"):
            distill(_cfg(tiny_base, out, resume=resume))
    assert (out / "condistill_config.json").read_bytes() == before
    distill(_cfg(tiny_base, out, overwrite=True))
    assert (out / "checkpoints" / "step-0000002").is_dir()


def test_a_second_writer_is_refused_and_a_stale_lock_is_cleared(tmp_path, capsys):
    with run_lock(tmp_path) as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    messages = []
    with run_lock(tmp_path, log=messages.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert messages and "stale lock" in messages[0]
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(RunLockedError, match="another-machine"):
        with run_lock(tmp_path):
            pass


def test_lock_is_released_when_the_run_fails(tiny_base, tmp_path, monkeypatch):
    import condistill.training.loop as loop

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(loop, "build_objective", boom)
    with pytest.raises(RuntimeError, match="injected"):
        distill(_cfg(tiny_base, tmp_path / "run"))
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_shortening_a_finished_run_is_refused(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run", max_steps=3))
    exported = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ResumeMismatchError, match="max_steps=2 is below the checkpoint's step 3"):
        distill(_cfg(tiny_base, out, max_steps=2, resume="latest"))
    again = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    assert json.loads((out / "condistill_config.json").read_text())["extra"]["steps_trained"] == 3


def test_changed_options_are_listed_and_refused(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run"))
    with pytest.raises(ResumeMismatchError, match=r"cannot change in a resumed run.*batch_size: 4 -> 8.*seed: 0 -> 1"):
        distill(_cfg(tiny_base, out, max_steps=3, batch_size=8, seed=1, resume="latest"))


def test_new_learning_rate_applies_from_the_resumed_step(tiny_base, tmp_path, capsys):
    out = distill(_cfg(tiny_base, tmp_path / "run", lr_warmup_steps=0, learning_rate=1e-3))
    capsys.readouterr()
    distill(_cfg(tiny_base, out, max_steps=4, lr_warmup_steps=0, learning_rate=5e-4, log_every=1, resume="latest"))
    assert "changed options: learning_rate: 0.001 -> 0.0005; max_steps: 2 -> 4\n" in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert lrs[-2:] == [5e-4, 5e-4]
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 5e-4


def test_resume_changes_ignores_unknown_keys_and_equal_bases(tmp_path):
    cfg = DistillConfig(output_dir=str(tmp_path), max_steps=10)
    saved = {**cfg.to_dict(), "base": "data/tiny-teacher", "an_old_option": 1}
    saved.pop("overwrite")
    assert resume_changes(saved, cfg, 5) == []
    assert resume_changes({**saved, "log_every": 99}, cfg, 5) == [f"log_every: 99 -> {cfg.log_every}"]


def test_unusable_data_fails_before_any_model_loads(tiny_base, tmp_path, monkeypatch):
    import condistill.training.loop as loop
    from condistill.data.skips import EmptySourceError
    from PIL import Image

    def no_models(*args, **kwargs):
        raise AssertionError("the base was loaded before the data was checked")

    monkeypatch.setattr(loop, "load_base", no_models)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError, match="--data '.*empty': folder .* contains no images"):
        distill(_cfg(tiny_base, tmp_path / "run", data=str(tmp_path / "empty")))
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.new("RGB", (2, 2)).save(small / f"{i}.png")
    with pytest.raises(EmptySourceError, match=r"--data .*all 3 items were skipped \(too_small=3\)"):
        distill(_cfg(tiny_base, tmp_path / "run", data=str(small)))


def test_another_process_count_must_keep_the_global_batch(tmp_path):
    saved = DistillConfig(output_dir=str(tmp_path), max_steps=10, batch_size=4).to_dict()
    one = DistillConfig(output_dir=str(tmp_path), max_steps=10, batch_size=8)
    assert resume_changes(saved, one, 5, processes=1, saved_processes=2) == [
        "batch_size: 4 -> 8 per process (2 -> 1 processes, the same global batch of 8)"]
    same_batch = DistillConfig(output_dir=str(tmp_path), max_steps=10, batch_size=4)
    with pytest.raises(ResumeMismatchError, match=r"2 process\(es\) x batch 4 = a global batch of 8 per micro-step, "
                                                  r"this run has 4 x 4 = 16.*--batch-size 2 on 4 process\(es\), or "
                                                  r"--batch-size 4 on 2 process\(es\)"):
        resume_changes(saved, same_batch, 5, processes=4, saved_processes=2)
    with pytest.raises(ResumeMismatchError, match=r"resume with --batch-size 4 on 2 process\(es\)"):
        resume_changes(saved, same_batch, 5, processes=3, saved_processes=2)  # 8 does not split into 3


def test_optimizer_cannot_change_on_resume_and_tf32_can(tmp_path):
    saved = DistillConfig(output_dir=str(tmp_path), max_steps=10).to_dict()
    assert resume_changes(saved, DistillConfig(output_dir=str(tmp_path), max_steps=10, allow_tf32=True), 5) == [
        "allow_tf32: False -> True"]
    with pytest.raises(ResumeMismatchError, match="optimizer: 'adamw8bit' -> 'adamw'"):
        resume_changes({**saved, "optimizer": "adamw8bit"}, DistillConfig(output_dir=str(tmp_path), max_steps=10), 5)
