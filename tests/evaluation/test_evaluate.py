"""The evaluation command on a tiny run (tiny base, 1 training step, 4 held-out scenes)."""
import json
from pathlib import Path

import pytest
import torch

from condistill.cli import main
from condistill.config import DistillConfig
from condistill.evaluation.evaluate import RowSpec, default_rows, evaluate, markdown_table, parse_rows, ratio_summary
from condistill.adapters.save_load import adapter_sampler, read_adapter_config
from condistill.training.loop import distill
from helpers import make_tiny_base


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = make_tiny_base(root)
    cfg = DistillConfig(condition="sr", base=str(base), data="synthetic:train:8", output_dir=str(root / "run"),
                        max_steps=1, batch_size=2, checkpoint_every=0, validate_every=0, log_every=1)
    return distill(cfg)


def test_eval_rows_metrics_and_files(tiny_run, tmp_path):
    rows = [RowSpec("student-1", str(tiny_run), "codi", 1), RowSpec("teacher-ddim-2", "teacher", "ddim", 2, 3.0),
            RowSpec("bicubic", "bicubic", "none", 0, 0.0)]
    report = evaluate("sr", rows, num_images=4, batch_size=2, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert [r["name"] for r in report["rows"]] == ["student-1", "teacher-ddim-2", "bicubic"]
    for r in report["rows"]:
        m = r["metrics"]
        assert {"psnr", "ssim", "frechet_distance", "prompt_accuracy", "seconds_per_image"} <= m.keys()
        assert m["frechet_distance"] >= 0 and 0 <= m["prompt_accuracy"] <= 1 and m["seconds_per_image"] >= 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"] == report["rows"]
    assert saved["models"] == {str(tiny_run): {"kind": "controlnet", "loss": "codi", "steps_trained": 1,
                                               "sampler": "codi-stochastic"}}
    assert "| student-1 |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0
    assert list((tmp_path / "cache").glob("teacher-*.safetensors"))
    summary = ratio_summary(report, "student-1", "teacher-ddim-2")
    assert summary["fidelity_metric"] == "psnr" and summary["speedup"] > 0


def test_cached_teacher_rows_are_reused(tiny_run, tmp_path):
    rows = [RowSpec("teacher", "teacher", "ddim", 2, 3.0)]
    a = evaluate("sr", rows, base=read_adapter_config(tiny_run)["base_name_or_path"],
                 num_images=2, batch_size=2, cache_dir=tmp_path)
    b = evaluate("sr", rows, base=a["base"], num_images=2, batch_size=2, cache_dir=tmp_path)
    ma, mb = a["rows"][0]["metrics"], b["rows"][0]["metrics"]
    assert ma["seconds_per_image"] == mb["seconds_per_image"]  # read back from the cache, not re-timed
    assert ma == pytest.approx(mb, rel=1e-5)


def test_cli_eval(tiny_run, tmp_path, capsys):
    code = main(["eval", "--condition", "sr", "--row", "s=" + str(tiny_run) + ":codi:1", "--row", "b=bicubic",
                 "--num-images", "2", "--batch-size", "2", "--out", str(tmp_path / "o")])
    assert code == 0
    assert "| s | codi | 1 |" in capsys.readouterr().out


def test_bad_rows_are_explained(tmp_path):
    with pytest.raises(ValueError, match="NAME=MODEL"):
        parse_rows(["runs/edge"])
    with pytest.raises(FileNotFoundError, match="not found"):
        parse_rows([f"s={tmp_path}/missing:codi:4"])
    assert parse_rows(["b=bicubic"])[0].steps == 0
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*codi-stochastic"):
        parse_rows([f"s={tmp_path}:euler:4"])
    assert parse_rows([f"s={tmp_path}:codi-stochastic:2"])[0].sampler == "codi-stochastic"
    spec = parse_rows([f"s={tmp_path}:codi-stochastic:1:1:499"])[0]
    assert (spec.steps, spec.guidance, spec.start) == (1, 1.0, 499)
    assert parse_rows([f"s={tmp_path}:codi:1:1"])[0].start is None
    with pytest.raises(ValueError, match="needs the codi or codi-stochastic sampler, not 'ddim'"):
        parse_rows([f"s={tmp_path}:ddim:1:1:499"])
    with pytest.raises(ValueError, match="6 fields"):
        parse_rows([f"s={tmp_path}:codi:1:1:499:7"])


def test_rows_from_the_input_start_from_the_conditions_own_image(tiny_run, tmp_path, monkeypatch):
    import condistill.evaluation.evaluate as ev

    calls, real = [], ev.sample_images

    def recording(*args, **kwargs):
        assert kwargs.get("init_images") is None  # rows start from latents (method.sampler.start_latents)
        calls.append((kwargs.get("init_latents"), kwargs.get("start_timestep")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "sample_images", recording)
    rows = [RowSpec("noise", str(tiny_run), "codi", 1), RowSpec("input", str(tiny_run), "codi", 1, start=259),
            RowSpec("input-again", str(tiny_run), "codi", 1, start=259)]
    report = evaluate("sr", rows, num_images=2, batch_size=2, out_dir=tmp_path / "o")
    m = {r["name"]: r["metrics"] for r in report["rows"]}
    assert [r["start"] for r in report["rows"]] == [None, 259, 259]
    assert m["input"]["psnr"] != m["noise"]["psnr"]
    assert m["input"]["psnr"] == pytest.approx(m["input-again"]["psnr"])  # seeded like every row
    assert all(init is None and start is None for init, start in calls[: len(calls) // 3])
    from condistill.conditions import get_condition
    from condistill.data.dataset import ConditionDataset, collate
    from condistill.data.sources import open_source

    dataset = ConditionDataset(open_source("synthetic:heldout:2", resolution=16), get_condition("sr"), 16, seed=12345)
    conds = collate([dataset[i] for i in range(2)])["conditioning"]
    from condistill.frozen import load_base

    base = load_base(read_adapter_config(tiny_run)["base_name_or_path"])
    init, start = calls[-1]
    assert start == 259 and torch.equal(init, base.encode_images(conds * 2 - 1).float())
    assert "| input | codi from the input at t=259 | 1 |" in (tmp_path / "o" / "results.md").read_text()
    with pytest.raises(ValueError, match="pass its condition"):
        ev.generate_row(rows[1], None, {"conditioning": conds, "caption": ["a", "b"]}, 2, 0, {})


def test_rows_with_a_start_on_a_condition_that_is_not_an_image_start_from_the_zero_latent(tmp_path, monkeypatch):
    import condistill.evaluation.evaluate as ev

    base = make_tiny_base(tmp_path)
    run = distill(DistillConfig(condition="edge", base=str(base), data="synthetic:train:8", output_dir=str(tmp_path / "run"),
                                max_steps=1, batch_size=2, checkpoint_every=0, validate_every=0, log_every=1))
    calls, real = [], ev.sample_images

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "sample_images", recording)
    report = evaluate("edge", [RowSpec("zero", str(run), "codi", 1, start=499)], num_images=2, batch_size=2,
                      out_dir=tmp_path / "o")
    assert report["rows"][0]["start"] == 499 and 0.0 <= report["rows"][0]["metrics"]["edge_f1"] <= 1.0
    last = calls[-1]
    assert last.get("init_images") is None and last["start_timestep"] == 499
    assert last["init_latents"].shape == (2, 4, 8, 8) and not last["init_latents"].any()
    assert "| zero | codi from the zero latent at t=499 | 1 |" in (tmp_path / "o" / "results.md").read_text()


def test_student_rows_use_the_sampler_saved_with_the_adapter(tiny_run, tmp_path):
    # training exports the re-noising sampler by default; an adapter saved deterministic keeps it
    assert adapter_sampler(tiny_run) == "codi-stochastic"
    assert {r.sampler for r in default_rows(str(tiny_run), condition="sr") if r.name.startswith("student")} == {
        "codi-stochastic"}
    import shutil

    det = tmp_path / "det"
    shutil.copytree(tiny_run, det)
    sched = Path(read_adapter_config(det)["_folder"]) / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "stochastic": False}))
    assert adapter_sampler(det) == "codi"
    assert default_rows(str(det))[0].sampler == "codi"


