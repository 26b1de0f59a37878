"""Record what ComfyUI's own code makes of our exports and of its LCM sampling nodes, as test fixtures.

    python tools/comfyui_fixtures.py --comfyui PATH_TO_COMFYUI_CHECKOUT [--out tests/publish/fixtures/comfyui]

ComfyUI is not a dependency of condistill and never runs in CI: this script runs once against a checkout
(its Python dependencies importable beside ours, CPU only), and the tests compare our code against the
committed fixtures:

* ``t2i.json`` + ``t2i_features.safetensors``: for every adapter case of :func:`t2i_cases` (deterministic
  weights), our original-layout export (:func:`condistill.publish.t2i_layout.t2i_original_state_dict`)
  loaded by ComfyUI's T2I-Adapter loader: the keys its network has, the missing and unexpected keys, and its
  features for a fixed control image, in the order they are computed.
* ``controlnet.json`` + ``controlnet_residuals.safetensors``: the same for our single-file ControlNet export
  (:func:`controlnet_case`) and ComfyUI's ControlNet loader: keys, and its residuals on fixed inputs.
* ``controlnet_sdxl.json``: ComfyUI's ControlNet loader on an SDXL-shaped ControlNet in diffusers' layout (our
  SDXL export): the keys it leaves unused and the keys of its network left missing.
* ``lora.json``: ComfyUI's LoRA loader on our kohya export (:func:`lora_case`): which keys it uses and, for every
  UNet weight it patches (named through its own ldm/diffusers map), the change it computes.
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


def _fill(module: torch.nn.Module, seed: int) -> torch.Generator:
    """Give every parameter of ``module`` deterministic non-zero values (unit-scale outputs per layer); returns the
    generator, to draw the inputs from next."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            fan_in = max(1, param[0].numel()) if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
    return gen


def t2i_case(name: str):
    """The diffusers ``T2IAdapter`` of case ``name`` with deterministic non-zero weights, its config, and the
    control image it is run on."""
    from diffusers import T2IAdapter

    config = T2I_CASES[name]
    adapter = T2IAdapter(**config).eval()
    gen = _fill(adapter, 1234)
    control = torch.rand(1, config["in_channels"], CONTROL_SIZE, CONTROL_SIZE, generator=gen)
    return adapter, dict(adapter.config), control


def t2i_cases():
    """Every case of :data:`T2I_CASES` (name, adapter, config, control)."""
    return [(name, *t2i_case(name)) for name in T2I_CASES]


#: a narrow SD 1.5-shaped ControlNet: the widths, cross-attention (768, 8 heads) and hint block ComfyUI's detection
#: matches to SD 1.5, with two levels and one layer each to keep it small
CONTROLNET_CASE = dict(block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       layers_per_block=1, cross_attention_dim=768, attention_head_dim=8, in_channels=4,
                       conditioning_embedding_out_channels=(16, 32, 96, 256))


def controlnet_case():
    """The diffusers ``ControlNetModel`` of :data:`CONTROLNET_CASE` with deterministic weights (zero convolutions
    included, so every output is non-zero), its config, and the inputs it is run on: ``(latents, timesteps, text,
    control image)``."""
    from diffusers import ControlNetModel

    model = ControlNetModel(**CONTROLNET_CASE).eval()
    gen = _fill(model, 4321)
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([499]), torch.randn(1, 8, 768, generator=gen),
              torch.rand(1, 3, 64, 64, generator=gen))
    return model, dict(model.config), inputs


def record_controlnet(out: Path) -> None:
    """ComfyUI's ControlNet loader on our single-file (ldm) export of :func:`controlnet_case`: its keys, the missing
    and unexpected ones, and its residuals (down blocks in order, then the mid block)."""
    import comfy.controlnet
    from safetensors.torch import save_file

    from condistill.publish.controlnet_layout import LDM_CONTROLNET_PREFIX, controlnet_ldm_state_dict

    model, config, (z, t, text, hint) = controlnet_case()
    state = controlnet_ldm_state_dict(model.state_dict(), config)
    loaded = comfy.controlnet.load_controlnet_state_dict(dict(state))
    network = loaded.control_model.float().eval()
    wanted = {LDM_CONTROLNET_PREFIX + k for k in network.state_dict()}
    with torch.no_grad():
        result = network(z, hint, t, text)
    residuals = list(result["output"]) + list(result["middle"])
    entry = {"network": type(network).__name__, "keys": sorted(wanted), "missing": sorted(wanted - set(state)),
             "unexpected": sorted(set(state) - wanted), "residuals": len(residuals)}
    (out / "controlnet.json").write_text(json.dumps(entry, indent=1) + "\n")
    save_file({f"residual.{i}": r.contiguous() for i, r in enumerate(residuals)},
              str(out / "controlnet_residuals.safetensors"))


