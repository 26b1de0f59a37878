"""The command line: ``condistill train CONDITION``, ``condistill eval``, ``python -m condistill`` and the recipes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from condistill.cli import config_from_args, main
from condistill.presets import RECIPES, presets_for

ROOT = Path(__file__).resolve().parents[1]


def test_train_without_condition_prints_usage(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "usage: condistill train {edge,depth,sr,inpaint,none,paired,segmentation}" in err
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for condition in RECIPES:
        assert f"  {condition}" in out


def test_unknown_condition_and_command_are_refused(capsys):
    assert main(["train", "canny"]) == 2
    assert "unknown condition 'canny'" in capsys.readouterr().err
    assert main(["fit"]) == 2
    assert "unknown command 'fit'" in capsys.readouterr().err


def test_train_help_lists_presets(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "sr", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: condistill train sr")
    assert "cpu-demo" in out and "sd15-gpu" in out and "--ema-decay-late" in out


def test_options_override_the_preset_which_overrides_defaults():
    cfg = config_from_args("sr", ["--max-steps", "7", "--adapter", "lora"])
    preset = presets_for("sr")["cpu-demo"]
    assert (cfg.condition, cfg.max_steps, cfg.adapter) == ("sr", 7, "lora")
    assert (cfg.ema_decay_late, cfg.ema_late_from, cfg.batch_size) == (preset["ema_decay_late"], 1600, 16)
    gpu = config_from_args("edge", ["--preset", "sd15-gpu", "--data", "some/dataset"])
    assert gpu.base == "stable-diffusion-v1-5/stable-diffusion-v1-5" and gpu.guidance_max == 4.0


def test_all_config_problems_are_reported_together_on_one_line_with_status_1(capsys):
    with pytest.raises(SystemExit) as info:
        config_from_args("edge", ["--max-steps", "0", "--ema-decay", "1.5"], prog="condistill train edge")
    assert info.value.code == 1  # the command line parsed; its values are refused
    # the options as typed on the command line (the Python form, max_steps=0, is for DistillConfig callers)
    assert capsys.readouterr().err == ("condistill train edge: error: 2 problems: (1) --max-steps 0: must be at "
                                       "least 1; (2) --ema-decay 1.5: must be in [0, 1)\n")


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "condistill", "train", "depth", "--max-steps", "0"],
    [sys.executable, str(ROOT / "recipes" / "depth.py"), "--max-steps", "0"],
])
def test_module_entry_and_recipe_script_share_the_command(command, tmp_path):
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "condistill train depth: error: --max-steps 0: must be at least 1\n"


def test_a_run_error_is_one_line_without_traceback(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["train", "edge", "--output-dir", str(blocker / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("condistill train edge: error: --output-dir") and "is a file, not a folder" in err
    assert "Traceback" not in err


def test_eval_help_documents_every_option_once(capsys):
    from condistill.evaluation.command import eval_parser as _eval_parser

    parser = _eval_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    assert parser.get_default("guidance") == 4.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "[4.0]" in out and "(default:" not in out


def test_top_level_help_lists_every_command_and_presets_name_their_folder(capsys):
    from condistill.cli import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: condistill [--debug] {" + ",".join(COMMANDS) + "}")
    assert "CONDISTILL_DEBUG=1" in out
    assert {"train", "eval", "export", "push"} <= set(COMMANDS)
    for condition in RECIPES:  # segmentation (the embedded scenes' masks) and none have CPU presets only
        if "sd15-gpu" in presets_for(condition):
            assert config_from_args(condition, ["--preset", "sd15-gpu"]).output_dir == f"runs/{condition}-sd15"
        assert config_from_args(condition, []).output_dir == ("runs/lcm-lora" if condition == "none"
                                                              else f"runs/{condition}")
