"""Our exports and sampler against what ComfyUI's own code computes, recorded by tools/comfyui_fixtures.py.

The fixtures come from a ComfyUI checkout (its commit in fixtures/comfyui/SOURCE.json); ComfyUI itself is not
installed here. Rerun the tool after a change to the T2I-Adapter layout or the cases, and commit its output.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_fixtures import T2I_CASES, t2i_case

from condistill.method.schedule import (alpha_sigma, boundary_scalings, make_alphas_cumprod, sampling_timesteps,
                                        skip_grid)
from condistill.publish.comfyui import BASE_PLACEHOLDER, is_ours, ksampler_timesteps, workflow
from condistill.publish.t2i_layout import loader_problem, t2i_original_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "comfyui"
T2I = json.loads((FIXTURES / "t2i.json").read_text())
SAMPLING = json.loads((FIXTURES / "sampling.json").read_text())


def test_fixtures_name_their_comfyui_commit_and_cover_every_case():
    source = json.loads((FIXTURES / "SOURCE.json").read_text())
    assert len(source["comfyui_commit"]) == 40
    assert set(T2I) == set(T2I_CASES)


@pytest.mark.parametrize("name", sorted(T2I_CASES))
def test_t2i_export_loads_in_comfyui_and_computes_what_diffusers_computes(name):
    """Every key of our original-layout file is one ComfyUI's network has, and none is missing; its features on
    the same control image equal diffusers' from the run's folder to float32 rounding."""
    adapter, config, control = t2i_case(name)
    recorded = T2I[name]
    problem = loader_problem(config)
    assert recorded["loaded"] == (problem is None), (recorded.get("error"), problem)
    if problem is not None:  # our check names what ComfyUI's strict loader refuses
        assert "residual blocks" in problem and "Missing key" in recorded["error"]
        return
    state = t2i_original_state_dict(adapter.state_dict(), config)
    assert sorted(state) == recorded["keys"] and not recorded["missing"] and not recorded["unexpected"]
    assert recorded["input_channels"] == config["in_channels"] and recorded["compression_ratio"] == 8
    comfy = load_file(str(FIXTURES / "t2i_features.safetensors"))
    with torch.no_grad():
        ours = adapter(control)
    assert len(ours) == recorded["features"]
    for i, feature in enumerate(ours):
        theirs = comfy[f"{name}.{i}"]
        assert feature.shape == theirs.shape
        scale = theirs.abs().max().item()
        difference = (feature - theirs).abs().max().item()
        print(f"{name} feature {i}: largest difference {difference / scale:.2e} of the largest value")
        assert scale > 1e-3 and difference <= 1e-5 * scale, (i, scale)


def test_original_layout_is_a_renaming():
    """Each case's tensors map one to one, unchanged, and unknown keys are refused."""
    for name in T2I_CASES:
        adapter, config, _ = t2i_case(name)
        state = adapter.state_dict()
        original = t2i_original_state_dict(state, config)
        assert len(original) == len(state)
        assert sorted(t.sum().item() for t in original.values()) == sorted(t.sum().item() for t in state.values())
    with pytest.raises(ValueError, match="has no place in the original full_adapter layout"):
        t2i_original_state_dict({"adapter.body.0.out_conv.weight": torch.zeros(1)}, {"adapter_type": "full_adapter"})
    with pytest.raises(ValueError, match="adapter_type 'other' has no original single-file layout"):
        t2i_original_state_dict({}, {"adapter_type": "other"})


def test_loader_problem_names_each_misfit():
    light = T2I_CASES["light-sd15"]
    assert loader_problem(light) is None
    assert "VAE factor is 4" in loader_problem(dict(light, downscale_factor=4))
    assert "4 channels" in loader_problem(dict(light, in_channels=4))
    assert "widths [32, 64, 128]" in loader_problem(dict(light, channels=[32, 64, 128]))
    full = T2I_CASES["full-sd-small"]
    assert loader_problem(full) is None and loader_problem(T2I_CASES["full-sdxl-small"]) is None
    assert "3 residual blocks" in loader_problem(dict(full, num_res_blocks=3))
    assert "[c, 2c, 4c, 4c]" in loader_problem(dict(full, channels=[32, 64, 128]))


