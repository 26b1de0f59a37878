"""The model card every run writes at the root of its export, and its results section."""
from __future__ import annotations

import json

import pytest

from condistill.publish.card import (NO_RESULTS, RESULTS_END, RESULTS_START, base_license, read_front_matter,
                                     render_card, update_results, write_model_card)


def _sections(body: str) -> list[str]:
    return [line[3:] for line in body.splitlines() if line.startswith("## ")]


def test_training_writes_the_card_and_the_samples(trained_export):
    from huggingface_hub import ModelCard

    card = trained_export / "adapter" / "README.md"
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
    assert f'ADAPTER = "{trained_export / "adapter"}"' in body and "ControlNetModel.from_pretrained(ADAPTER, " \
        'subfolder="controlnet")' in body
    assert "![validation samples](samples.png)" in body
    grid = sorted((trained_export / "validation").glob("step-*.png"))[-1]
    assert grid.name == "step-0000002.png"
    assert (trained_export / "adapter" / "samples.png").read_bytes() == grid.read_bytes()
    results = body[body.index(RESULTS_START) + len(RESULTS_START):body.index(RESULTS_END)].strip()
    assert results == NO_RESULTS  # nothing invented before an evaluation


def test_eval_update_replaces_only_the_results_section(run_copy):
    card = run_copy / "adapter" / "README.md"
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
    assert f"recorded the results in {run_copy / 'adapter' / 'README.md'}" in out.err
    text = (run_copy / "adapter" / "README.md").read_text()
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
    config = json.loads((run_copy / "adapter" / "condistill_config.json").read_text())
    config["base_name_or_path"] = "some-org/some-base"
    meta, body = read_front_matter(render_card(config, None))
    assert meta["base_model"] == "some-org/some-base" and meta["license"] == "creativeml-openrail-m"
    assert "[`some-org/some-base`](https://huggingface.co/some-org/some-base)" in body
    config["base_name_or_path"] = "embedded:tiny-teacher"
    meta, body = read_front_matter(render_card(config, None))
    assert "base_model" not in meta and "the frozen local base `embedded:tiny-teacher`" in body


# ---- the card's code runs -----------------------------------------------------------------
KINDS = ("controlnet", "t2i_adapter", "lora")
_RUN_CARDS = r"""
import re, sys
from pathlib import Path
for card in sys.argv[1:]:
    scope = {}
    for block in re.findall(r"^```python\n(.*?)^```", Path(card).read_text(), flags=re.S | re.M):
        scope.pop("image", None)
        exec(compile(block, card, "exec"), scope)
        print(card, type(scope["image"]).__name__, *scope["image"].size)
"""


def _card_blocks(run) -> list[str]:
    import re

    return re.findall(r"^```python\n(.*?)^```", (run / "adapter" / "README.md").read_text(), flags=re.S | re.M)


def _train_kinds(base: str, root) -> dict:
    import torch

    from condistill.training.loop import distill
    from helpers import tiny_run_config

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {kind: distill(tiny_run_config(base, root / kind, adapter=kind, batch_size=2)) for kind in KINDS}
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "local folder"])
def test_the_cards_code_runs_for_an_embedded_or_local_base(where, base_path, tmp_path, monkeypatch):
    """Both usage blocks of the card (condistill, then plain diffusers), run in order as written, sample an
    image at the training size for every adapter kind. The plain-diffusers block finds the embedded base
    through ``resolve_pretrained_dir`` (``from_pretrained("embedded:tiny-teacher")`` is not a hub id) and a
    local base by the path the run recorded."""
    from condistill.world.scenes import generate_scene

    base = "embedded:tiny-teacher" if where == "embedded" else str(base_path)
    runs = _train_kinds(base, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    generate_scene(0, "heldout").image.save("photo.png")
    for kind, run in runs.items():
        text = (run / "adapter" / "README.md").read_text()
        assert "from_pretrained(BASE" in text and f'from_pretrained("{base}"' not in text
        fmt = "kohya" if kind == "lora" else "single-file"
        assert (f"cannot load the embedded teacher (its VAE downsamples 4x, not 8x), so `condistill export --format "
                f"{fmt}` writes this student's file without a ComfyUI workflow" if where == "embedded" else
                f"`condistill export <this folder> --format {fmt} --out student.safetensors`") in text, kind
        expected = ('BASE = resolve_pretrained_dir("embedded:tiny-teacher")' if where == "embedded"
                    else f"BASE = {json.dumps(base)}  # a local folder")
        assert expected in text, kind
        size = json.loads((run / "adapter" / "condistill_config.json").read_text())["resolution"]
        blocks = _card_blocks(run)
        assert len(blocks) == 2, kind
        scope: dict = {}
        for block in blocks:
            scope.pop("image", None)
            exec(compile(block, f"{kind} card", "exec"), scope)  # noqa: S102
            assert scope["image"].size == (size, size), kind


@pytest.mark.slow
def test_the_cards_code_runs_for_a_hub_base(base_path, tmp_path, monkeypatch):
    """A run on a hub id: the card names the id, and its code runs as a user runs it, in a fresh process
    with the hub cache and ``HF_HUB_OFFLINE=1`` (diffusers reads both when it is imported)."""
    import os
    import subprocess
    import sys

    from condistill.world.scenes import generate_scene
    from helpers import make_fake_hub_cache

    cache = make_fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-sd", base_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = _train_kinds("tiny-org/tiny-sd", tmp_path / "runs")
    for run in runs.values():
        text = (run / "adapter" / "README.md").read_text()
        assert 'BASE = "tiny-org/tiny-sd"\n' in text and "resolve_pretrained_dir" not in text
    generate_scene(0, "heldout").image.save(tmp_path / "photo.png")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cards = [str(run / "adapter" / "README.md") for run in runs.values()]
    proc = subprocess.run([sys.executable, "-c", _RUN_CARDS, *cards], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines == [f"{card} Image 16 16" for card in cards for _ in range(2)]


def test_a_table_measured_on_an_export_replaced_since_is_not_recorded(run_copy):
    """A continuing run can replace the export while `condistill eval --student RUN` measures the old one."""
    from condistill.publish.card import export_identity, record_eval

    card = run_copy / "adapter" / "README.md"
    before, measured = card.read_text(), export_identity(run_copy)
    config = run_copy / "adapter" / "condistill_config.json"
    config.write_text(config.read_text().replace('"steps_trained": 2', '"steps_trained": 4'))  # the new export
    said = []
    assert record_eval(str(run_copy), "| row | x |\n|---|---|\n| s | 1 |", {}, log=said.append, measured=measured) is None
    assert card.read_text() == before and "was replaced while the evaluation ran" in said[0]
    assert record_eval(str(run_copy), "| row | x |\n|---|---|\n| s | 1 |", {}, measured=export_identity(run_copy))
    assert "| s | 1 |" in card.read_text()
