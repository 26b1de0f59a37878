"""``condistill train CONDITION --help``: the chosen preset's real defaults and every enumerated option's choices."""
from __future__ import annotations

import re

import pytest

from condistill.cli import config_from_args, main
from condistill.config import CHOICES, ConfigError, DistillConfig
from condistill.presets import SD15, presets_for


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out)  # argparse wraps lines


def test_help_shows_the_default_presets_values(capsys):
    out = _help(capsys, ["train", "edge", "--help"])
    assert "(default: None)" not in out
    demo = presets_for("edge")["cpu-demo"]
    assert f"(default: {demo['max_steps']})" in out and "--batch-size BATCH_SIZE images per optimizer step" in out
    assert "(default: 16)" in out  # the preset's batch size, not the dataclass's 32
    assert "(default: embedded:tiny-teacher)" in out and "(default: runs/edge)" in out
    assert "--report-to {tensorboard,wandb,none}" in out and "(default: tensorboard)" in out
    assert "(default: cpu-demo)" in out and "the defaults below are those of cpu-demo" in out


def test_help_shows_the_defaults_of_the_preset_on_the_command_line(capsys):
    out = _help(capsys, ["train", "edge", "--preset", "sd15-gpu", "--help"])
    assert "the defaults below are those of sd15-gpu" in out
    for shown in ("(default: 10000)", "(default: fp16)", "(default: 1e-05)", "(default: 512)", "(default: 4.0)",
                  '(default: {"low_threshold": 100, "high_threshold": 200})'):
        assert shown in out, shown
    assert f"(default: {SD15})" in out.replace("- ", "-")  # the SD 1.5 hub id (argparse wraps at its hyphens)
    out = _help(capsys, ["train", "edge", "--help", "--preset=sd15-gpu"])  # either order, either spelling
    assert "(default: 10000)" in out


def test_help_lists_the_choices_of_every_enumerated_option(capsys):
    out = _help(capsys, ["train", "depth", "--help"])
    assert "--adapter {controlnet,controlnet_lora,lcm_lora,lora,t2i_adapter}" in out
    for name, allowed in CHOICES.items():
        assert f"--{name.replace('_', '-')} {{{','.join(allowed)}}}" in out, name
    assert "--gradient-checkpointing {true,false}" in out and "--condition-options JSON" in out
    assert "--validation-images IMAGE [IMAGE ...]" in out and "--validation-prompts PROMPT [PROMPT ...]" in out


def test_a_value_outside_the_choices_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        config_from_args("edge", ["--distance", "l1"], prog="condistill train edge")
    assert info.value.code == 2
    assert "invalid choice: 'l1'" in capsys.readouterr().err


def test_explicit_options_still_win_over_the_preset_even_at_the_dataclass_default():
    cfg = config_from_args("edge", ["--preset", "sd15-gpu", "--mixed-precision", "no", "--gradient-checkpointing",
                                    "false", "--batch-size", "32"])
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.batch_size) == ("no", False, 32)
    defaulted = config_from_args("edge", ["--preset", "sd15-gpu"])
    assert (defaulted.mixed_precision, defaulted.gradient_checkpointing, defaulted.batch_size) == ("fp16", True, 8)
    assert defaulted.report_to == "tensorboard" and defaulted.validation_images == []


def test_report_to_none_and_tensorboard_parse():
    assert config_from_args("edge", ["--report-to", "none"]).report_to == "none"
    assert config_from_args("edge", ["--report-to", "tensorboard"]).report_to == "tensorboard"


def test_report_to_wandb_without_the_package_fails_at_validation(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install wandb.*--report-to tensorboard or none"):
        DistillConfig(report_to="wandb")
    with pytest.raises(SystemExit) as info:  # the command stops before any model or data is touched
        config_from_args("edge", ["--report-to", "wandb", "--base", "/no/such/base"], prog="condistill train edge")
    assert info.value.code == 1 and "pip install wandb" in capsys.readouterr().err


def test_report_to_wandb_is_accepted_when_the_package_is_there(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    assert DistillConfig(report_to="wandb").report_to == "wandb"


def test_validation_options_from_the_command_line(tmp_path):
    from PIL import Image

    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for path in paths:
        Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    cfg = config_from_args("edge", ["--validation-images", *paths, "--validation-prompts", "a red cube"])
    assert cfg.validation_images == paths and cfg.validation_prompts == ["a red cube"]
