"""The model card every run writes at the root of its export, and its results section."""
from __future__ import annotations

import json

from condistill.publish.card import (NO_RESULTS, RESULTS_END, RESULTS_START, base_license, read_front_matter,
                                     render_card, update_results, write_model_card)


def _sections(body: str) -> list[str]:
    return [line[3:] for line in body.splitlines() if line.startswith("## ")]


def test_training_writes_the_card_and_the_samples(trained_export):
    from huggingface_hub import ModelCard

    card = trained_export / "README.md"
    text = card.read_text()
    meta, body = read_front_matter(text)
    assert meta == {"library_name": "diffusers", "tags": ["condistill", "edge", "controlnet", "few-step"],
                    "pipeline_tag": "text-to-image"}  # a local base: no base_model, no license known
    parsed = ModelCard(text).data.to_dict()
    assert parsed == meta
    assert _sections(body) == ["Training", "Sampling", "Samples", "Results"]
    assert "| images seen | 8 = 2 steps x batch 4 x accumulation 1 x 1 process |" in body
    assert "| N (skip grid) | 50 |" in body and "| lambda (regression weight) | 1 |" in body
    assert "CoDi (consistency + conditional regression)" in body and "`synthetic:train:24`" in body
    assert "Recommended: **4 steps**, guidance **1**" in body
    assert f'ADAPTER = "{trained_export}"' in body and "ControlNetModel.from_pretrained(ADAPTER, " \
        'subfolder="controlnet")' in body
    assert "![validation samples](samples.png)" in body
    grid = sorted((trained_export / "validation").glob("step-*.png"))[-1]
    assert grid.name == "step-0000002.png"
    assert (trained_export / "samples.png").read_bytes() == grid.read_bytes()
    results = body[body.index(RESULTS_START) + len(RESULTS_START):body.index(RESULTS_END)].strip()
    assert results == NO_RESULTS  # nothing invented before an evaluation


def test_eval_update_replaces_only_the_results_section(run_copy):
    card = run_copy / "README.md"
    before = card.read_text()
    update_results(run_copy, "| row | x |\n|---|---|\n| student-4 | 0.5 |\n", "condistill eval --condition edge")
    first = card.read_text()
    head, tail = before.split(RESULTS_START)[0], before.split(RESULTS_END)[1]
    assert first.startswith(head + RESULTS_START) and first.endswith(RESULTS_END + tail)
    assert first[len(head + RESULTS_START):-len(RESULTS_END + tail)] == (
        "\nMeasured with `condistill eval --condition edge`:\n\n| row | x |\n|---|---|\n| student-4 | 0.5 |\n")
    update_results(run_copy, "| row | y |\n|---|---|\n| student-1 | 0.7 |", "condistill eval --seed 1")
    second = card.read_text()
    assert "0.5" not in second and "| student-1 | 0.7 |" in second and second.count(RESULTS_START) == 1
    assert second.startswith(head) and second.endswith(tail)
    # a later card rewrite keeps the measured results only when asked to
    write_model_card(run_copy, keep_results=True)
    assert "| student-1 | 0.7 |" in card.read_text()
    write_model_card(run_copy)
    assert NO_RESULTS in card.read_text()


def test_condistill_eval_records_its_table_in_the_card(run_copy, monkeypatch, capsys):
    import condistill.evaluation.evaluate as evaluate_module
    from condistill.cli import main

    def fake_evaluate(condition, rows, **kwargs):  # the scoring itself is tested in tests/evaluation
        return {"condition": condition, "rows": [{"name": r.name, "sampler": r.sampler, "steps": r.steps,
                                                  "guidance": r.guidance, "metrics": {"edge_f1": 0.25 * r.steps}}
                                                 for r in rows]}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    assert main(["eval", "--condition", "edge", "--student", str(run_copy), "--num-images", "8"]) == 0
    out = capsys.readouterr()
    table = out.out.split("\n{")[0]
    assert f"recorded the results in {run_copy / 'README.md'}" in out.err
    text = (run_copy / "README.md").read_text()
    results = text[text.index(RESULTS_START) + len(RESULTS_START):text.index(RESULTS_END)]
    command = (f"condistill eval --condition edge --student {run_copy} --guidance 4.0 --num-images 8 "
               "--batch-size 64 --seed 0 --judge embedded:judge --device cpu")
    assert results == f"\nMeasured with `{command}`:\n\n{table.strip()}\n"
    assert "| student-4 | codi-stochastic | 4 | 1 | 1.000 |" in results


def test_a_hub_base_names_base_model_and_its_license(run_copy, tmp_path, monkeypatch):
    from helpers import make_fake_hub_cache

    base_readme = tmp_path / "base-files"
    base_readme.mkdir()
    (base_readme / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# base\n")
    cache = make_fake_hub_cache(tmp_path / "hub", "some-org/some-base", base_readme)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert base_license("some-org/some-base") == "creativeml-openrail-m"
    assert base_license(str(base_readme)) == "creativeml-openrail-m"  # a local folder's README too
    assert base_license("other-org/not-cached") is None and base_license("embedded:tiny-teacher") is None
    config = json.loads((run_copy / "condistill_config.json").read_text())
    config["base_name_or_path"] = "some-org/some-base"
    meta, body = read_front_matter(render_card(config, None))
    assert meta["base_model"] == "some-org/some-base" and meta["license"] == "creativeml-openrail-m"
    assert "[`some-org/some-base`](https://huggingface.co/some-org/some-base)" in body
    config["base_name_or_path"] = "embedded:tiny-teacher"
    meta, body = read_front_matter(render_card(config, None))
    assert "base_model" not in meta and "the frozen local base `embedded:tiny-teacher`" in body