def test_stochastic_sampler_changes_the_samples_but_not_their_seeding(tiny_run, tmp_path):
    rows = [RowSpec("det", str(tiny_run), "codi", 2), RowSpec("sto", str(tiny_run), "codi-stochastic", 2),
            RowSpec("sto-again", str(tiny_run), "codi-stochastic", 2)]
    m = {r["name"]: r["metrics"] for r in evaluate("sr", rows, num_images=2, batch_size=2)["rows"]}
    assert m["sto"]["psnr"] != m["det"]["psnr"]
    assert m["sto"]["psnr"] == pytest.approx(m["sto-again"]["psnr"])  # the fresh noise comes from the seed


def test_markdown_table_marks_direction():
    report = {"condition": "depth", "rows": [{"name": "x", "sampler": "codi", "steps": 4, "guidance": 1.0,
                                               "metrics": {"depth_error": 0.1, "frechet_distance": 2.0,
                                                           "prompt_accuracy": 0.5, "seconds_per_image": 0.01}}]}
    table = markdown_table(report)
    assert "depth_error (lower better)" in table and "| x | codi | 4 | 1 | 0.100 |" in table


@pytest.mark.parametrize("budget, passes", [(1e9, 5), (0.0, 1)])
def test_cheap_rows_are_timed_over_several_passes(tiny_run, monkeypatch, budget, passes):
    import condistill.evaluation.evaluate as ev

    calls = []
    real = ev.sample_images
    monkeypatch.setattr(ev, "sample_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ev, "TIMING_SECONDS", budget)
    monkeypatch.setattr(ev, "MAX_TIMING_PASSES", 5)
    report = evaluate("sr", [RowSpec("s", str(tiny_run), "codi", 1)], num_images=4, batch_size=2)
    assert len(calls) == 1 + 2 * passes  # warm-up, then every pass samples both batches
    assert report["rows"][0]["metrics"]["seconds_per_image"] > 0


def test_an_adapter_of_another_condition_is_refused_before_the_base_loads(tiny_run, monkeypatch, capsys):
    """The condition comes from the student's export: an sr student evaluated as depth would fetch a depth
    estimator and sample with conditions it never saw."""
    import condistill.evaluation.evaluate as ev
    from condistill.evaluation.evaluate import rows_base_and_condition

    def load_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the error")

    monkeypatch.setattr(ev, "load_base", load_base)
    with pytest.raises(ValueError, match=r"condition='depth': the adapter .* was trained for 'sr'; evaluate it with "
                                         r"condition='sr'"):
        rows_base_and_condition([RowSpec("s", str(tiny_run))], None, "depth")
    assert main(["eval", "--condition", "depth", "--student", str(tiny_run), "--num-images", "2"]) == 1
    assert capsys.readouterr().err == (f"condistill eval: error: --condition depth: the adapter {tiny_run} was "
                                       "trained for 'sr'; evaluate it with --condition sr (its export records the "
                                       "condition and its options)\n")
    _, _, cond = rows_base_and_condition([RowSpec("s", str(tiny_run))], None, "sr")
    assert cond.config() == read_adapter_config(tiny_run)["condition_config"]  # the export's options, not defaults
