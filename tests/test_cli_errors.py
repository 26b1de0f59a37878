"""Bad input ends every command in one line and status 1, checked before any model loads; ``--debug`` or
``CONDISTILL_DEBUG=1`` shows the traceback; an unexpected error is a bug with its traceback and a report hint."""
from __future__ import annotations

import json

import pytest

from condistill.cli import main

TRACEBACK_HINT = "(--debug or CONDISTILL_DEBUG=1 shows the traceback)"


@pytest.fixture
def no_model(monkeypatch):
    """Loading the base (in training, caching or evaluation) fails the test: the check must come first."""
    import condistill.data.cache_writer as cache_writer
    import condistill.evaluation.evaluate as evaluate
    import condistill.training.loop as loop

    def load_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the error")

    for module in (loop, cache_writer, evaluate):
        monkeypatch.setattr(module, "load_base", load_base, raising=False)
    monkeypatch.delenv("CONDISTILL_DEBUG", raising=False)


@pytest.fixture
def saved_dataset(tmp_path):
    """A two-row datasets save_to_disk folder with the columns image and text."""
    import datasets
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [image, image], "text": ["a", "b"]}).save_to_disk(str(folder))
    return folder


def _status(argv) -> int:
    """The status of ``condistill ARGV`` (a parser exits, a command returns)."""
    try:
        return main(argv)
    except SystemExit as info:
        return info.code


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("condistill: ")]  # the run's own log lines
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err and "AssertionError" not in err
    return lines[0]


