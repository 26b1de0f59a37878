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
    before = (out / "adapter" / "condistill_config.json").read_bytes()
    for resume in (None, "latest"):
        with pytest.raises(FileExistsError, match="finished adapter export .* --overwrite"):
            distill(_cfg(tiny_base, out, resume=resume))
    assert (out / "adapter" / "condistill_config.json").read_bytes() == before
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
    exported = load_file(str(out / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ResumeMismatchError, match="max_steps=2 is below the checkpoint's step 3"):
        distill(_cfg(tiny_base, out, max_steps=2, resume="latest"))
    again = load_file(str(out / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    assert json.loads((out / "adapter" / "condistill_config.json").read_text())["extra"]["steps_trained"] == 3


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


def test_an_option_the_checkpoint_predates_counts_as_its_default(tmp_path):
    """A checkpoint written before an option existed trained with its default: switching it on is a change."""
    saved = DistillConfig(output_dir=str(tmp_path), max_steps=10, loss="codi+dmd").to_dict()
    saved.pop("dmd_backward_steps")
    same = DistillConfig(output_dir=str(tmp_path), max_steps=10, loss="codi+dmd")
    assert resume_changes(saved, same, 5) == []
    with pytest.raises(ResumeMismatchError, match="dmd_backward_steps: 0 -> 4"):
        resume_changes(saved, DistillConfig(output_dir=str(tmp_path), max_steps=10, loss="codi+dmd",
                                            dmd_backward_steps=4), 5)


def test_optimizer_cannot_change_on_resume_and_tf32_can(tmp_path):
    saved = DistillConfig(output_dir=str(tmp_path), max_steps=10).to_dict()
    assert resume_changes(saved, DistillConfig(output_dir=str(tmp_path), max_steps=10, allow_tf32=True), 5) == [
        "allow_tf32: False -> True"]
    with pytest.raises(ResumeMismatchError, match="optimizer: 'adamw8bit' -> 'adamw'"):
        resume_changes({**saved, "optimizer": "adamw8bit"}, DistillConfig(output_dir=str(tmp_path), max_steps=10), 5)


# ------------------------------------------------------------------------------ nothing lost

def _listing(out):
    return sorted(str(p.relative_to(out)) + ("" if p.is_dir() else f":{p.stat().st_size}") for p in out.rglob("*")
                  if "validation" not in p.parts and "logs" not in p.parts)


def test_resuming_from_an_older_checkpoint_needs_overwrite_and_says_how_to_keep_the_rest(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run", max_steps=6, checkpoint_every=2, keep_checkpoints=3))
    older = out / "checkpoints" / "step-0000002"
    before, log = _listing(out), (out / "loss.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=r"would delete the later checkpoints step-0000004, step-0000006; the "
                       r"lines of .*loss.jsonl after step 2; the finished export of step 6 .*--overwrite.*"
                       r"--resume .*step-0000002 --output-dir <new folder>"):
        distill(_cfg(tiny_base, out, max_steps=6, checkpoint_every=2, keep_checkpoints=3, resume=str(older)))
    assert _listing(out) == before and (out / "loss.jsonl").read_bytes() == log
    # the way the message offers: continue from that checkpoint in a new folder, the run stays whole
    branch = distill(_cfg(tiny_base, tmp_path / "branch", max_steps=4, resume=str(older)))
    assert [json.loads(line)["step"] for line in (branch / "loss.jsonl").read_text().splitlines()] == [3, 4]
    assert _listing(out) == before
    # continuing forward from the newest checkpoint needs nothing; the export is replaced whole
    distill(_cfg(tiny_base, out, max_steps=8, checkpoint_every=2, keep_checkpoints=3, resume="latest"))
    assert json.loads((out / "adapter" / "condistill_config.json").read_text())["extra"]["steps_trained"] == 8
    # with --overwrite the older point is taken, as asked
    distill(_cfg(tiny_base, out, max_steps=6, checkpoint_every=2, keep_checkpoints=3, resume=str(out / "checkpoints" / "step-0000004"),
                 overwrite=True))
    assert [p.name for p in (out / "checkpoints").iterdir()] and json.loads(
        (out / "adapter" / "condistill_config.json").read_text())["extra"]["steps_trained"] == 6


def test_an_interrupted_export_leaves_the_previous_one_whole(tiny_base, tmp_path, monkeypatch):
    import condistill.publish.card as card

    out = distill(_cfg(tiny_base, tmp_path / "run"))
    before = {p.relative_to(out / "adapter"): p.read_bytes() for p in (out / "adapter").rglob("*") if p.is_file()}

    def killed(*args, **kwargs):  # the new weights and config are written, the card is not
        raise KeyboardInterrupt

    monkeypatch.setattr(card, "write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(tiny_base, out, max_steps=3, resume="latest"))
    after = {p.relative_to(out / "adapter"): p.read_bytes() for p in (out / "adapter").rglob("*") if p.is_file()}
    assert after == before  # the step-2 export, untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-adapter")]
    monkeypatch.undo()
    # a kill (no clean-up) leaves a staging folder; one between the two renames leaves only .old-adapter
    (out / ".tmp-adapter-999999999").mkdir()
    (out / "adapter").rename(out / ".old-adapter")
    distill(_cfg(tiny_base, out, max_steps=3, resume="latest"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert json.loads((out / "adapter" / "condistill_config.json").read_text())["extra"]["steps_trained"] == 3


def test_a_run_with_its_export_at_the_root_moves_it_to_adapter(tiny_base, tmp_path):
    """Runs written before the export moved to adapter/ continue; their root export is replaced, not left stale."""
    import shutil

    from condistill import load_adapter

    out = distill(_cfg(tiny_base, tmp_path / "run"))
    for p in (out / "adapter").iterdir():
        shutil.move(str(p), str(out / p.name))
    (out / "adapter").rmdir()
    assert load_adapter(out).condistill_config["extra"]["steps_trained"] == 2
    distill(_cfg(tiny_base, out, max_steps=3, resume="latest"))
    root = {p.name for p in out.iterdir()}
    assert "adapter" in root and not root & {"condistill_config.json", "controlnet", "scheduler", "README.md", "samples.png"}
    assert load_adapter(out).condistill_config["extra"]["steps_trained"] == 3


def test_an_option_set_to_the_value_its_default_stands_for_is_no_change(tiny_base):
    saved = _cfg(tiny_base, "run").to_dict()  # resolution 0: the base's native 16 px
    assert resume_changes(saved, _cfg(tiny_base, "run", resolution=16), step=2) == []
    with pytest.raises(ResumeMismatchError, match="resolution: 0 -> 32"):
        resume_changes(saved, _cfg(tiny_base, "run", resolution=32), step=2)


def test_checkpoint_and_export_files_are_readable_by_others(tiny_base, tmp_path):
    old = os.umask(0o022)
    try:
        out = distill(_cfg(tiny_base, tmp_path / "run"))
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt", ".json")]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_resuming_onto_changed_data_is_refused_with_the_difference(tiny_base, tmp_path, capsys):
    from condistill.world.scenes import generate_scene

    data = tmp_path / "images"
    data.mkdir()
    for i in range(20):
        generate_scene(i, "train").image.save(data / f"{i:02d}.png")
    grown = [data / f"{i:02d}.png" for i in range(16, 20)]
    for path in grown:  # 16 images when the run starts ...
        path.rename(tmp_path / path.name)
    out = distill(_cfg(tiny_base, tmp_path / "run", data=str(data), checkpoint_every=1))
    for path in grown:  # ... 20 when it is resumed
        (tmp_path / path.name).rename(path)
    with pytest.raises(ResumeMismatchError, match=r"the data changed since it was written \(.*images: 4 files added "
                                                  r"\(16.png, 17.png, 18.png, \.\.\.\)"):
        distill(_cfg(tiny_base, out, data=str(data), max_steps=3, resume="latest"))
    for path in grown:
        path.unlink()
    distill(_cfg(tiny_base, out, data=str(data), max_steps=3, resume="latest"))  # the same 16: resumes


def test_another_runs_checkpoint_is_not_continued_into_a_run_folder(tiny_base, tmp_path):
    other = distill(_cfg(tiny_base, tmp_path / "other", checkpoint_every=1))
    out = distill(_cfg(tiny_base, tmp_path / "run", seed=7))
    before = _listing(out)
    with pytest.raises(FileExistsError, match=r"already holds another run; continuing the checkpoint .*other.* would "
                                              r"mix"):
        distill(_cfg(tiny_base, out, max_steps=3, resume=str(other / "checkpoints" / "step-0000001")))
    assert _listing(out) == before


def test_a_folder_with_files_no_run_wrote_is_refused(tiny_base, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')  # e.g. a model folder
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"holds files that are not a condistill run \(config.json \(not a "
                                              r"run's configuration\), notes.txt\)"):
        distill(_cfg(tiny_base, folder))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]
    assert (folder / "config.json").read_text() == '{"_class_name": "UNet2DConditionModel"}'


def test_running_a_finished_command_again_writes_nothing_and_keeps_the_cards_results(tiny_base, tmp_path, capsys):
    from condistill.publish.card import update_results

    out = distill(_cfg(tiny_base, tmp_path / "run", checkpoint_every=1))
    update_results(out, "| row | x |\n|---|---|\n| student-4 | 0.5 |", "condistill eval --condition edge")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    distill(_cfg(tiny_base, out, checkpoint_every=1, resume="latest"))
    assert "already finished at step 2" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a finished run resumed only to change a sampling option is exported again, its measured results kept
    distill(_cfg(tiny_base, out, checkpoint_every=1, resume="latest", recommended_steps=2))
    assert json.loads((out / "adapter" / "condistill_config.json").read_text())["recommended_steps"] == 2
    assert "| student-4 | 0.5 |" in (out / "adapter" / "README.md").read_text()


def test_the_same_data_folder_written_relative_or_absolute_is_no_change(tiny_base, tmp_path, monkeypatch):
    data = tmp_path / "images"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    saved = _cfg(tiny_base, "run", data=str(data)).to_dict()
    assert resume_changes(saved, _cfg(tiny_base, "run", data="images"), step=2) == []
