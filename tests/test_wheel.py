"""An installed wheel runs its own embedded default from an empty folder, with no checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_trains_and_loads_from_an_empty_folder(tmp_path):
    # build from a clean copy, so a stale build/ folder of a working checkout cannot leak into the wheel
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "runs", "outputs",
                                                                 "*.egg-info", "__pycache__", ".pytest_cache"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("condistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "condistill/assets/tiny-teacher/unet/diffusion_pytorch_model.safetensors" in names
    assert "condistill/assets/judge/judge.safetensors" in names
    assert not [n for n in names if n.startswith(("tools/", "tests/", "worldbuild/"))]

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    train = subprocess.run([sys.executable, "-m", "condistill", "train", "edge", "--max-steps", "4",
                            "--batch-size", "4", "--validate-every", "0", "--output-dir", "X"],
                           capture_output=True, text=True, cwd=empty, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (empty / "X" / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    check = ("import condistill, json; from condistill import load_adapter; pipe = load_adapter('X'); "
             "print(json.dumps([condistill.__file__, type(pipe).__name__, pipe.condistill_config['base_name_or_path']]))")
    load = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=empty, env=env,
                          timeout=300)
    assert load.returncode == 0, load.stderr[-3000:]
    package_file, pipeline, base = __import__("json").loads(load.stdout.strip().splitlines()[-1])
    assert package_file.startswith(str(site)), package_file
    assert pipeline == "StableDiffusionControlNetPipeline" and base == "embedded:tiny-teacher"