def test_the_lora_students_default_light_adapter_is_the_one_comfyui_builds():
    """On SD 1.x/2.x widths the LoRA student's condition adapter is the light adapter the webui loaders build."""
    from diffusers import UNet2DConditionModel

    from condistill.adapters.t2i_adapter import AUTO_ADAPTER_TYPES, make_t2i_adapter, resolve_adapter_type

    with torch.device("meta"):  # SD 1.5's widths and down path; only its structure is read
        sd15 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    kind = resolve_adapter_type(sd15, "auto", ("light_adapter", *AUTO_ADAPTER_TYPES))
    adapter = make_t2i_adapter(sd15, 3, 8, kind)
    assert kind == "light_adapter" and loader_problem(dict(adapter.config)) is None


# ---------------------------------------------------------------------- sampling
GRID = skip_grid(1000, 50)


def _start(denoise: float) -> int | None:
    """The grid timestep a KSampler denoise value starts at, when it is one (50 * denoise points of the grid)."""
    points = 50 * denoise
    return None if denoise >= 1 else (int(GRID[int(points) - 1]) if points == int(points) else None)


def test_comfyui_lcm_grid_is_our_training_grid():
    assert SAMPLING["timesteps"] == GRID.tolist()


ON_GRID = sorted(k for k in SAMPLING["schedules"] if float(k.split("@")[1]) >= 1 or _start(float(k.split("@")[1])))


def test_fixtures_hold_starts_on_and_between_grid_points():
    assert len(ON_GRID) == 24 and len(SAMPLING["schedules"]) == 32


@pytest.mark.parametrize("key", ON_GRID)
def test_ksampler_simple_schedule_gives_our_timesteps(key):
    """KSampler (sampler lcm, scheduler simple) on the "lcm" model sampling visits exactly our sampling
    timesteps, from pure noise (denoise 1) and from a grid start (denoise = its share of the grid)."""
    steps, denoise = key.split("@")
    recorded = SAMPLING["schedules"][key]
    assert recorded["sigmas"][-1] == 0.0 and len(recorded["timesteps"]) == int(steps)
    assert sampling_timesteps(GRID, int(steps), _start(float(denoise))).tolist() == recorded["timesteps"]


def test_lcm_scalings_and_renoising_are_ours():
    """c_out equals ours; ComfyUI's c_skip multiplies its unscaled input z / a_t where ours multiplies z, a
    difference below 1e-5 of z on every grid point; its re-noised model input is ours, a_t x0 + s_t n."""
    t = GRID
    c_skip, c_out = (x.flatten() for x in boundary_scalings(t))
    assert torch.allclose(torch.tensor(SAMPLING["c_out"]), c_out, rtol=1e-5, atol=0)
    comfy_c_skip = torch.tensor(SAMPLING["c_out_plus_c_skip"]) - torch.tensor(SAMPLING["c_out"])
    assert comfy_c_skip.abs().max() < 1e-5 and c_skip.max() < 1e-5
    a, s = (x.flatten() for x in alpha_sigma(make_alphas_cumprod(), t))
    assert (c_skip * (1 / a - 1)).abs().max() < 1e-5  # the skip terms' difference, per unit of z
    probe = SAMPLING["renoise_probe"]
    assert torch.allclose(torch.tensor(probe["model_input"]), a * probe["x0"] + s * probe["noise"], rtol=1e-5,
                          atol=1e-6)


# ---------------------------------------------------------------------- workflows
NODES = json.loads((FIXTURES / "nodes.json").read_text())
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "prediction_type": "epsilon", "stochastic": True, "sigma_data": 0.5,
                "timestep_scaling": 10.0, "num_grid": 50, "rescale_betas_zero_snr": False, "trained_betas": None}


def _config(**changes):
    config = {"base_name_or_path": "someone/sd15", "kind": "controlnet", "condition_name": "edge",
              "adapter_options": {"condition_channels": 3}, "num_grid": 50, "prediction_type": "epsilon",
              "recommended_steps": 4, "recommended_guidance": 1.0, "resolution": 512, "height": 512, "width": 512,
              "one_step_start": None}
    config.update(changes)
    return config


@pytest.mark.parametrize("key", sorted(SAMPLING["schedules"]))
def test_our_statement_of_ksamplers_schedule_matches_comfyui(key):
    steps, denoise = key.split("@")
    assert ksampler_timesteps(int(steps), float(denoise)) == SAMPLING["schedules"][key]["timesteps"]


