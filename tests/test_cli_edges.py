"""The command line's edges: options spelt in full, one-line errors with a "did you mean", ``--overwrite`` as a
bare flag, options named as they are typed, and every check that needs no model made before one loads."""
from __future__ import annotations

import json

import pytest

from condistill.cli import _cache_parser, _export_parser, build_parser, chosen_preset, config_from_args, main
from condistill.evaluation.command import eval_parser as _eval_parser
from condistill.cli_parsing import cli_form
from condistill.presets import DEFAULT_PRESET, presets_for, recipe_description

MISSING_HUB_REPO = "someone/no-such-depth-weights"


def _exit(argv) -> int:
    """The exit status of ``condistill ARGV`` (parsers exit, commands return)."""
    try:
        return main(argv)
    except SystemExit as info:
        return info.code


@pytest.fixture
def no_model(monkeypatch):
    """Loading the base fails the test: what the test checks must come first."""
    import condistill.training.loop as loop

    def load_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the error")

    monkeypatch.setattr(loop, "load_base", load_base)


# ---------------------------------------------------------------------- no abbreviations
def test_every_parser_refuses_abbreviations(capsys):
    presets = presets_for("edge")
    parsers = [build_parser("edge", presets, recipe_description("edge"), prog="condistill train edge"),
               _eval_parser(), _export_parser(), _cache_parser()]
    assert all(parser.allow_abbrev is False for parser in parsers)
    # the pre-parser of --preset does not take --pre for it (the full parser then refuses --pre)
    assert chosen_preset(presets, ["--pre", "sd15-gpu"]) == DEFAULT_PRESET
    assert chosen_preset(presets, ["--preset", "sd15-gpu"]) == "sd15-gpu"
    assert chosen_preset(presets, ["--preset"]) == DEFAULT_PRESET  # no value: the full parser says so, with its prog
    assert _exit(["train", "edge", "--pre", "sd15-gpu"]) == 2
    assert _exit(["push", "run", "org/name", "--priv"]) == 2  # not taken as --private: nothing is pushed
    assert capsys.readouterr().err.count("unrecognized option") == 2