# ---------------------------------------------------------------------- train
@pytest.mark.parametrize("options, message", [
    (["--weight-decay", "-5"], "--weight-decay -5.0: must be 0 or more"),
    (["--distance", "huber", "--huber-c", "-1"], "--huber-c -1.0: must be positive"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be 0 or more (0 disables gradient clipping)"),
    (["--seed", "-1"], "--seed -1: must be between 0 and 2**32 - 1"),
    (["--resolution", "20"], "--resolution 20: this base"),
    (["--loss", "codi+dmd", "--dmd-start-timestep", "5000"],
     "--dmd-start-timestep 5000: not a timestep of the training grid of this base (1000 training timesteps, "
     "--num-grid 50: 19, 39, ..., 999); the nearest are 979 and 999"),
    (["--loss", "codi+dmd", "--dmd-start-timestep", "500"], "the nearest are 499 and 519"),
    (["--num-grid", "30"], "--num-grid 30 does not divide num_train_timesteps=1000"),
    (["--data", "synthetic:train:0"], "--data synthetic:train:0: size must be a positive int"),
    (["--data", "synthetic", "--data-options", '{"size": "x"}'], """--data synthetic --data-options {"size": "x"}"""),
    (["--data", "synthetic", "--data-options", '{"bogus": 1}'], "does not accept option(s) ['bogus']"),
    (["--adapter-options", '{"bogus": 1}'], "--adapter-options: the controlnet adapter has no option 'bogus'"),
    (["--adapter-options", '{"unet": 1}'], "--adapter-options: 'unet' is set by condistill, not an option"),
    (["--adapter-options", '{"condition_channels": 4}'], "'condition_channels' is set by condistill"),
    (["--adapter", "lora", "--adapter-options", '{"rank": "8"}'],
     """--adapter-options: rank of the lora adapter takes an integer, got "8\""""),
    (["--adapter", "lora", "--adapter-options", '{"targets": 5}'], "takes a string or a list of strings, got 5"),
    (["--adapter-options", '{"conditioning_embedding_out_channels": 16}'], "takes a list of integers or null, got 16"),
    (["--condition-options", '{"low_threshold": "x"}'], """--condition-options {"low_threshold": "x"}: low_threshold"""),
    (["--condition-options", '{"bogus": 1}'], "Unknown option(s) 'bogus' for condition 'edge'"),
])
def test_train_refuses_bad_input_in_one_line_before_the_base_loads(options, message, no_model, tmp_path, capsys):
    run = tmp_path / "run"
    assert _status(["train", "edge", "--max-steps", "1", "--output-dir", str(run), *options]) == 1
    assert message in _one_line_error(capsys, "condistill train edge")
    assert not run.exists()


def test_train_refuses_a_missing_datasets_column_in_one_line(saved_dataset, no_model, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "edge", "--output-dir", str(run), "--data", str(saved_dataset)]
    assert main([*argv, "--data-options", '{"image_column": "img"}']) == 1
    line = _one_line_error(capsys, "condistill train edge")
    assert f"""--data {saved_dataset} --data-options {{"image_column": "img"}}: """ in line
    assert "has no column 'img' (image_column); available columns: ['image', 'text']" in line
    assert main([*argv, "--data-options", '{"caption_column": "caption"}']) == 1
    assert "has no column 'caption'" in _one_line_error(capsys, "condistill train edge")
    assert not run.exists()


def test_train_refuses_an_output_folder_under_a_file(no_model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", "edge", "--output-dir", str(tmp_path / "afile" / "run")]) == 1
    assert "is a file, not a folder" in _one_line_error(capsys, "condistill train edge")


def test_max_grad_norm_zero_disables_clipping_and_says_so(capsys):
    from condistill.config import DistillConfig

    assert DistillConfig(max_grad_norm=0).max_grad_norm == 0
    with pytest.raises(SystemExit):
        main(["train", "edge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(0 disables clipping; negative values are refused)" in help_text


@pytest.fixture
def fake_distill(monkeypatch, tmp_path):
    """The run itself replaced: what the command does before and after it."""
    import condistill.training.loop as loop

    monkeypatch.setattr(loop, "distill", lambda cfg: tmp_path / "run")
    monkeypatch.delenv("CONDISTILL_DEBUG", raising=False)


def test_a_warm_up_longer_than_the_run_is_said_in_one_line_at_the_start(fake_distill, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "run")]
    assert main(["train", "edge", "--max-steps", "10", "--lr-warmup-steps", "40", "--learning-rate", "2e-4", *out]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("condistill train edge: warning: --lr-warmup-steps 40 is not shorter than the run (--max-steps "
                      "10): the learning rate rises only to 22% of --learning-rate 0.0002; pass a shorter "
                      "--lr-warmup-steps (0 for none) to train at the full rate")
    assert err[1].startswith("adapter written to")
    for warmup in ("9", "0"):
        assert main(["train", "edge", "--max-steps", "10", "--lr-warmup-steps", warmup, *out]) == 0
        assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------- the debug switch and bugs
def _failing_run(monkeypatch, error: BaseException):
    import condistill.training.loop as loop

    def distill(cfg):
        raise error

    monkeypatch.setattr(loop, "distill", distill)


def test_debug_shows_the_traceback_of_a_refused_input(fake_distill, monkeypatch, tmp_path, capsys):
    argv = ["train", "edge", "--output-dir", str(tmp_path / "run"), "--weight-decay", "1"]
    _failing_run(monkeypatch, OSError("the disk is full"))
    assert main(argv) == 1
    assert capsys.readouterr().err == "condistill train edge: error: the disk is full\n"
    with pytest.raises(OSError, match="the disk is full"):
        main([*argv, "--debug"])
    with pytest.raises(OSError, match="the disk is full"):
        main(["--debug", *argv])
    monkeypatch.setenv("CONDISTILL_DEBUG", "1")
    with pytest.raises(OSError, match="the disk is full"):
        main(argv)


def test_an_unexpected_error_shows_its_traceback_and_asks_for_a_report(fake_distill, monkeypatch, tmp_path, capsys):
    _failing_run(monkeypatch, TypeError("unsupported operand"))
    assert main(["train", "edge", "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "TypeError: unsupported operand" in err
    assert err.splitlines()[-1] == ("condistill train edge: internal error (TypeError); this is a bug in condistill: "
                                    "please report it with the command line and the traceback above")


def test_a_library_value_error_names_where_it_came_from(fake_distill, monkeypatch, tmp_path, capsys):
    import torch

    def distill(cfg):
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], weight_decay=-5.0)

    import condistill.training.loop as loop

    monkeypatch.setattr(loop, "distill", distill)
    assert main(["train", "edge", "--output-dir", str(tmp_path / "run")]) == 1
    line = _one_line_error(capsys, "condistill train edge")
    assert line.startswith("condistill train edge: error: ValueError from torch.optim.")
    assert "Invalid weight_decay value: -5.0" in line and line.endswith(TRACEBACK_HINT)


def test_ctrl_c_is_one_line_with_status_130(fake_distill, monkeypatch, tmp_path, capsys):
    _failing_run(monkeypatch, KeyboardInterrupt())
    assert main(["train", "edge", "--output-dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "condistill train edge: interrupted\n"


def test_every_command_takes_the_debug_flag():
    from condistill.cli import _cache_parser, _export_parser, build_parser
    from condistill.evaluation.command import eval_parser as _eval_parser
    from condistill.presets import presets_for, recipe_description

    parsers = [build_parser("edge", presets_for("edge"), recipe_description("edge")), _eval_parser(),
               _export_parser(), _cache_parser()]
    for parser in parsers:
        assert any(action.option_strings == ["--debug"] for action in parser._actions), parser.prog


# ---------------------------------------------------------------------- eval, export, cache
def test_eval_refuses_a_student_that_is_no_export(no_model, tmp_path, capsys):
    assert main(["eval", "--condition", "edge", "--student", str(tmp_path / "nope")]) == 1
    line = _one_line_error(capsys, "condistill eval")
    assert line.startswith(f"condistill eval: error: --student {tmp_path / 'nope'}: No condistill_config.json in")


@pytest.mark.parametrize("options, message", [
    (["--num-images", "0"], "--num-images 0: must be at least 1"),
    (["--batch-size", "-1"], "--batch-size -1: must be at least 1"),
    (["--seed", "-2"], "--seed -2: must be 0 or more"),
    (["--device", "gpu"], "--device gpu: not a torch device"),
    (["--row", "t=teacher:ddim:abc"], "row 't': STEPS 'abc' is not an integer"),
    (["--row", "t=teacher:ddim:4:x"], "row 't': GUIDANCE 'x' is not a number"),
    (["--row", "t=teacher:ddim:0"], "row 't': STEPS 0 must be at least 1"),
    (["--row", "t=teacher", "--prompts", "a cat"], "--prompts needs --data"),
])
def test_eval_refuses_bad_options_in_one_line(options, message, no_model, capsys):
    argv = ["eval", "--condition", "edge", "--base", "embedded:tiny-teacher", *options]
    if "--row" not in options:
        argv += ["--row", "t=teacher"]
    assert main(argv) == 1
    assert message in _one_line_error(capsys, "condistill eval")


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_eval_checks_its_output_folders_before_it_starts(flag, no_model, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    argv = ["eval", "--condition", "edge", "--row", "t=teacher", "--base", "embedded:tiny-teacher"]
    assert main([*argv, flag, str(blocker)]) == 1
    assert f"{flag} {blocker} is a file, not a folder" in _one_line_error(capsys, "condistill eval")
    assert main([*argv, flag, str(blocker / "below")]) == 1
    assert f"{blocker} is a file, not a folder, so nothing can be written below it" in _one_line_error(
        capsys, "condistill eval")


def test_eval_refuses_a_missing_judge_before_the_base_loads(no_model, tmp_path, capsys):
    argv = ["eval", "--condition", "edge", "--row", "t=teacher", "--base", "embedded:tiny-teacher", "--num-images", "2"]
    assert main([*argv, "--judge", str(tmp_path / "no-judge")]) == 1
    assert "judge" in _one_line_error(capsys, "condistill eval")


def test_an_unwritable_output_is_refused_before_the_work(monkeypatch, tmp_path, capsys):
    import condistill.cli_parsing as checks
    from condistill.cli_parsing import check_output

    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)  # root may write anywhere: say it may not
    with pytest.raises(PermissionError, match=f"--out {tmp_path / 'x.safetensors'}: no permission to write in "):
        check_output(tmp_path / "x.safetensors", "--out")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output(tmp_path, "--out", "file")


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_export_checks_out_before_it_reads_the_run(where, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "x.safetensors" if where == "under a file" else tmp_path
    assert main(["export", str(tmp_path / "no-run"), "--format", "kohya", "--out", str(out)]) == 1
    line = _one_line_error(capsys, "condistill export")
    assert line.startswith(f"condistill export: error: --out {out}")
    assert ("is a file, not a folder" if where == "under a file" else "is a folder") in line


@pytest.mark.parametrize("options, message", [
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--shard-size", "0"], "--shard-size 0: must be at least 1"),
    (["--resolution", "20"], "--resolution 20: this base"),
    (["--condition-options", '{"low_treshold": 3}'], """--condition-options {"low_treshold": 3}: Unknown option"""),
    (["--data-options", '{"size": 2}'], """--data synthetic:train:4 --data-options {"size": 2}: size is given twice"""),
])
def test_cache_refuses_bad_input_before_the_base_loads(options, message, no_model, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache", "--condition", "edge", "--data", "synthetic:train:4", "--out", str(out), *options]) == 1
    assert message in _one_line_error(capsys, "condistill cache")
    assert not out.exists()


def test_cache_refuses_an_out_under_a_file_and_a_missing_column(saved_dataset, no_model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["cache", "--condition", "edge", "--data", str(saved_dataset)]
    assert main([*argv, "--out", str(tmp_path / "afile" / "cache")]) == 1
    assert "is a file, not a folder" in _one_line_error(capsys, "condistill cache")
    assert main([*argv, "--out", str(tmp_path / "c"), "--data-options", json.dumps({"image_column": "x"})]) == 1
    assert "has no column 'x' (image_column)" in _one_line_error(capsys, "condistill cache")


# ---------------------------------------------------------------------- cache --verify
def test_cache_verify_checks_every_shard_in_one_line(tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache", "--condition", "sr", "--data", "synthetic:train:4", "--out", str(out), "--resolution", "32",
                 "--shard-size", "2", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["cache", "--verify", str(out)]) == 0
    assert "2 shard(s), 4 items verified" in capsys.readouterr().err
    shard = sorted(out.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\xff" * 8  # damage the last values of the second shard
    shard.write_bytes(bytes(data))
    assert main(["cache", "--verify", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"condistill cache: error: the latent cache {str(out)!r} is damaged: ")
    assert shard.name in err[-1] and "--overwrite" in err[-1]


def test_cache_verify_refuses_what_is_no_cache(tmp_path, capsys):
    assert main(["cache", "--verify", str(tmp_path / "none")]) == 1
    assert _one_line_error(capsys, "condistill cache") == f"condistill cache: error: --verify {tmp_path / 'none'}: " \
                                                          "no such cache folder"
    assert main(["cache", "--verify", str(tmp_path)]) == 1
    assert "is not a condistill latent cache" in _one_line_error(capsys, "condistill cache")


@pytest.mark.parametrize("argv, line", [
    (["cache", "--verify", "c", "--out", "o"], "condistill cache: error: --verify DIR checks an existing cache; it "
                                               "takes no --out (to build a cache, leave --verify out)"),
    (["cache", "--data", "d"], "condistill cache: error: the following arguments are required: --condition, --out "
                               "(or --verify DIR to check a cache)"),
])
def test_cache_verify_or_build_is_a_usage_error_with_status_2(argv, line, capsys):
    assert _status(argv) == 2
    assert capsys.readouterr().err == line + "\n"


def test_the_readme_documents_the_statuses_and_the_debug_switch(capsys):
    from pathlib import Path

    def text(name):
        return " ".join((Path(__file__).resolve().parents[1] / name).read_text().split())

    documented = {"README.md": ("exit with status 1", "`--debug` shows the traceback", "`condistill cache --verify",
                                "completed by running the same command again"),
                  "docs/runs.md": ("Status 2 means the command line itself does not parse",
                                   "`--debug` (or `CONDISTILL_DEBUG=1`"),
                  "docs/export-format.md": ("completed by running the same command again, without `--overwrite`",)}
    for name, phrases in documented.items():
        for words in phrases:
            assert words in text(name), (name, words)
    assert main(["--help"]) == 0
    assert "--debug: show the full traceback of an error instead of one line (also CONDISTILL_DEBUG=1)" in \
        capsys.readouterr().out


def test_out_of_gpu_memory_is_one_line_not_a_bug_report(fake_distill, monkeypatch, tmp_path, capsys):
    import torch

    _failing_run(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert main(["train", "edge", "--output-dir", str(tmp_path / "run")]) == 1
    line = _one_line_error(capsys, "condistill train edge")
    assert "CUDA out of memory. Tried to allocate 2.00 GiB more" in line and line.endswith(TRACEBACK_HINT)


def test_condistills_warnings_are_one_line(capsys):
    import warnings

    from condistill.cli_parsing import guarded

    def command():
        warnings.warn("the adapter has no checksums; re-export it", stacklevel=2)
        return 0

    assert guarded("condistill push", command) == 0
    assert capsys.readouterr().err == "condistill push: warning: the adapter has no checksums; re-export it\n"
