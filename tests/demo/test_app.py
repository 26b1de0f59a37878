import subprocess
import sys

import numpy as np
import pytest
import torch

from condistill.demo.app import Page
from condistill.demo.models import DemoModel


@pytest.fixture(scope="module")
def edge_page(demo_runs):
    return Page([DemoModel(demo_runs["edge"])])


def test_a_refused_upload_changes_only_the_status(edge_page, tmp_path):
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    picture, canvas, status, generation = edge_page.upload(str(bad), 3)  # the outputs' order in the page
    assert "scan.jpg is not an image this demo can read" in status
    assert all(type(x).__name__ == "dict" and x.get("__type__") == "update" for x in (picture, canvas, generation))


def test_an_upload_lays_its_edges_under_a_fresh_canvas(edge_page, tmp_path):
    from condistill.world.scenes import generate_scene

    photo = tmp_path / "photo.png"
    scene = generate_scene(1, "heldout", resolution=64).image
    scene.save(photo)
    picture, canvas, status, generation = edge_page.upload(str(photo), 3)
    assert generation == 4 and status == ""
    assert torch.equal(picture, edge_page.condition.control_image(scene))
    assert canvas.value == {"strokes": [], "generation": 4}  # the browser drops its strokes for this generation
    # strokes drawn over it add to its edges
    control = edge_page.control({"strokes": [[[0, 4], [511, 4]]], "generation": 4}, picture, False)
    assert torch.equal(control[0, 0, 0], torch.ones(64)) and torch.equal(torch.maximum(control, picture), control)


def test_a_column_without_input_asks_for_one_and_bad_strokes_get_a_message(demo_runs):
    page = Page([DemoModel(demo_runs["sr"])])
    image, timing, preview, status = page.column(0, None, None, False, "", 0, 1, 1.0)
    assert image is None and "Upload an image" in status
    edge = Page([DemoModel(demo_runs["edge"])])
    *_, status = edge.column(0, {"strokes": "garbage"}, None, False, "", 0, 1, 1.0)
    assert "cannot read; reload the page" in status


def test_clear_and_examples(demo_runs):
    page = Page([DemoModel(demo_runs["depth-t2i"])])
    picture, _, status, generation = page.example(2, 0)
    assert generation == 1 and picture.depth is not None
    control = page.control(None, picture, False)
    assert control.shape == (1, 3, 64, 64) and torch.allclose(control[0, 0], torch.from_numpy(picture.depth))
    assert page.clear(5)[0] is None and page.clear(5)[3] == 6
    assert page.control(None, picture, False) is control  # every column, every prompt change: made once
    import dataclasses

    again = page.control(None, dataclasses.replace(picture), False)  # another picture: made anew
    assert again is not control and torch.equal(again, control)
    sr = Page([DemoModel(demo_runs["sr"])])
    low, *_ = sr.example(0, 0)
    assert low.size == (16, 16)


def _demo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "condistill", "demo", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_the_command_refuses_in_one_line_before_anything_starts(tmp_path, demo_runs):
    done = _demo(str(tmp_path / "no-such-run"))
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "condistill demo: error:" in done.stderr and "not an existing local folder" in done.stderr
    done = _demo(str(tmp_path))
    assert done.returncode == 1 and "No condistill_config.json" in done.stderr
    done = _demo(str(demo_runs["edge"]), "--port", "70000")
    assert done.returncode == 1 and "a port is between 0 and 65535" in done.stderr
    done = _demo(str(demo_runs["edge"]), str(demo_runs["sr"]))
    assert done.returncode == 1 and "run one demo for each" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys, demo_runs):
    import importlib.util

    from condistill.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["demo", str(demo_runs["edge"])]) == 1
    err = capsys.readouterr().err
    assert err == "condistill demo: error: condistill demo needs Gradio, which is not installed: pip install " \
                  "'condistill[demo]'\n"
