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


def test_untrained_student_with_short_warmup(latency, tiny_base):
    report = latency.main(["--base", str(tiny_base), "--untrained", "controlnet", "--batch-size", "1",
                           "--repeats", "1", "--warmup", "1", "--warmup-steps", "1", "--device", "cpu"])
    _check(report, "untrained controlnet")
    rows = {r["name"]: r for r in report["rows"]}
    # the recipe's default sampler, and one timed pass per row (the warm-up is not timed)
    assert rows["codi-4"]["sampler"] == "codi-stochastic"
    assert all(len(r["seconds_per_batch_all"]) == 1 for r in rows.values())
    assert report["untrained"] == "controlnet" and report["warmup_steps"] == 1


def test_untrained_and_adapter_together_are_refused(latency, tiny_base, capsys):
    with pytest.raises(SystemExit):
        latency.main(["--base", str(tiny_base), "--untrained", "lora", "--adapter", str(tiny_base)])
    assert "pass one of them" in capsys.readouterr().err


SD_COMPONENTS = Path(__file__).resolve().parents[1] / "benchmarks" / "sd_components.py"


def test_taesd_shaped_decoder_loads_as_a_fast_decoder(tmp_path):
    from condistill.decoders import load_fast_decoder

    spec = importlib.util.spec_from_file_location("sd_components", SD_COMPONENTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = module.build_taesd(tmp_path / "taesd")
    decoder = load_fast_decoder(tmp_path / "taesd")
    # TAESD's published decoder: 64 channels per block, 8x upsampling, about 1.2M parameters
    assert params == sum(p.numel() for p in decoder.decoder.parameters()) and 1.1e6 < params < 1.3e6
    assert decoder.config.latent_channels == 4 and decoder.config.scaling_factor == 1.0
    assert 2 ** (len(decoder.config.decoder_block_out_channels) - 1) == 8