def sdxl_controlnet_keys() -> dict[str, tuple[int, ...]]:
    """The keys and shapes of an SDXL-base-1.0-shaped ControlNet as condistill builds it (``from_unet``, SD's hint
    block), on the meta device: nothing is allocated."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sd_components import SDXL_UNET

    with torch.device("meta"):
        model = ControlNetModel.from_unet(UNet2DConditionModel(**SDXL_UNET),
                                          conditioning_embedding_out_channels=(16, 32, 96, 256))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def record_controlnet_sdxl(out: Path) -> None:
    """ComfyUI's ControlNet loader on an SDXL ControlNet in diffusers' key layout (our SDXL export): which of our keys
    it takes, and which keys of its network stay missing (zero weights: only the names and shapes matter)."""
    import comfy.controlnet

    shapes = sdxl_controlnet_keys()
    data = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in shapes.items()}
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        loaded = comfy.controlnet.load_controlnet_state_dict(data)  # takes the keys it converts out of ``data``
    finally:
        logging.getLogger().removeHandler(handler)
    missing = [m for m in messages if m.startswith("missing controlnet keys")]
    entry = {"network": type(loaded.control_model).__name__, "keys": len(shapes), "leftover": sorted(data),
             "missing": missing, "messages": [m for m in messages if "controlnet" in m.lower()][:5]}
    (out / "controlnet_sdxl.json").write_text(json.dumps(entry, indent=1) + "\n")


#: a narrow SD 1.5-shaped UNet for the LoRA case (attention on the first level only, as in SD's last level)
LORA_UNET = dict(block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=768,
                 attention_head_dim=8)
#: the same UNet in ComfyUI's terms (what its detection reads from an SD 1.5 checkpoint of this shape)
LORA_UNET_COMFY = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
                   "channel_mult": [1, 2], "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0],
                   "transformer_depth_middle": 1, "context_dim": 768, "use_linear_in_transformer": False}


def lora_case():
    """A LoRA student (rank 2, alpha 3, every target) of the :data:`LORA_UNET` UNet with deterministic non-zero LoRA
    weights: ``(the UNet's own weights, the kohya state dict, {diffusers module: its weight change})``."""
    from diffusers import UNet2DConditionModel

    from condistill.adapters import build_student
    from condistill.publish.formats import kohya_lora_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**LORA_UNET).eval()
    weights = {k: v.clone() for k, v in unet.state_dict().items()}  # before the LoRA layers wrap them
    student = build_student("lora", unet, 3, vae_scale_factor=8, rank=2, lora_alpha=3, targets="all")
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, param in sorted(student.trainable_named_parameters().items()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft = student.lora_state_dict()
    kohya = kohya_lora_state_dict({f"unet.{k}": v for k, v in peft.items()}, 3.0)
    deltas = {}
    for key, down in peft.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            up = peft[module + ".lora_B.weight"]
            change = (up.flatten(1) @ down.flatten(1)) * (3.0 / down.shape[0])
            deltas[module] = change.reshape(up.shape[0], *down.shape[1:])
    return weights, kohya, deltas


class _UNetState:
    """The little of a ComfyUI model its LoRA key map reads: the ldm state dict keys and the UNet config."""

    def __init__(self, keys, unet_config):
        self.keys, self.model_config = keys, type("C", (), {"unet_config": unet_config})()

    def state_dict(self):
        return dict.fromkeys(self.keys)


def record_lora(out: Path) -> None:
    """ComfyUI's LoRA loader on our kohya export of :func:`lora_case`: which keys it uses, which UNet weight each
    patches (by diffusers name, through ComfyUI's own ldm <-> diffusers map), and the weight change it computes."""
    import comfy.lora
    import comfy.utils

    weights, kohya, _ = lora_case()
    # diffusers key -> ldm key (its map also names class/add embeddings, which this UNet has not)
    to_ldm = {k: v for k, v in comfy.utils.unet_to_diffusers(LORA_UNET_COMFY).items() if k in weights}
    assert set(to_ldm) == set(weights), sorted(set(weights) - set(to_ldm))[:5]  # the config describes this UNet
    from_ldm = {"diffusion_model." + v: k for k, v in to_ldm.items()}
    key_map = comfy.lora.model_lora_keys_unet(_UNetState(list(from_ldm), LORA_UNET_COMFY), {})
    patches = comfy.lora.load_lora(dict(kohya), key_map, log_missing=False)
    used = set()
    entries = {}
    for ldm_key, patch in patches.items():
        diffusers_key = from_ldm[ldm_key]
        weight = weights[diffusers_key].clone()
        patched = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight.clone(), ldm_key)
        change = (patched - weight).double()
        entries[diffusers_key[: -len(".weight")]] = {"sum": change.sum().item(), "abs_sum": change.abs().sum().item(),
                                                     "first": change.flatten()[:8].tolist()}
        used.update(k for k in kohya if k.startswith(patch_name(patch, kohya)))
    record = {"patched": entries, "lora_keys": sorted(kohya), "unused": sorted(set(kohya) - used),
              "diffusers_keys_mapped": len(to_ldm), "unet_weights": len(weights)}
    (out / "lora.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def patch_name(patch, kohya) -> str:
    """The kohya module name a ComfyUI LoRA patch was built from (its up weight is one of the file's tensors)."""
    up = patch.weights[0]
    for key, tensor in kohya.items():
        if key.endswith(".lora_up.weight") and tensor.data_ptr() == up.data_ptr():
            return key[: -len(".lora_up.weight")] + "."
    raise KeyError("patch from no kohya module")


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
    record_controlnet(args.out)
    record_lora(args.out)
    record_controlnet_sdxl(args.out)
    record_sampling(args.out)
    record_nodes(args.out)
    (args.out / "SOURCE.json").write_text(json.dumps({"comfyui_commit": args.commit or _commit(comfyui),
                                                     "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
