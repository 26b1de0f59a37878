"""LoRA student: small, exact at init, teacher path intact, loadable by stock diffusers LoRA loaders."""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import make_tiny_base, model_inputs, perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.frozen import load_base


def test_parameter_budget_vs_controlnet(base_path, capsys):
    """At SD 1.5's shape (on the meta device: nothing allocated) the LoRA student, its light condition adapter
    included, trains about 5% of what a ControlNet does (19.5M against 361.3M)."""
    from diffusers import UNet2DConditionModel

    counts = {}
    for kind in ("lora", "controlnet"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                        attention_head_dim=8)
            counts[kind] = build_student(kind, unet, 3, vae_scale_factor=8).num_trainable_parameters()
    ratio = counts["lora"] / counts["controlnet"]
    with capsys.disabled():
        print(f"\n[SD 1.5 shape] lora trainable {counts['lora']:,} / controlnet {counts['controlnet']:,} = {ratio:.1%}")
    assert ratio <= 0.06
    lora = build_student("lora", load_base(base_path), 3)
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


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_several_students_share_one_unet(base_path, tmp_path):
    """E.g. an evaluation loading several LoRA adapters onto one base: each runs only its own LoRA."""
    pristine = load_base(base_path)
    base = load_base(base_path)
    first, second = build_student("lora", base, 3), build_student("lora", base, 3, rank=2)
    assert (first.lora_adapter_name, second.lora_adapter_name) == ("condistill", "condistill_1")
    perturb_(first, seed=1)
    perturb_(second, seed=2)
    second.save_weights(tmp_path)
    alone = build_student("lora", load_base(base_path), 3, rank=2)
    alone.load_weights(tmp_path)
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        out_first = first(z, t, ehs, first.encode_condition(cond))
        out_second = second(z, t, ehs, second.encode_condition(cond))
        out_alone = alone(z, t, ehs, alone.encode_condition(cond))
        reference = pristine.unet(z, t, ehs).sample
        assert torch.equal(first(z, t, ehs, use_adapter=False), reference)
        assert torch.equal(base.unet(z, t, ehs).sample, reference)
    assert torch.equal(out_second, out_alone)
    assert (out_first - out_second).abs().max() > 1e-3
    for student in (first, second):
        assert all(p.requires_grad for p in student.trainable_named_parameters().values())
    with pytest.raises(ValueError, match="other LoRA adapters"):
        second.enable_gradient_checkpointing()


def test_shared_unet_stays_the_teacher(base_path):
    """evaluate/train code may call base.unet directly as the teacher next to a LoRA student."""
    pristine = load_base(base_path)
    base = load_base(base_path)
    student = build_student("lora", base, 3)
    perturb_(student, seed=6)
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        reference = pristine.unet(z, t, ehs).sample
        adapted = student(z, t, ehs, student.encode_condition(cond))
        direct = base.unet(z, t, ehs).sample
    assert (adapted - reference).abs().max() > 1e-3
    assert torch.equal(direct, reference)
    assert all(p.requires_grad for p in student.trainable_named_parameters().values())


def test_teacher_path_keeps_requires_grad(base_path):
    base = load_base(base_path)
    student = build_student("lora", base, 3)
    z, t, ehs, _ = model_inputs(base)
    lora_params = [p for k, p in student.trainable_named_parameters().items() if ".lora_" in k]
    lora_params[0].requires_grad_(False)  # e.g. a user freezing part of it
    with torch.no_grad():
        student(z, t, ehs, use_adapter=False)
        student(z, t, ehs, student.encode_condition(torch.rand(2, 3, 16, 16)))
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


def test_gradient_checkpointing_gives_the_same_gradients(base_path):
    """Checkpointed blocks recompute in backward, after forward returned: the LoRA must still be on."""
    grads = []
    for checkpointing in (False, True):
        base = load_base(base_path)
        torch.manual_seed(0)  # peft draws lora_A at random
        student = build_student("lora", base, 3)
        perturb_(student, seed=8)
        if checkpointing:
            student.enable_gradient_checkpointing()
        z, t, ehs, cond = model_inputs(base)
        student(z, t, ehs, student.encode_condition(cond)).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in student.trainable_named_parameters().items()})
        with torch.no_grad():
            teacher = student(z, t, ehs, use_adapter=False)
            assert torch.equal(teacher, load_base(base_path).unet(z, t, ehs).sample)
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for k, g in grads[0].items() if ".lora_" in k)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)
