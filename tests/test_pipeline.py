"""load_adapter: stock diffusers pipelines with the few-step scheduler, from folders or the offline hub cache."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_fake_hub_cache, make_tiny_base, model_inputs, perturb_, torch_single_thread  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent / "adapters"))  # the damages shared with tests/adapters
from adapter_damage import (BAD_CONFIGS, DAMAGES, assert_names, damage, edit_export,  # noqa: E402
                            forbid_pickle_loading, rehash)

from condistill.adapters import AdapterWeightsError, build_student  # noqa: E402
from condistill.frozen import load_base  # noqa: E402
from condistill.adapters.save_load import save_adapter  # noqa: E402
from condistill.pipeline import load_adapter  # noqa: E402

PIPELINE_CLASS = {
    "controlnet": "StableDiffusionControlNetPipeline",
    "t2i_adapter": "StableDiffusionAdapterPipeline",
    "lora": "StableDiffusionAdapterPipeline",
}
KINDS = ["controlnet", "t2i_adapter", "lora"]


def _export(base, kind, out, seed=0, base_name=None, guidance=1.0, condition="edge", one_step_start=None, **options):
    student = build_student(kind, base, 3, **options)
    perturb_(student, seed=seed)
    save_adapter(
        student,
        out,
        base_name_or_path=base_name or str(base.name_or_path),
        base_fingerprint=base.fingerprint(),
        condition_name=condition,
        condition_config={},
        one_step_start=one_step_start,
        num_grid=50,
        prediction_type=base.prediction_type,
        recommended_steps=4,
        recommended_guidance=guidance,
        resolution=base.resolution,
        noise_schedule=base.noise_schedule_config(),
    )
    return student


@pytest.fixture(scope="module")
def exports(base_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    students = {kind: _export(load_base(base_path), kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}
    return root, students


def _manual_latents(student, scheduler, base, prompt, cond, latents, generator=None):
    """The 4-step sampler written out with the training-time student (``generator`` draws the
    stochastic sampler's fresh noise)."""
    scheduler.set_timesteps(4)
    ehs = base.encode_prompts([prompt])
    features = student.encode_condition(cond)
    z = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = student(z, t.expand(z.shape[0]), ehs, features)
            z = scheduler.step(out, t, z, generator=generator).prev_sample
    return z


@pytest.mark.parametrize("kind", KINDS)
def test_stock_pipeline_matches_student(kind, exports, base_path):
    from condistill.method.codi_scheduler import CoDiScheduler

    root, students = exports
    pipe = load_adapter(root / kind)
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    assert isinstance(pipe.scheduler, CoDiScheduler)
    assert pipe.scheduler.config.num_grid == 50
    assert pipe.condistill_defaults == {"num_inference_steps": 4, "guidance_scale": 1.0, "height": 16, "width": 16}
    assert pipe.condistill_config["kind"] == kind
    if kind == "lora":
        assert "condistill" in pipe.unet.peft_config

    base = load_base(base_path)
    _, _, _, cond = model_inputs(base, batch=1, seed=3)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    assert pipe.scheduler.config.stochastic  # exported adapters re-noise between steps by default
    out = pipe("a red cube", image=cond, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(11), **pipe.condistill_defaults)
    expected = _manual_latents(students[kind], CoDiScheduler.from_config(pipe.scheduler.config), base, "a red cube",
                               cond, latents, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-4)

    image = pipe("a red cube", image=cond, output_type="np", generator=torch.Generator().manual_seed(0),
                 **pipe.condistill_defaults).images
    assert image.shape == (1, base.resolution, base.resolution, 3)
    assert np.isfinite(image).all()


def test_a_controlnet_trained_from_the_input_comes_as_img2img_and_takes_its_one_step_there(base_path, tmp_path):
    """A ControlNet trained for one step from the input (sr) loads as the stock ControlNet img2img pipeline, and
    one call with its defaults and ``num_inference_steps=1`` is one student step from the recorded t = 499 on the
    start image noised there: exactly what ``sample_latents(init_latents=..., start_timestep=499)`` (condistill
    eval's row with START) computes. Two steps start from the top as usual."""
    from condistill.conditions import get_condition
    from condistill.method.codi_scheduler import CoDiScheduler
    from condistill.method.guidance import make_model_fn
    from condistill.method.sampler import sample_latents

    base = load_base(base_path)
    student = _export(base, "controlnet", tmp_path / "sr", condition="sr", one_step_start=499)  # a bare timestep:
    pipe = load_adapter(tmp_path / "sr")  # what exports wrote before the dict form, read as "from the input"
    assert type(pipe).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    assert pipe.condistill_config["one_step_start"] == {"timestep": 499, "from": "input"}
    assert pipe.condistill_defaults == {"num_inference_steps": 4, "guidance_scale": 1.0, "height": 16, "width": 16,
                                        "strength": 1.0, "controlnet_conditioning_scale": 1.0}
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    start_image = get_condition("sr").init_image(control)
    assert start_image.shape == (1, 3, 16, 16) and 0 <= float(start_image.min()) <= float(start_image.max()) <= 1
    defaults = {**pipe.condistill_defaults, "num_inference_steps": 1}
    image = pipe("a red cube", image=start_image, control_image=control, output_type="np", **defaults).images
    assert pipe.scheduler.timesteps.tolist() == [499] and image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    # latents given as image= are used as they are (the VAE samples its latents), so the step itself compares exactly
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = pipe("a red cube", image=init.clone(), control_image=control, output_type="latent",
               generator=torch.Generator().manual_seed(9), **defaults).images
    text = base.encode_prompts(["a red cube"])
    expected = sample_latents(make_model_fn(student, student.encode_condition(control), 1),
                              CoDiScheduler.from_config(pipe.scheduler.config), tuple(init.shape), text, text, 1,
                              init_latents=init, start_timestep=499, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    pipe("a red cube", image=start_image, control_image=control, output_type="latent", **{**defaults,
         "num_inference_steps": 2})
    assert pipe.scheduler.timesteps.tolist() == [999, 499]


def test_a_student_trained_from_the_zero_latent_takes_its_one_step_there(base_path, tmp_path):
    """An edge ControlNet trained for one step from the zero latent at t = 499: the stock text pipeline's one step
    runs the student once at t = 499 on ``s_499 * noise`` (the scheduler's ``init_noise_sigma``), the zero
    latent noised there; four steps are unchanged."""
    from condistill.method.codi_scheduler import CoDiScheduler
    from condistill.method.schedule import alpha_sigma

    base = load_base(base_path)
    start = {"timestep": 499, "from": "zero"}
    student = _export(base, "controlnet", tmp_path / "edge", one_step_start=start)
    pipe = load_adapter(tmp_path / "edge")
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.scheduler.config.one_step_start == start
    assert json.loads((tmp_path / "edge" / "scheduler" / "scheduler_config.json").read_text())["one_step_start"] == start
    _, _, _, cond = model_inputs(base, batch=1, seed=3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    out = pipe("a red cube", image=cond, latents=noise.clone(), output_type="latent",
               **{**pipe.condistill_defaults, "num_inference_steps": 1}).images
    s_499 = float(alpha_sigma(pipe.scheduler.alphas_cumprod.cpu(), torch.tensor([499]))[1])
    assert pipe.scheduler.init_noise_sigma == pytest.approx(s_499) and s_499 < 0.9
    scheduler = CoDiScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    with torch.no_grad():
        raw = student(s_499 * noise, torch.tensor([499]), base.encode_prompts(["a red cube"]),
                      student.encode_condition(cond))
    torch.testing.assert_close(out, scheduler.step(raw, 499, s_499 * noise).prev_sample, rtol=0, atol=1e-4)
    scheduler.set_timesteps(4)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.timesteps.tolist() == [999, 759, 499, 259]


def test_an_adapter_kind_without_img2img_warns_and_takes_one_step_from_noise(base_path, tmp_path):
    base = load_base(base_path)
    _export(base, "t2i_adapter", tmp_path / "sr", condition="sr", one_step_start={"timestep": 499, "from": "input"})
    with pytest.warns(UserWarning, match="no img2img pipeline for a t2i_adapter"):
        pipe = load_adapter(tmp_path / "sr")
    assert type(pipe).__name__ == "StableDiffusionAdapterPipeline" and pipe.scheduler.config.one_step_start is None
    assert "strength" not in pipe.condistill_defaults


@pytest.mark.parametrize("start, why", [({"timestep": 499, "from": "input"}, "needs a condition that is an image"),
                                        ({"timestep": 499, "from": "noise"}, "top of the grid"),
                                        ({"timestep": 500, "from": "zero"}, "timestep of the training grid"),
                                        ({"timestep": 499}, "must be null or"),
                                        ({"timestep": 499, "from": "latent"}, "must be one of")])
def test_a_one_step_start_that_does_not_fit_is_refused_at_export(start, why, base_path, tmp_path):
    with pytest.raises(ValueError, match=why):
        _export(load_base(base_path), "controlnet", tmp_path / "bad", one_step_start=start)
    assert not (tmp_path / "bad" / "condistill_config.json").exists()


def test_attach_to_existing_pipeline(exports, base_path):
    from diffusers import StableDiffusionPipeline

    root, _ = exports
    sd = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    pipe = load_adapter(sd, root / "controlnet")
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.unet is sd.unet and pipe.vae is sd.vae  # shared, not copied
    assert type(sd.scheduler).__name__ == "DDIMScheduler"  # the given pipeline keeps its scheduler
    image = pipe("a red cube", image=torch.rand(1, 3, 16, 16), output_type="np", **pipe.condistill_defaults).images
    assert image.shape == (1, 16, 16, 3)

    lora_pipe = load_adapter(sd, root / "lora")
    assert type(lora_pipe).__name__ == "StableDiffusionAdapterPipeline"
    with pytest.raises(ValueError, match="already carries a LoRA named 'condistill'"):
        load_adapter(sd, root / "lora")


def test_recorded_base_missing_then_base_override(base_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base(base_path)
    _export(base, "t2i_adapter", tmp_path / "ad", base_name="some-org/moved-away")
    with pytest.raises(FileNotFoundError, match="Pass base="):
        load_adapter(tmp_path / "ad")
    copy = tmp_path / "my_copy_of_base"
    shutil.copytree(base_path, copy)
    pipe = load_adapter(tmp_path / "ad", base=copy)
    assert type(pipe).__name__ == "StableDiffusionAdapterPipeline"


def test_base_mismatch_names_both(exports, tmp_path):
    from diffusers import StableDiffusionPipeline

    root, _ = exports
    other = make_tiny_base(tmp_path, block_out_channels=(32, 64), name="other_base")
    with pytest.raises(ValueError, match="Base mismatch") as info:
        load_adapter(root / "t2i_adapter", base=other)
    message = str(info.value)
    assert "tiny_base" in message and "other_base" in message and "block_out_channels" in message
    sd = StableDiffusionPipeline.from_pretrained(other, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(ValueError, match="Base mismatch"):
        load_adapter(sd, root / "controlnet")


def test_offline_hub_cache(base_path, tmp_path, monkeypatch):
    """Adapter and base both resolved by repo id from a hub cache, with HF_HUB_OFFLINE=1."""
    export = tmp_path / "export"
    _export(load_base(base_path), "lora", export, base_name="tiny-org/tiny-sd")
    cache = tmp_path / "hf_home" / "hub"
    make_fake_hub_cache(cache, "tiny-org/tiny-sd", base_path, commit="1" * 40)
    make_fake_hub_cache(cache, "tiny-org/codi-edge-lora", export, commit="2" * 40)
    run = tmp_path / "run"
    shutil.copytree(export, run / "adapter")  # run-folder layout: the export under adapter/
    make_fake_hub_cache(cache, "tiny-org/codi-run", run, commit="3" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    pipe = load_adapter("tiny-org/codi-edge-lora")
    assert type(pipe).__name__ == "StableDiffusionAdapterPipeline"
    image = pipe("a red cube", image=torch.rand(1, 3, 16, 16), output_type="np", **pipe.condistill_defaults).images
    assert image.shape == (1, 16, 16, 3)
    assert type(load_adapter("tiny-org/codi-run")).__name__ == "StableDiffusionAdapterPipeline"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_adapter("tiny-org/not-cached")


def test_path_errors_and_misuse(exports, tmp_path):
    root, _ = exports
    with pytest.raises(FileNotFoundError, match="No condistill_config.json"):
        load_adapter(tmp_path)  # exists, but is no adapter
    with pytest.raises(FileNotFoundError, match="not an existing local folder"):
        load_adapter(tmp_path / "missing" / "adapter")
    with pytest.raises(TypeError, match="only accepted after a pipeline"):
        load_adapter(root / "lora", root / "controlnet")


def test_v_prediction_base(tmp_path):
    path = make_tiny_base(tmp_path, prediction_type="v_prediction", name="v_base")
    base = load_base(path)
    _export(base, "controlnet", tmp_path / "ad", guidance=2.0)
    pipe = load_adapter(tmp_path / "ad")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.condistill_defaults["guidance_scale"] == 2.0
    image = pipe(["a red cube"], image=torch.rand(1, 3, 16, 16), output_type="np", **pipe.condistill_defaults).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_relative_local_base_found_from_another_directory(base_path, tmp_path, monkeypatch):
    monkeypatch.chdir(base_path.parent)
    _export(load_base(base_path.name), "t2i_adapter", tmp_path / "ad", base_name=base_path.name)
    monkeypatch.chdir(tmp_path)
    assert not Path(base_path.name).exists()
    pipe = load_adapter(tmp_path / "ad")
    assert pipe.condistill_config["base_name_or_path"] == base_path.name
    assert pipe.condistill_config["base_resolved_path"] == str(base_path.resolve())


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_adapter_files_are_refused(kind, how, exports, tmp_path, monkeypatch):
    """A deleted, extra or NaN tensor, a pickle where the safetensors file should be, a config whose
    kind does not match its files or is unknown: one AdapterWeightsError naming it, no pickle loaded."""
    root, _ = exports
    folder = shutil.copytree(root / kind, tmp_path / kind)
    phrases = damage(folder, how)
    forbid_pickle_loading(monkeypatch)
    with pytest.raises(AdapterWeightsError) as info:
        load_adapter(folder)
    assert_names(info.value, phrases)


@pytest.mark.parametrize("how", ["pickle_only", "mismatched_kind", "unknown_kind"])
def test_file_damage_is_found_before_the_base_is_loaded(how, exports, tmp_path, monkeypatch):
    import condistill.pipeline

    root, _ = exports
    folder = shutil.copytree(root / "lora", tmp_path / "lora")
    phrases = damage(folder, how)

    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter's files were checked")

    monkeypatch.setattr(condistill.pipeline, "_load_base_pipeline", no_base)
    with pytest.raises(AdapterWeightsError) as info:
        load_adapter(folder)
    assert_names(info.value, phrases)


@pytest.mark.parametrize("how", ["deleted_tensor", "nan_tensor"])
def test_a_refused_lora_leaves_the_given_pipeline_untouched(how, exports, base_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    root, _ = exports
    sd = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    for component in ("lora", "t2i_adapter"):
        folder = shutil.copytree(root / "lora", tmp_path / component)
        phrases = damage(folder, how, component=component)
        with pytest.raises(AdapterWeightsError) as info:
            load_adapter(sd, folder)
        assert_names(info.value, phrases)
        assert not getattr(sd.unet, "peft_config", None)  # no LoRA injected
    assert type(load_adapter(sd, root / "lora")).__name__ == "StableDiffusionAdapterPipeline"


def test_module_config_that_does_not_match_its_weights(exports, tmp_path):
    """The diffusers folder's own config.json is what from_pretrained builds: it must fit the file too."""
    root, _ = exports
    folder = shutil.copytree(root / "t2i_adapter", tmp_path / "t2i_adapter")
    file = folder / "t2i_adapter" / "config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps(dict(config, num_res_blocks=config["num_res_blocks"] + 1)))
    with pytest.raises(AdapterWeightsError, match="t2i_adapter/config.json changed since export"):
        load_adapter(folder)
    rehash(folder)
    with pytest.raises(AdapterWeightsError, match="missing key"):
        load_adapter(folder)
    file.unlink()
    rehash(folder)
    with pytest.raises(AdapterWeightsError, match="has no config.json"):
        load_adapter(folder)


def test_lora_metadata_must_match_the_config(exports, tmp_path):
    """diffusers builds the LoRA from the file's metadata: rank/alpha/targets there must be the config's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root, _ = exports
    folder = shutil.copytree(root / "lora", tmp_path / "lora")
    file = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta = json.loads(metadata["lora_adapter_metadata"])
    meta["unet.target_modules"] = meta["unet.target_modules"] + ["conv1"]
    save_file(state, file, metadata=dict(metadata, lora_adapter_metadata=json.dumps(meta)))
    rehash(folder)
    with pytest.raises(AdapterWeightsError, match="was trained with target_modules=.*conv1"):
        load_adapter(folder)


def _no_base(monkeypatch):
    import condistill.pipeline

    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter's config and files were checked")

    monkeypatch.setattr(condistill.pipeline, "_load_base_pipeline", no_base)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_config_that_cannot_be_trusted_is_refused_before_the_base_loads(case, exports, tmp_path, monkeypatch):
    """pipe.condistill_config never says resolution -64: the pipeline is not built."""
    from condistill.adapters.errors import AdapterConfigError

    root, _ = exports
    folder = shutil.copytree(root / "controlnet", tmp_path / "ad")
    edit, phrase = BAD_CONFIGS[case]
    edit_export(folder, {**edit, "condition_config": edit.get("condition_config", {})})
    _no_base(monkeypatch)
    with pytest.raises(AdapterConfigError) as info:
        load_adapter(folder)
    assert phrase in str(info.value) and str(folder / "condistill_config.json") in str(info.value)


def test_a_one_bit_flip_is_refused_before_the_base_loads(exports, tmp_path, monkeypatch):
    root, _ = exports
    folder = shutil.copytree(root / "lora", tmp_path / "ad")
    file = folder / "pytorch_lora_weights.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    _no_base(monkeypatch)
    with pytest.raises(AdapterWeightsError, match=f"{file} changed since export: damaged or edited; re-export or "
                                                  "re-download"):
        load_adapter(folder)


def test_an_export_from_before_checksums_loads_with_one_warning_line(exports, tmp_path):
    root, _ = exports
    folder = shutil.copytree(root / "t2i_adapter", tmp_path / "ad")
    config = json.loads((folder / "condistill_config.json").read_text())
    del config["checksums"]
    (folder / "condistill_config.json").write_text(json.dumps(dict(config, schema_version=2)))
    with pytest.warns(UserWarning) as caught:
        pipe = load_adapter(folder)
    said = [w for w in caught if "checksums" in str(w.message)]
    assert len(said) == 1 and "\n" not in str(said[0].message) and Path(said[0].filename).name == "test_pipeline.py"
    assert str(said[0].message).startswith(f"{folder} has no checksums")
    assert "checksums" not in pipe.condistill_config and pipe.condistill_config["schema_version"] == 2


def test_a_resolution_the_base_cannot_use_is_refused(tmp_path):
    from diffusers import StableDiffusionPipeline

    from condistill.adapters.errors import AdapterConfigError

    path = make_tiny_base(tmp_path, block_out_channels=(32, 32, 64, 64), name="deep")  # sides: multiples of 16
    _export(load_base(path), "controlnet", tmp_path / "ad")
    edit_export(tmp_path / "ad", {"resolution": 24, "height": 24, "width": 24})
    with pytest.raises(AdapterConfigError, match="resolution = 24 cannot be used with the base"):
        load_adapter(tmp_path / "ad")
    sd = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    with pytest.raises(AdapterConfigError, match="multiples of 16"):
        load_adapter(sd, tmp_path / "ad")


def test_a_base_whose_prediction_type_differs_is_refused(exports, tmp_path):
    root, _ = exports
    v_base = make_tiny_base(tmp_path, prediction_type="v_prediction", name="v_base")
    with pytest.raises(ValueError, match="Base mismatch.*prediction_type: 'epsilon' != 'v_prediction'"):
        load_adapter(root / "controlnet", base=v_base)


def test_run_folders_old_and_new_and_an_interrupted_swap(exports, tmp_path):
    root, _ = exports
    run = shutil.copytree(root / "controlnet", tmp_path / "run")  # written before adapter/: at the root
    assert type(load_adapter(run)).__name__ == PIPELINE_CLASS["controlnet"]
    shutil.copytree(root / "lora", run / "adapter")  # adapter/ is preferred
    assert load_adapter(run).condistill_config["kind"] == "lora"
    (run / "adapter").rename(run / ".old-adapter")  # caught between the two renames of a new export
    with pytest.warns(UserWarning, match="reading the previous export"):
        assert load_adapter(run / "adapter").condistill_config["kind"] == "lora"
    assert load_adapter(run).condistill_config["kind"] == "controlnet"  # the folder's own export comes first

