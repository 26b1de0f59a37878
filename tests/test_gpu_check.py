"""benchmarks/gpu_check.py: its --tiny mode runs every case on the CPU, a deadline of 0 s skips them all, and a
run stopped mid-case still leaves complete files."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

#: every case, in the order it runs: a case dropped or renamed must be noticed here
EXPECTED = [
    "sd15/controlnet/codi/bf16",
    "sd15/controlnet/codi/fp16",
    "sd15/controlnet/codi/bf16/no-ckpt",
    "sd15/controlnet/codi+dmd/bf16",
    "sd15/t2i_adapter/codi/bf16",
    "sd15/t2i_adapter/codi+dmd/bf16",
    "sd15/lora/codi/bf16",
    "sd15/lora/codi+dmd/bf16/no-ckpt",
    "sd15/sample/ddim-50-cfg",
    "sd15/sample/codi-1",
    "sd15/sample/codi-4",
    "sd15/sample/codi-1-fast",
    "sd15/sample/codi-4-fast",
    "sdxl/controlnet/codi/bf16",
]


def _run(tmp_path, *extra, timeout=300):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--components", str(tmp_path / "components"),
           "--threads", "1", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert (out / "gpu_check.json").is_file(), res.stderr[-3000:]
    return res, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def _check_header(report, md):
    assert report["mode"] == "tiny" and report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["diffusers"]
    assert "benchmarks/gpu_check.py --tiny" in report["command"]
    assert [r["id"] for r in report["cases"]] == EXPECTED
    for case_id in EXPECTED:  # one table row per case
        assert f"| {case_id} |" in md
    assert "diffusers" in md and report["command"] in md


@pytest.mark.slow
def test_tiny_mode_runs_every_case(tmp_path):
    res, report, md = _run(tmp_path, "--deadline-s", "240", "--train-steps", "1", "--warmup-steps", "0",
                           "--sampling-repeats", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_header(report, md)
    assert report["state"] == "done"
    assert [s["name"] for s in report["setup"]] == ["sd15", "taesd", "sdxl"]
    assert all(s["status"] == "built" for s in report["setup"])
    rows = {r["id"]: r for r in report["cases"]}
    for row in rows.values():  # numbers, or an explicit reason
        assert row["status"] in ("ok", "skipped", "error")
        if row["status"] == "skipped":
            assert row["reason"]
        elif row["status"] == "error":
            assert row["error"] and row["traceback"]
        elif row["kind"] == "train":
            assert row["seconds_per_step"] > 0 and row["images_per_second"] > 0
            assert row["batch_size"] == 2 and row["resolution"] == 32 and row["timed_steps"] == 1
        else:
            assert row["seconds_per_image"] > 0 and row["resolution"] == 32 and row["precision"] == "bf16"
    assert rows["sd15/controlnet/codi/fp16"]["status"] == "skipped"
    assert rows["sd15/controlnet/codi/fp16"]["reason"] == "fp16 needs CUDA"
    # every other case runs on the CPU: an error row here is a broken script or library
    errors = {k: r["traceback"] for k, r in rows.items() if r["status"] == "error"}
    assert not errors, "\n\n".join(f"{k}:\n{tb}" for k, tb in errors.items())
    assert all(r["status"] == "ok" for k, r in rows.items() if k != "sd15/controlnet/codi/fp16")
    # the preset's options, not copies: guidance 1..4, checkpointing as the preset says unless the case turns it off
    assert rows["sd15/controlnet/codi/bf16"]["guidance"] == [1.0, 4.0]
    assert rows["sd15/controlnet/codi/bf16"]["gradient_checkpointing"] is True
    assert rows["sd15/controlnet/codi/bf16/no-ckpt"]["gradient_checkpointing"] is False
    assert rows["sdxl/controlnet/codi/bf16"]["preset_options"]["resolution"] == 1024
    assert rows["sd15/sample/ddim-50-cfg"]["speedup"] == pytest.approx(1.0)
    assert rows["sd15/sample/codi-1"]["speedup"] > 1


def test_a_deadline_of_zero_skips_every_case(tmp_path):
    res, report, md = _run(tmp_path, "--deadline-s", "0", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_header(report, md)
    assert report["state"] in ("cut_off", "done") and report["setup"] == []
    for row in report["cases"]:
        assert row["status"] == "skipped" and "deadline" in row["reason"], row
    assert md.count("skipped: the deadline") == len(EXPECTED)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_a_run_stopped_mid_case_records_it_and_skips_the_rest(gpu_check, tmp_path):
    _, cases = gpu_check.parse_args(["--tiny", "--out", str(tmp_path), "--device", "cpu"])
    rows = [gpu_check._row(c, cuda=False) for c in cases]
    report = gpu_check.Report(tmp_path / "gpu_check.json", tmp_path / "gpu_check.md",
                              {"mode": "tiny", "state": "running", "command": "python benchmarks/gpu_check.py --tiny",
                               "elapsed_s": 0.0, "deadline_s": 1.0, "device": {"type": "cpu", "name": "cpu"},
                               "versions": {"torch": torch.__version__}, "setup": [], "cases": rows})
    report.update(rows[0], status="ok", resolution=32, batch_size=2, seconds_per_step=0.5, images_per_second=4.0)
    report.update(rows[1], status="running")
    assert report.stop("cut_off", "cut off by the deadline ({elapsed:.0f} s)", "the deadline passed before it started")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["state"] == "cut_off"
    assert [r["status"] for r in saved["cases"]] == ["ok", "error"] + ["skipped"] * (len(EXPECTED) - 2)
    assert saved["cases"][1]["error"].startswith("cut off by the deadline")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| 0.500 | 4.00 |" in md and "error: cut off by the deadline" in md and "cut off by the deadline:" in md
    # closed once: a later stop changes nothing
    assert not report.stop("done", "", "")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["state"] == "cut_off"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temp files left


def test_only_and_device_are_checked(gpu_check, capsys):
    _, cases = gpu_check.parse_args(["--tiny", "--only", "sdxl/controlnet/codi/bf16,sd15/sample/codi-1"])
    assert [c.id for c in cases] == ["sd15/sample/codi-1", "sdxl/controlnet/codi/bf16"]  # in the run's order
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--tiny", "--only", "sd15/nope"])
    assert "unknown case(s) ['sd15/nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_sdxl_shaped_components_have_sdxl_base_sizes(gpu_check):
    """The published SDXL base 1.0 parameter counts, checked on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = gpu_check.sd_components

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel(**c.SDXL_UNET)) == 2_567_463_684
        assert count(CLIPTextModel(CLIPTextConfig(**c.SDXL_TEXT))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**c.SDXL_TEXT_2))) == 694_659_840
        vae = AutoencoderKL(**c.SDXL_VAE)
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast
    assert c.SD15_VAE["force_upcast"] is False  # as SD 1.5's own VAE config reads (no key): fp16 stays fp16
