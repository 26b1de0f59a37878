"""Record what ComfyUI's own code makes of our exports and of its LCM sampling nodes, as test fixtures.

    python tools/comfyui_fixtures.py --comfyui PATH_TO_COMFYUI_CHECKOUT [--out tests/publish/fixtures/comfyui]

ComfyUI is not a dependency of condistill and never runs in CI: this script runs once against a checkout
(its Python dependencies importable beside ours, CPU only), and the tests compare our code against the
committed fixtures:

* ``t2i.json`` + ``t2i_features.safetensors``: for every adapter case of :func:`t2i_cases` (deterministic
  weights), our original-layout export (:func:`condistill.publish.t2i_layout.t2i_original_state_dict`)
  loaded by ComfyUI's T2I-Adapter loader: the keys its network has, the missing and unexpected keys, and its
  features for a fixed control image, in the order they are computed.
* ``nodes.json``: the inputs and outputs of the core nodes our workflows use (:data:`NODES`) and
  KSampler's sampler and scheduler names.
* ``sampling.json``: ComfyUI's "lcm" model sampling (the ModelSamplingDiscrete node) on SD's noise schedule:
  its sigma grid, the sigmas its "simple" scheduler gives KSampler for 1-8 steps at several denoise values,
  the UNet timestep of every grid sigma, the boundary scalings c_skip / c_out its LCM denoiser applies, and
  what its LCM sampler feeds the model after re-noising a clean latent.

Everything recorded is computed by calling ComfyUI's functions and nodes on probe inputs; nothing of its
code is copied here.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "publish" / "fixtures" / "comfyui"
#: the control image every T2I case is run on: [1, C, 64, 64] (64 px: four halvings after the 8x unshuffle)
CONTROL_SIZE = 64
#: KSampler denoise values recorded (1.0: from pure noise; others: from a noised image)
DENOISE = (1.0, 0.5, 0.25, 0.2)
MAX_STEPS = 8

#: name -> diffusers T2IAdapter config of one export case; SD 1.5's light adapter (the LoRA student's default
#: condition adapter there), a one-channel one (depth), a small full SD adapter (the T2I-Adapter student's
#: layout), a small SDXL one, and a light adapter with 2 residual blocks, which ComfyUI's loader must refuse
T2I_CASES = {
    "light-sd15": dict(in_channels=3, channels=[320, 640, 1280], num_res_blocks=4, downscale_factor=8,
                       adapter_type="light_adapter"),
    "light-sd15-1ch": dict(in_channels=1, channels=[320, 640, 1280], num_res_blocks=4, downscale_factor=8,
                           adapter_type="light_adapter"),
    "full-sd-small": dict(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=8,
                          adapter_type="full_adapter"),
    "full-sdxl-small": dict(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=16,
                            adapter_type="full_adapter_xl"),
    "light-2-blocks": dict(in_channels=3, channels=[320, 640, 1280], num_res_blocks=2, downscale_factor=8,
                           adapter_type="light_adapter"),
}


def t2i_case(name: str):
    """The diffusers ``T2IAdapter`` of case ``name`` with deterministic non-zero weights, its config, and the
    control image it is run on."""
    from diffusers import T2IAdapter

    config = T2I_CASES[name]
    adapter = T2IAdapter(**config).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, param in sorted(adapter.named_parameters()):
            fan_in = max(1, param[0].numel()) if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    control = torch.rand(1, config["in_channels"], CONTROL_SIZE, CONTROL_SIZE, generator=gen)
    return adapter, dict(adapter.config), control


def t2i_cases():
    """Every case of :data:`T2I_CASES` (name, adapter, config, control)."""
    return [(name, *t2i_case(name)) for name in T2I_CASES]


def _import_comfy(path: Path):
    sys.path.insert(0, str(path))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.controlnet  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy_extras.nodes_model_advanced  # noqa: F401


def record_t2i(out: Path) -> None:
    import comfy.controlnet
    from safetensors.torch import save_file

    from condistill.publish.t2i_layout import t2i_original_state_dict

    report, tensors = {}, {}
    for name, adapter, config, control in t2i_cases():
        state = t2i_original_state_dict(adapter.state_dict(), config)
        try:  # its loader loads strictly: a file that does not fit raises
            loaded = comfy.controlnet.load_t2i_adapter(dict(state))
        except RuntimeError as error:
            report[name] = {"loaded": False, "error": " ".join(str(error).split())[:200]}
            continue
        if loaded is None:
            report[name] = {"loaded": False, "error": "not recognised as a T2I-Adapter"}
            continue
        model = loaded.t2i_model.float().eval()
        wanted = set(model.state_dict())
        entry = {"loaded": True, "network": type(model).__name__, "keys": sorted(wanted),
                 "missing": sorted(wanted - set(state)), "unexpected": sorted(set(state) - wanted),
                 "input_channels": int(loaded.channels_in), "compression_ratio": int(loaded.compression_ratio)}
        if not entry["missing"] and not entry["unexpected"]:
            hint = control if loaded.channels_in == config["in_channels"] else control.mean(1, keepdim=True)
            with torch.no_grad():
                result = model(hint)
            features = [f for f in reversed(result["input"]) if f is not None] + list(result.get("middle", []))
            entry["features"] = len(features)
            for i, feature in enumerate(features):
                tensors[f"{name}.{i}"] = feature.contiguous()
        report[name] = entry
    (out / "t2i.json").write_text(json.dumps(report, indent=1) + "\n")
    save_file(tensors, str(out / "t2i_features.safetensors"))


class _Model:
    """The little of a ComfyUI ModelPatcher the sampling nodes use: its config and its patched objects."""

    def __init__(self, sampling_settings: dict):
        self.model = type("M", (), {"model_config": type("C", (), {"sampling_settings": sampling_settings})()})()
        self.objects = {}

    def clone(self):
        return self

    def add_object_patch(self, name, obj):
        self.objects[name] = obj

    def get_model_object(self, name):
        return self.objects[name]


def record_sampling(out: Path) -> None:
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    # SD 1.x/2.x and SDXL: scaled-linear betas 0.00085 -> 0.012 over 1000 steps (ComfyUI calls it "linear")
    model = ModelSamplingDiscrete().patch(_Model({"beta_schedule": "linear", "linear_start": 0.00085,
                                                  "linear_end": 0.012, "timesteps": 1000}), "lcm", False)[0]
    ms = model.get_model_object("model_sampling")
    grid = ms.sigmas.float()
    record = {"sigmas": grid.tolist(), "timesteps": ms.timestep(grid).tolist(), "schedules": {}}
    for denoise in DENOISE:
        for steps in range(1, MAX_STEPS + 1):
            sampler = comfy.samplers.KSampler(model, steps, "cpu", sampler="lcm", scheduler="simple", denoise=denoise)
            sigmas = sampler.sigmas.float()
            record["schedules"][f"{steps}@{denoise}"] = {"sigmas": sigmas.tolist(),
                                                         "timesteps": ms.timestep(sigmas[:-1]).tolist()}
    # the LCM denoiser at every grid sigma: output = c_out * x0(eps) + c_skip * input; probe both parts
    n = grid.numel()
    x = torch.ones(n, 1, 1, 1)
    zero = torch.zeros(n, 1, 1, 1)
    # eps = 0, input 1: x0 = 1, so the output is c_out + c_skip
    record["c_out_plus_c_skip"] = ms.calculate_denoised(grid, zero, x).flatten().tolist()
    # eps = 1, input 0: x0 = -sigma, so the output is -c_out * sigma
    record["c_out"] = (-ms.calculate_denoised(grid, torch.ones(n, 1, 1, 1), zero).flatten() / grid).tolist()
    # re-noising a clean latent x0 at a grid sigma with noise n, then scaling it for the model (what the UNet sees)
    x0, noise = torch.full((n, 1, 1, 1), 0.7), torch.full((n, 1, 1, 1), -1.3)
    renoised = ms.noise_scaling(grid, noise, x0)
    record["renoise_probe"] = {"x0": 0.7, "noise": -1.3,
                               "model_input": ms.calculate_input(grid, renoised).flatten().tolist()}
    (out / "sampling.json").write_text(json.dumps(record, indent=1) + "\n")


#: the core nodes our workflows use
NODES = ("CheckpointLoaderSimple", "ModelSamplingDiscrete", "LoraLoaderModelOnly", "CLIPTextEncode", "LoadImage",
         "ControlNetLoader", "ControlNetApplyAdvanced", "EmptyLatentImage", "VAEEncode", "KSampler", "VAEDecode",
         "SaveImage")


def record_nodes(out: Path) -> None:
    """The inputs of every node a workflow uses, the options of its choice inputs, and the sampler and
    scheduler names KSampler offers."""
    import comfy.samplers
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    classes = dict(nodes.NODE_CLASS_MAPPINGS, ModelSamplingDiscrete=ModelSamplingDiscrete)
    record = {"nodes": {}, "samplers": list(comfy.samplers.KSampler.SAMPLERS),
              "schedulers": list(comfy.samplers.KSampler.SCHEDULERS)}
    for name in NODES:
        types = classes[name].INPUT_TYPES()
        entry = {part: sorted(types.get(part, {})) for part in ("required", "optional")}
        entry["choices"] = {k: v[0] for k, v in types.get("required", {}).items()
                            if isinstance(v[0], list) and all(isinstance(c, str) for c in v[0])}
        entry["outputs"] = list(getattr(classes[name], "RETURN_TYPES", ()))
        record["nodes"][name] = entry
    (out / "nodes.json").write_text(json.dumps(record, indent=1) + "\n")


def _commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI checkout")
    parser.add_argument("--commit", help="the checkout's commit, when it is not a git work tree [git rev-parse]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the fixture folder [%(default)s]")
    args = parser.parse_args(argv)
    comfyui = args.comfyui.resolve()
    sys.path.insert(0, str(ROOT))  # this checkout's condistill, also from an environment where it is not installed
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    _import_comfy(comfyui)
    args.out.mkdir(parents=True, exist_ok=True)
    record_t2i(args.out)
    record_sampling(args.out)
    record_nodes(args.out)
    (args.out / "SOURCE.json").write_text(json.dumps({"comfyui_commit": args.commit or _commit(comfyui),
                                                     "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