def _check_against_comfyui(nodes: dict) -> None:
    """Every node is a core node with exactly its required inputs (optional ones allowed), every link points
    at an existing node's output, and the choices are ones ComfyUI offers."""
    for node_id, node in nodes.items():
        spec = NODES["nodes"][node["class_type"]]
        inputs = set(node["inputs"])
        assert set(spec["required"]) <= inputs <= set(spec["required"]) | set(spec["optional"]), node_id
        for value in node["inputs"].values():
            if isinstance(value, list):
                source, index = value
                assert source in nodes and index < len(NODES["nodes"][nodes[source]["class_type"]]["outputs"])
    sampler = next(n["inputs"] for n in nodes.values() if n["class_type"] == "KSampler")
    assert sampler["sampler_name"] in NODES["samplers"] and sampler["scheduler"] in NODES["schedulers"]
    sampling = next(n["inputs"] for n in nodes.values() if n["class_type"] == "ModelSamplingDiscrete")
    assert sampling["sampling"] in NODES["nodes"]["ModelSamplingDiscrete"]["choices"]["sampling"]
    assert is_ours(nodes)


@pytest.mark.parametrize("steps,start,latent,denoise", [
    (4, None, "EmptyLatentImage", 1.0),
    (2, None, "EmptyLatentImage", 1.0),
    (1, {"timestep": 999, "from": "noise"}, "EmptyLatentImage", 1.0),
    (1, {"timestep": 499, "from": "zero"}, "EmptyLatentImage", 0.5),
    (1, 199, "EmptyLatentImage", 0.2),  # a bare timestep, as older exports record it (edge: from zero)
    (1, {"timestep": 499, "from": "input"}, "VAEEncode", 0.5),
])
def test_workflow_samples_the_students_timesteps(steps, start, latent, denoise):
    nodes, why = workflow(_config(recommended_steps=steps, one_step_start=start), SD_SCHEDULER,
                          {"controlnet": "student.safetensors"})
    assert why is None
    _check_against_comfyui(nodes)
    sampler = next(n["inputs"] for n in nodes.values() if n["class_type"] == "KSampler")
    assert (sampler["steps"], sampler["denoise"], sampler["cfg"]) == (steps, denoise, 1.0)
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("lcm", "simple")
    assert nodes[sampler["latent_image"][0]]["class_type"] == latent
    first = (start if isinstance(start, int) else (start or {}).get("timestep")) if denoise < 1 else None
    assert ksampler_timesteps(steps, denoise) == sampling_timesteps(GRID, steps, first).tolist()
    assert nodes["1"]["inputs"]["ckpt_name"] == BASE_PLACEHOLDER and "LoraLoaderModelOnly" not in str(nodes)


def test_lora_workflow_loads_the_lora_and_its_adapter():
    nodes, why = workflow(_config(kind="lora"), SD_SCHEDULER, {"lora": "s.safetensors", "controlnet": "a.safetensors"})
    assert why is None
    _check_against_comfyui(nodes)
    lora = next(n for n in nodes.values() if n["class_type"] == "LoraLoaderModelOnly")["inputs"]
    assert lora["lora_name"] == "s.safetensors" and lora["strength_model"] == 1.0
    sampler = next(n["inputs"] for n in nodes.values() if n["class_type"] == "KSampler")
    assert nodes[sampler["model"][0]]["class_type"] == "LoraLoaderModelOnly"


@pytest.mark.parametrize("changes,scheduler,reason", [
    ({"base_name_or_path": "embedded:tiny-teacher"}, {}, "embedded teacher"),
    ({"prediction_type": "v_prediction"}, {}, "predicts v_prediction"),
    ({"num_grid": 25}, {}, "25-point grid"),
    ({"adapter_options": {"condition_channels": 4}}, {}, "4 channels"),
    ({"adapter_options": {"condition_channels": 1}}, {}, "1 channels"),  # a ControlNet; a T2I-Adapter takes gray
    ({}, {"stochastic": False}, "deterministic re-noising"),
    ({}, {"beta_schedule": "linear"}, "is not SD's"),
    ({}, {"timestep_scaling": 5.0}, "boundary scalings"),
])
def test_students_comfyui_cannot_sample_get_no_workflow_and_the_reason(changes, scheduler, reason):
    nodes, why = workflow(_config(**changes), dict(SD_SCHEDULER, **scheduler), {"controlnet": "c.safetensors"})
    assert nodes is None and reason in why


