import shutil

import numpy as np
import pytest
import torch

from condistill import load_adapter
from condistill.demo import load_models
from condistill.demo.inputs import condition_from_upload, inpaint_condition
from condistill.demo.models import DemoModel
from condistill.world.scenes import generate_scene


def _control(model):
    photo = generate_scene(3, "heldout", resolution=96).image
    if model.condition.name == "inpaint":
        mask = np.zeros((96, 96), dtype=bool)
        mask[20:60, 30:70] = True
        return inpaint_condition(model.condition, photo, mask)
    return condition_from_upload(model.condition, photo, depth_map=model.condition.name == "depth")


def _python_api(run, control, steps, guidance, seed, conventional_scheduler=None):
    """The image the documented Python API gives (README: load_adapter, then the pipeline call)."""
    pipe = load_adapter(run)
    pipe.set_progress_bar_config(disable=True)
    if conventional_scheduler is not None:
        pipe.scheduler = conventional_scheduler
    defaults = {**pipe.condistill_defaults, "num_inference_steps": steps, "guidance_scale": guidance}
    generator = torch.Generator().manual_seed(seed)
    if "strength" in defaults:  # trained for one step from the input: the img2img pipeline
        image = pipe.condistill_condition.init_image(control)
        return pipe("a red cube", image=image, control_image=control, generator=generator, **defaults).images[0]
    return pipe("a red cube", image=control, generator=generator, **defaults).images[0]


@pytest.mark.parametrize("name", ["edge", "edge-dmd", "sr", "inpaint-lora", "depth-t2i", "edge-baseline"])
def test_a_column_samples_exactly_what_the_python_api_gives(demo_runs, name):
    model = DemoModel(demo_runs[name])
    control = _control(model)
    steps = 1 if name != "edge-baseline" else 4
    guidance = model.guidance if name != "edge" else 2.0  # under guidance the empty prompt's embeddings are kept too
    sample = model.generate(control, "a red cube", steps=steps, seed=5, guidance=guidance)
    expected = _python_api(demo_runs[name], control, steps, guidance, 5,
                           model.pipe.scheduler if model.conventional else None)
    assert sample.seconds > 0 and sample.image.size == (64, 64)
    assert np.array_equal(np.asarray(sample.image), np.asarray(expected))
    again = model.generate(control, "a red cube", steps=steps, seed=6, guidance=guidance)  # the kept embeddings
    assert not np.array_equal(np.asarray(again.image), np.asarray(sample.image))


def test_what_each_model_offers(demo_runs):
    student, baseline, one_step = (DemoModel(demo_runs[n]) for n in ("edge", "edge-baseline", "edge-dmd"))
    assert student.steps == (4, 1, 2) and student.guidance == 1.0 and not student.conventional
    assert baseline.steps == (50, 25, 4) and baseline.guidance == 4.0 and baseline.conventional
    assert type(baseline.pipe.scheduler).__name__ == "DDIMScheduler"
    assert "conventional adapter, 50 DDIM steps + CFG" in baseline.describe()
    assert "one step: the zero latent noised to t = 499" in one_step.describe()
    assert DemoModel(demo_runs["sr"]).img2img and not student.img2img
    assert student.label == "edge"
    with pytest.raises(TypeError, match="pipeline from condistill.load_adapter"):
        from diffusers import DiffusionPipeline

        DemoModel(DiffusionPipeline())


def test_load_models_refuses_mixed_conditions_before_loading_anything(demo_runs, monkeypatch):
    import condistill.demo.models as models

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(models, "DemoModel", loaded)
    with pytest.raises(ValueError, match="trained for sr at 64 px but .* for edge at 64 px; .* run one demo for each"):
        load_models([demo_runs["edge"], demo_runs["sr"]])
    with pytest.raises(FileNotFoundError, match="not an existing local folder"):
        load_models([demo_runs["edge"], "no/such/run-folder"])
    with pytest.raises(ValueError, match="at least one"):
        load_models([])


def test_a_hub_id_loads_offline_from_the_cache(demo_runs, tmp_path, monkeypatch):
    from helpers import make_fake_hub_cache

    cache = tmp_path / "hf_home" / "hub"
    run = tmp_path / "run"
    shutil.copytree(demo_runs["edge"] / "adapter", run / "adapter")
    make_fake_hub_cache(cache, "tiny-org/edge-student", run, commit="4" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [model] = load_models(["tiny-org/edge-student"])
    assert model.condition.name == "edge" and model.label == "edge-student"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_models(["tiny-org/not-cached"])
