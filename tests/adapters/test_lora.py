"""LoRA student: small, exact at init, teacher path intact, loadable by stock diffusers LoRA loaders."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import make_tiny_base, model_inputs, perturb_  # noqa: E402

from condistill.adapters import build_student  # noqa: E402
from condistill.base import load_base  # noqa: E402


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("base"))


def test_parameter_budget_vs_controlnet(base_path, capsys):
    lora = build_student("lora", load_base(base_path), 3)
    controlnet = build_student("controlnet", load_base(base_path), 3)
    n_lora, n_cn = lora.num_trainable_parameters(), controlnet.num_trainable_parameters()
    ratio = n_lora / n_cn
    with capsys.disabled():
        print(f"\n[tiny base] lora trainable {n_lora:,} / controlnet {n_cn:,} = {ratio:.1%}")
    assert ratio <= 0.10
    names = lora.trainable_named_parameters()
    assert any(".lora_A." in k for k in names) and any(k.startswith("adapter.") for k in names)
    assert lora.adapter_options["condition_adapter"] == "light_adapter"
    # B starts at zero, A does not (peft default init)
    assert all(torch.count_nonzero(p) == 0 for k, p in names.items() if ".lora_B." in k)
    assert all(torch.count_nonzero(p) > 0 for k, p in names.items() if ".lora_A." in k)


def test_targets(base_path):
    attn = build_student("lora", load_base(base_path), 3)
    everything = build_student("lora", load_base(base_path), 3, targets="all")
    assert not any(".conv1." in k for k in attn.trainable_named_parameters())
    assert any(".resnets.0.conv1.lora_A." in k for k in everything.trainable_named_parameters())
    assert any(".ff.net.2.lora_B." in k for k in everything.trainable_named_parameters())
    with pytest.raises(ValueError, match="targets='mlp'"):
        build_student("lora", load_base(base_path), 3, targets="mlp")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        build_student("lora", load_base(base_path), 3, rank=0)


def test_second_student_on_same_unet_is_refused(base_path):
    base = load_base(base_path)
    build_student("lora", base, 3)
    with pytest.raises(ValueError, match="already carries condistill LoRA"):
        build_student("lora", base, 3)


def test_teacher_path_keeps_requires_grad(base_path):
    base = load_base(base_path)
    student = build_student("lora", base, 3)
    z, t, ehs, _ = model_inputs(base)
    lora_params = [p for k, p in student.trainable_named_parameters().items() if ".lora_" in k]
    lora_params[0].requires_grad_(False)  # e.g. a user freezing part of it
    with torch.no_grad():
        student(z, t, ehs, use_adapter=False)
    assert not lora_params[0].requires_grad
    assert all(p.requires_grad for p in lora_params[1:])


def test_narrow_base_falls_back_to_full_adapter(tmp_path):
    base = load_base(make_tiny_base(tmp_path, block_out_channels=(32, 64), name="narrow"))
    student = build_student("lora", base, 3)
    assert student.adapter_options["condition_adapter"] == "full_adapter"
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        assert torch.equal(student(z, t, ehs, student.encode_condition(cond)), student(z, t, ehs, use_adapter=False))


@pytest.mark.parametrize("loader", ["load_lora_weights", "load_lora_adapter"])
def test_exported_lora_runs_in_stock_diffusers(loader, base_path, tmp_path):
    """rank 4, alpha 8: the scale 2 must survive through the safetensors metadata."""
    from diffusers import StableDiffusionPipeline, T2IAdapter

    base = load_base(base_path)
    student = build_student("lora", base, 3, rank=4, lora_alpha=8, targets="attention_ff")
    perturb_(student, seed=4)
    files = student.save_weights(tmp_path)
    assert files == {"lora": "pytorch_lora_weights.safetensors", "t2i_adapter": "t2i_adapter/diffusion_pytorch_model.safetensors"}

    pipe = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    if loader == "load_lora_weights":
        pipe.load_lora_weights(tmp_path, weight_name=files["lora"], adapter_name="codi")
    else:
        pipe.unet.load_lora_adapter(tmp_path, weight_name=files["lora"], prefix="unet", adapter_name="codi")
    adapter = T2IAdapter.from_pretrained(tmp_path / "t2i_adapter")
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        ours = student(z, t, ehs, student.encode_condition(cond))
        stock = pipe.unet(z, t, ehs, down_intrablock_additional_residuals=list(adapter(cond))).sample
        teacher = student(z, t, ehs, use_adapter=False)
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)
    assert (ours - teacher).abs().max() > 1e-3