def test_controlnet_export_loads_in_comfyui_and_computes_what_diffusers_computes():
    """ComfyUI's ControlNet loader finds every key of our single-file export and nothing else, and its residuals
    on the same inputs equal diffusers' from the run's folder within 1e-5 of their largest value (measured: 5.6e-7)."""
    from comfyui_fixtures import controlnet_case

    from condistill.publish.controlnet_layout import controlnet_ldm_state_dict

    recorded = json.loads((FIXTURES / "controlnet.json").read_text())
    model, config, (z, t, text, hint) = controlnet_case()
    state = controlnet_ldm_state_dict(model.state_dict(), config)
    assert sorted(state) == recorded["keys"] and not recorded["missing"] and not recorded["unexpected"]
    comfy = load_file(str(FIXTURES / "controlnet_residuals.safetensors"))
    with torch.no_grad():
        down, mid = model(z, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
    ours = [*down, mid]
    assert len(ours) == recorded["residuals"]
    for i, residual in enumerate(ours):
        theirs = comfy[f"residual.{i}"]
        scale = theirs.abs().max().item()
        assert residual.shape == theirs.shape and scale > 1e-3
        difference = (residual - theirs).abs().max().item()
        print(f"ControlNet residual {i}: largest difference {difference / scale:.2e} of the largest value")
        assert difference <= 1e-5 * scale, (i, difference, scale)


def test_kohya_lora_is_used_whole_by_comfyui_and_changes_what_peft_changes():
    """ComfyUI's LoRA loader uses every key of our kohya file, patches exactly the UNet weights our LoRA targets
    (named through its own ldm/diffusers map), and changes each by what the LoRA adds in diffusers/peft."""
    from comfyui_fixtures import lora_case

    recorded = json.loads((FIXTURES / "lora.json").read_text())
    _, kohya, deltas = lora_case()
    assert sorted(kohya) == recorded["lora_keys"] and not recorded["unused"]
    assert recorded["diffusers_keys_mapped"] == recorded["unet_weights"]
    assert set(recorded["patched"]) == set(deltas) and len(deltas) == 69
    for module, change in deltas.items():
        theirs = recorded["patched"][module]
        change = change.double()
        assert change.abs().sum().item() == pytest.approx(theirs["abs_sum"], rel=1e-5), module
        assert change.sum().item() == pytest.approx(theirs["sum"], rel=1e-4, abs=1e-4 * theirs["abs_sum"]), module
        assert torch.allclose(change.flatten()[:8].float(), torch.tensor(theirs["first"]).float(), rtol=1e-5,
                              atol=1e-7), module


@pytest.mark.slow
def test_sdxl_controlnet_in_diffusers_layout_loads_in_comfyui_whole():
    """Our SDXL ControlNet export is the diffusers state dict as it is (tests/test_sdxl.py); on an SDXL-base-1.0-shaped
    ControlNet, ComfyUI's loader took every one of its keys and left none of its network's missing."""
    from comfyui_fixtures import sdxl_controlnet_keys

    recorded = json.loads((FIXTURES / "controlnet_sdxl.json").read_text())
    assert recorded["network"] == "ControlNet" and recorded["keys"] == len(sdxl_controlnet_keys()) == 844
    assert recorded["leftover"] == [] and recorded["missing"] == []


def test_one_channel_t2i_adapters_get_a_workflow_and_a_folder_in_the_way_is_kept(tmp_path):
    """ComfyUI's T2I-Adapter node averages the RGB control image to gray; its ControlNet node does not."""
    from condistill.publish.comfyui import write_workflow

    nodes, why = workflow(_config(kind="t2i_adapter", adapter_options={"condition_channels": 1}), SD_SCHEDULER,
                          {"controlnet": "a.safetensors"})
    assert why is None and nodes
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    (tmp_path / "s_comfyui.json").mkdir()
    path, note = write_workflow(tmp_path, _config(), tmp_path / "s.safetensors", {"controlnet": "s.safetensors"},
                                overwrite=True)
    assert path is None and "is a folder" in note and (tmp_path / "s_comfyui.json").is_dir()
