"""benchmarks/sampling_latency.py on the tiny inline base, with and without an adapter (a few seconds)."""
import importlib.util
import json
from pathlib import Path

import pytest

from condistill.adapters import build_student
from condistill.frozen import load_base
from condistill.conditions import get_condition
from condistill.adapters.save_load import save_adapter
import helpers
from helpers import make_tiny_base

torch_single_thread = helpers.torch_single_thread  # module-scoped autouse fixture: one CPU thread

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling_latency.py"


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("sampling_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("latency"))


def _check(report, model):
    names = [r["name"] for r in report["rows"]]
    assert names == ["codi-1", "codi-2", "codi-4", "ddim-4-cfg", "ddim-50-cfg"]
    rows = {r["name"]: r for r in report["rows"]}
    assert all(r["model"] == model and r["seconds_per_image"] > 0 for r in rows.values())
    assert rows["ddim-50-cfg"]["speedup"] == pytest.approx(1.0)
    assert rows["ddim-50-cfg"]["guidance"] == 4.0 and rows["codi-1"]["guidance"] == 1.0
    # 50 guided steps cost far more than one unguided step, whatever the machine load
    assert rows["codi-1"]["speedup"] > 5


def test_teacher_only(latency, tiny_base, tmp_path, capsys):
    out = tmp_path / "latency.json"
    report = latency.main(["--base", str(tiny_base), "--batch-size", "1", "--repeats", "1", "--warmup", "0",
                           "--device", "cpu", "--out", str(out)])
    _check(report, "teacher")
    assert json.loads(out.read_text())["rows"] == report["rows"]
    printed = capsys.readouterr().out
    assert "speed-up vs 50-step DDIM+CFG" in printed and "| codi-1 | teacher | codi | 1 | 1 |" in printed


def test_with_adapter(latency, tiny_base, tmp_path):
    base = load_base(tiny_base)
    cond = get_condition("edge")
    folder = save_adapter(build_student("t2i_adapter", base, cond.channels), tmp_path / "adapter",
                          base_name_or_path=str(tiny_base), base_fingerprint=base.fingerprint(),
                          condition_name="edge", condition_config=cond.config(), num_grid=50,
                          prediction_type=base.prediction_type, resolution=base.resolution)
    report = latency.main(["--adapter", str(folder), "--batch-size", "1", "--repeats", "1", "--warmup", "0",
                           "--device", "cpu"])
    _check(report, "adapter")
    assert report["base"] == str(tiny_base) and report["adapter"] == str(folder)
