import pytest

#: tiny students of every condition and adapter kind the demo tests use: name -> DistillConfig overrides
RUNS = {
    "edge": {},
    "edge-baseline": {"loss": "diffusion"},
    "edge-dmd": {"loss": "codi+dmd", "dmd_start_timestep": 499},
    "sr": {"condition": "sr", "loss": "codi+dmd", "dmd_start_timestep": 499},
    "inpaint-lora": {"condition": "inpaint", "adapter": "lora"},
    "depth-t2i": {"condition": "depth", "adapter": "t2i_adapter"},
}


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """Two-step runs on the embedded teacher, trained once: name -> run folder."""
    from condistill.training.loop import distill
    from helpers import tiny_run_config

    root = tmp_path_factory.mktemp("demo-runs")
    out = {}
    for name, overrides in RUNS.items():
        distill(tiny_run_config("embedded:tiny-teacher", root / name, batch_size=2, **overrides))
        out[name] = root / name
    return out
