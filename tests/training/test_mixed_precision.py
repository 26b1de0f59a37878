"""The GPU presets' dtype layout, run on the CPU in bf16 (CPU autocast).

The frozen base is loaded in bf16; the adapter, its EMA and the fake-score LoRA stay float32
masters; every forward of a step (online, EMA ODE and target, the teacher's real score, the fake
score and its update) and of validation sampling runs inside autocast, so each model call
computes in bf16. Gradient checkpointing is on, as in the presets (except for a LoRA student with
distribution matching, which the configuration refuses). Each case trains one step at a
resolution other than the base's native one, resumes to a second step, exports, and the stock
pipeline from ``load_adapter`` samples 4 steps at the run's resolution.
"""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open

from condistill.training.loop import distill
from helpers import make_tiny_base, make_tiny_sdxl_base, tiny_run_config, torch_single_thread  # noqa: F401

#: the model classes whose every forward must compute in bf16
HEAVY = ("UNet2DConditionModel", "ControlNetModel", "T2IAdapter")
#: the blocks gradient checkpointing wraps (their autocast state is checked wherever they run)
BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")
#: function name on the call stack -> the part of the step (or of validation) a forward belongs to
PHASES = {"online": "online", "ema_fn": "ema", "teacher_fn": "teacher", "dmd_gradient": "real and fake scores",
          "update": "fake-score update", "_validate": "validation", "checkpoint": "checkpointed block",
          "backward": "recomputed in backward"}

#: bf16 against fp32 on one fixed batch, same weights: the mean loss agrees within this relative
#: tolerance (measured differences, on these tiny bases and the embedded teacher, with
#: benchmarks/bf16_vs_fp32.py: docs/mixed-precision.md).
LOSS_RTOL = 0.01


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-bases")
    return {"sd": str(make_tiny_base(root)), "sdxl": str(make_tiny_sdxl_base(root))}


class ForwardLog:
    """A global forward hook recording, for every heavy model call, its phase, autocast state and output dtype."""

    def __init__(self):
        self.calls: list[tuple[str, str, bool, torch.dtype, torch.dtype]] = []

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args, output):
        name = type(module).__name__
        if name not in HEAVY + BLOCKS:
            return
        phase, frame = "other", sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name in PHASES:
                phase = PHASES[frame.f_code.co_name]
                break
            frame = frame.f_back
        if name in BLOCKS and phase not in ("checkpointed block", "recomputed in backward"):
            return
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if isinstance(out, (tuple, list)):  # a T2I-Adapter returns its feature list
            out = out[0]
        # a block's own output may be float32 (autocast runs group norm in float32): its autocast state counts
        dtype = torch.bfloat16 if name in BLOCKS else out.dtype
        self.calls.append((name, phase, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), dtype))


def _dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


#: a training resolution other than each base's native one (tiny SD: 16 px, tiny SDXL: 64 px)
RESOLUTION = {"sd": 24, "sdxl": 32}
CASES = [(b, a, l) for b in ("sd", "sdxl") for a in ("controlnet", "t2i_adapter", "lora") for l in ("codi", "codi+dmd")]


@pytest.fixture(scope="module")
def validation_image(tmp_path_factory):
    """One validation image (bf16 convolutions are slow on CPUs: validation samples this one only)."""
    from condistill.world.scenes import generate_scene

    path = tmp_path_factory.mktemp("validation") / "scene.png"
    generate_scene(0, "heldout").image.save(path)
    return str(path)


@pytest.mark.parametrize("base_name,adapter,loss", CASES)
def test_bf16_trains_resumes_exports_and_samples(bases, validation_image, tmp_path, base_name, adapter, loss):
    from condistill import load_adapter

    out = tmp_path / "run"
    checkpointing = not (adapter == "lora" and loss != "codi")  # refused by the config: see DistillConfig
    size = RESOLUTION[base_name]
    options = dict(adapter=adapter, loss=loss, batch_size=2, resolution=size, mixed_precision="bf16",
                   gradient_checkpointing=checkpointing, guidance_min=1.0, guidance_max=2.0, report_to="none",
                   data="synthetic:train:8", validation_images=[validation_image], validation_prompts=["a red cube"])
    with ForwardLog() as log:
        distill(tiny_run_config(bases[base_name], out, max_steps=1, **options))
    assert log.calls
    wrong = [c for c in log.calls if not (c[2] and c[3] == torch.bfloat16 and c[4] == torch.bfloat16)]
    assert not wrong, f"forwards outside bf16 autocast: {wrong[:5]}"
    phases = {c[1] for c in log.calls}
    expected = {"online", "ema", "validation"} | ({"real and fake scores", "fake-score update"} if loss != "codi"
                                                   else set())
    assert expected <= phases, phases
    if checkpointing:
        assert "checkpointed block" in phases, phases  # checkpointing is on (its recomputation is checked too)

    distill(tiny_run_config(bases[base_name], out, max_steps=2, resume="latest", **options))
    checkpoint = out / "checkpoints" / "step-0000002"
    assert _dtypes(checkpoint / "online.safetensors") == {"F32"} == _dtypes(checkpoint / "ema.safetensors")
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    floats = [t for t in _tensors(state) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)  # optimizer moments, fake score: fp32 masters

    pipe = load_adapter(out)
    assert pipe.condistill_defaults["height"] == pipe.condistill_defaults["width"] == size
    assert pipe.condistill_config["extra"]["steps_trained"] == 2
    control = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    image = pipe("a red cube", image=control, output_type="np", generator=torch.Generator().manual_seed(0),
                 **pipe.condistill_defaults).images
    assert image.shape == (1, size, size, 3) and pipe.scheduler.timesteps.numel() == 4


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


@pytest.fixture(scope="module")
def bf16_vs_fp32():
    """benchmarks/bf16_vs_fp32.py, whose loss comparison this test runs on the tiny test bases."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bf16_vs_fp32.py"
    spec = importlib.util.spec_from_file_location("bf16_vs_fp32", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base_name,adapter,loss", CASES)
def test_bf16_loss_is_close_to_fp32_on_a_fixed_batch(bases, bf16_vs_fp32, base_name, adapter, loss):
    pair = bf16_vs_fp32.loss_pair(bases[base_name], adapter, loss)
    assert pair["master_dtypes"] == {torch.float32} and pair["loss_dtype"] == torch.float32
    fp32, bf16 = pair["fp32"].mean(), pair["bf16"].mean()
    assert torch.isfinite(bf16)
    assert abs(bf16 - fp32) <= LOSS_RTOL * abs(fp32), (float(fp32), float(bf16))
    assert not torch.equal(pair["fp32"], pair["bf16"])  # bf16 really computed something else