# ---------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("argv, line", [
    (["train", "edge", "--max-step", "10"],
     "condistill train edge: error: unrecognized option --max-step; did you mean --max-steps? "
     "(condistill train edge --help lists every option)"),
    (["train", "edge", "--max-step=10"],
     "condistill train edge: error: unrecognized option --max-step; did you mean --max-steps? "
     "(condistill train edge --help lists every option)"),
    (["train", "edge", "--frobnicate", "1"],
     "condistill train edge: error: unrecognized option --frobnicate, and no option is close to it "
     "(condistill train edge --help lists every option)"),
    (["train", "edge", "--max-step", "10", "--lerning-rate", "1"],
     "condistill train edge: error: unrecognized option --max-step; did you mean --max-steps? unrecognized option "
     "--lerning-rate; did you mean --learning-rate? (condistill train edge --help lists every option)"),
    (["train", "edge", "stray"],
     "condistill train edge: error: unexpected argument 'stray' (condistill train edge --help lists every option)"),
    (["eval", "--condition", "edge", "--studnet", "run"],
     "condistill eval: error: unrecognized option --studnet; did you mean --student? "
     "(condistill eval --help lists every option)"),
    (["eval", "--conditon", "edge", "--student", "run"],  # the misspelling, not "--condition is required"
     "condistill eval: error: unrecognized option --conditon; did you mean --condition? "
     "(condistill eval --help lists every option)"),
    (["export", "run", "--format", "kohya", "--out", "o.safetensors", "--overwrit"],
     "condistill export: error: unrecognized option --overwrit; did you mean --overwrite? "
     "(condistill export --help lists every option)"),
    (["cache", "--condition", "edge", "--data", "d", "--out", "o", "--shard-sise", "3"],
     "condistill cache: error: unrecognized option --shard-sise; did you mean --shard-size? "
     "(condistill cache --help lists every option)"),
    (["push", "run", "org/name", "--privat"],
     "condistill push: error: unrecognized option --privat; did you mean --private? "
     "(condistill push --help lists every option)"),
    (["trian"], "condistill: error: unknown command 'trian'; did you mean train? (condistill --help describes them)"),
    (["fit"], "condistill: error: unknown command 'fit'; the commands are train, cache, eval, export, push, demo "
              "(condistill --help describes them)"),
    (["train", "egde"], "condistill train: error: unknown condition 'egde'; did you mean edge? "
                        "(condistill train --help describes them)"),
    (["train", "canny"], "condistill train: error: unknown condition 'canny'; choose one of edge, depth, sr, inpaint, "
                         "none, paired, segmentation (condistill train --help describes them)"),
    (["train", "--max-steps", "3", "edge"],
     "condistill train: error: the condition comes first: condistill train edge --max-steps 3"),
    # other errors: the message alone, without the usage block
    (["train", "edge", "--max-steps", "x"],
     "condistill train edge: error: argument --max-steps: invalid int value: 'x'"),
    (["train", "edge", "--preset"], "condistill train edge: error: argument --preset: expected one argument"),
    (["eval", "--student", "run"], "condistill eval: error: the following arguments are required: --condition"),
    (["export", "run"], "condistill export: error: the following arguments are required: --format, --out"),
    (["push", "run"], "condistill push: error: the following arguments are required: repo_id"),
])
def test_a_command_line_error_is_one_line_with_status_2(argv, line, capsys):
    assert _exit(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_an_invalid_choice_is_one_line_and_suggests_the_close_one(capsys):
    assert _exit(["eval", "--condition", "egde", "--student", "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("condistill eval: error: argument --condition: invalid choice: 'egde' (choose from ")
    assert err.endswith("; did you mean edge?\n") and err.count("\n") == 1 and "usage:" not in err
    assert _exit(["train", "edge", "--distance", "l1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("condistill train edge: error: argument --distance: invalid choice: 'l1' (choose from ")
    assert err.count("\n") == 1 and "usage:" not in err


@pytest.mark.parametrize("text, problem", [("{bad", "is not valid JSON"), ("[1]", "is not a JSON object")])
def test_a_json_option_that_is_not_an_object_is_one_line(text, problem, capsys):
    assert _exit(["train", "edge", "--condition-options", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"condistill train edge: error: argument --condition-options: {text!r} {problem}")
    assert err.count("\n") == 1


# ---------------------------------------------------------------------- --overwrite, a bare flag
def test_overwrite_is_a_bare_flag_in_train(capsys):
    assert config_from_args("edge", ["--overwrite"]).overwrite is True
    assert config_from_args("edge", ["--overwrite", "--max-steps", "3"]).max_steps == 3
    assert config_from_args("edge", []).overwrite is False
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as info:
        main(["train", "edge", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "[--overwrite]" in out and "\n  --overwrite  " in out and "--overwrite {true,false}" not in out
    assert "replace a finished run's export in --output-dir" in out  # the help names options as they are typed


@pytest.mark.parametrize("argv, value", [(["--overwrite", "true"], True), (["--overwrite=false"], False),
                                         (["--overwrite", "yes"], True)])
def test_overwrite_with_a_value_still_works_with_a_warning(argv, value, capsys):
    assert config_from_args("edge", argv, prog="condistill train edge").overwrite is value
    word = argv[-1].split("=")[-1]
    assert capsys.readouterr().err == (f"condistill train edge: warning: '--overwrite {word}' is deprecated; "
                                       "write --overwrite (or leave it out for false)\n")


def test_overwrite_with_another_value_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        config_from_args("edge", ["--overwrite", "maybe"], prog="condistill train edge")
    assert info.value.code == 2
    assert capsys.readouterr().err == ("condistill train edge: error: argument --overwrite: takes no value, got "
                                       "'maybe'; write --overwrite alone\n")


def test_overwrite_is_the_same_bare_flag_in_every_command():
    presets = presets_for("edge")
    train = build_parser("edge", presets, recipe_description("edge"), prog="condistill train edge")
    assert train.parse_args(["--overwrite"]).overwrite is True
    assert _export_parser().parse_args(["run", "--format", "kohya", "--out", "o", "--overwrite"]).overwrite is True
    assert _cache_parser().parse_args(["--condition", "edge", "--data", "d", "--out", "o",
                                       "--overwrite"]).overwrite is True


# ---------------------------------------------------------------------- options named as typed
def test_messages_name_the_options_as_typed():
    assert cli_form("max_skip_fraction=0.1; the run stopped") == "--max-skip-fraction 0.1; the run stopped"
    assert (cli_form("ode_source='online' with guidance_branches='ode'")
            == "--ode-source online with --guidance-branches ode")
    assert cli_form("need 1 <= guidance_min <= guidance_max.") == "need 1 <= --guidance-min <= --guidance-max."
    assert cli_form("max_steps=2 is below the checkpoint's step 3") == "--max-steps 2 is below the checkpoint's step 3"
    assert cli_form("cannot change: adapter: 1 -> 2; ema_decay: 0.9 -> 0.99") == ("cannot change: --adapter: 1 -> 2; "
                                                                            "--ema-decay: 0.9 -> 0.99")
    # paths, file names, Python calls and words that are not options stay as they are
    for text in ("runs/max_steps/x", "data_report.json", "pass build_objective(..., condition=the run's condition)",
                 "get_condition('depth', estimator_path='<folder>')", "the --max-steps option"):
        assert cli_form(text) == text


# ---------------------------------------------------------------------- checks before a model loads
def test_the_depth_estimator_error_names_the_command_line_and_python_forms(tmp_path):
    from condistill.conditions import EstimatorWeightsError, get_condition

    with pytest.raises(EstimatorWeightsError) as info:
        get_condition("depth", source="estimator", estimator_path=str(tmp_path / "missing"))
    message = str(info.value)
    assert """pass --condition-options '{"source": "estimator", "estimator_path": "<folder>"}' (Python: """ \
           """get_condition('depth', source='estimator', estimator_path='<folder>'))""" in message
    assert """--condition-options '{"source": "record"}'""" in message
    assert ".." not in message and "estimator_path='<folder>' (or" not in message


def test_a_loader_error_ending_in_a_full_stop_is_not_doubled(monkeypatch):
    from condistill.conditions import EstimatorWeightsError, get_condition
    from condistill.conditions import depth as depth_module

    class OfflineDetector:
        @classmethod
        def from_pretrained(cls, path, model_type, filename):
            raise OSError("We couldn't connect to the Hub.\nCheck your connection.")

    monkeypatch.setattr(depth_module, "import_controlnet_aux", lambda name: OfflineDetector)
    with pytest.raises(EstimatorWeightsError) as info:
        get_condition("depth", source="estimator", estimator_path=MISSING_HUB_REPO).load_estimator()
    assert "OSError: We couldn't connect to the Hub. Download it" in str(info.value) and ".." not in str(info.value)


def test_check_finds_a_hub_estimator_missing_from_the_cache_offline(monkeypatch):
    from condistill.conditions import EstimatorWeightsError, get_condition

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    depth = get_condition("depth", source="estimator", estimator_path=MISSING_HUB_REPO)  # nothing checked yet
    with pytest.raises(EstimatorWeightsError, match=r"'dpt_hybrid-midas-501f0c75.pt' of Hub repository "
                       r"'someone/no-such-depth-weights', which is not in the Hugging Face cache, and offline mode"):
        depth.check()
    get_condition("depth", source="auto", estimator_path=MISSING_HUB_REPO).check()  # may never need it
    get_condition("edge").check()  # the other conditions have nothing to check


@pytest.mark.parametrize("estimator_path", ["local", MISSING_HUB_REPO])
def test_train_stops_on_a_missing_depth_estimator_before_the_base_loads(estimator_path, tmp_path, monkeypatch,
                                                                         no_model, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(tmp_path / "no-such-folder") if estimator_path == "local" else estimator_path
    options = json.dumps({"source": "estimator", "estimator_path": path})
    assert main(["train", "depth", "--condition-options", options, "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("condistill train depth: error: Depth estimator 'midas' needs the weight file "
                          "'dpt_hybrid-midas-501f0c75.pt'") and err.count("\n") == 1
    assert """--condition-options '{"source": "estimator", "estimator_path": "<folder>"}'""" in err
    assert "Traceback" not in err and "AssertionError" not in err


def test_distill_stops_on_a_missing_local_estimator_folder_before_the_base_loads(tmp_path, no_model):
    from condistill.conditions import EstimatorWeightsError
    from condistill.config import DistillConfig
    from condistill.training.loop import distill

    cfg = DistillConfig(condition="depth", output_dir=str(tmp_path / "run"), max_steps=1,
                        condition_options={"source": "estimator", "estimator_path": str(tmp_path / "missing")})
    with pytest.raises(EstimatorWeightsError, match="does not exist"):
        distill(cfg)


def test_distill_stops_on_a_missing_hub_estimator_before_the_base_loads(tmp_path, monkeypatch, no_model):
    from condistill.conditions import EstimatorWeightsError
    from condistill.config import DistillConfig
    from condistill.training.loop import distill

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DistillConfig(condition="depth", output_dir=str(tmp_path / "run"), max_steps=1,
                        condition_options={"source": "estimator", "estimator_path": MISSING_HUB_REPO})
    with pytest.raises(EstimatorWeightsError, match="not in the Hugging Face cache"):
        distill(cfg)


def test_wrong_condition_and_adapter_options_stop_before_the_base_loads(no_model, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "run")]
    assert main(["train", "edge", "--condition-options", '{"low_treshold": 50}', *out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("""condistill train edge: error: --condition-options {"low_treshold": 50}: Unknown option""")
    assert err.count("\n") == 1
    assert main(["train", "edge", "--adapter", "lora", "--adapter-options", '{"rnak": 8}', *out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("condistill train edge: error: --adapter-options: the lora adapter has no option 'rnak'; "
                          "did you mean rank? (its options: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
