"""ControlNet + LoRA student: both trained, exact at init, the teacher path intact, exported and loaded whole."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import model_inputs, perturb_, tiny_run_config, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.adapters.save_load import load_student, save_adapter
from condistill.frozen import load_base


def _export(student, base, out):
    return save_adapter(student, out, base_name_or_path=str(base.name_or_path), base_fingerprint=base.fingerprint(),
                        condition_name="edge", condition_config={}, num_grid=50, prediction_type=base.prediction_type,
                        resolution=base.resolution, noise_schedule=base.noise_schedule_config())


def test_it_starts_as_the_teacher_and_trains_a_controlnet_and_a_unet_lora(base_path):
    base = load_base(base_path)
    student = build_student("controlnet_lora", base, 3, rank=2)
    z, t, e, cond = model_inputs(base)
    teacher = base.unet(z, t, encoder_hidden_states=e, return_dict=False)[0]
    with torch.no_grad():
        assert torch.equal(student(z, t, e, student.encode_condition(cond)), teacher)  # zero convs and lora_B = 0
    names = student.trainable_named_parameters()
    assert any(k.startswith("controlnet.") for k in names) and any(".lora_B.condistill." in k for k in names)
    assert not any(".lora_" in k for k in student.controlnet.state_dict())  # copied before the LoRA was added
    assert student.shared_frozen_blocks() == []  # the LoRA changes what the down blocks compute
    perturb_(student, seed=1)
    with torch.no_grad():
        moved = student(z, t, e, student.encode_condition(cond))
        assert not torch.allclose(moved, teacher)
        assert torch.equal(student(z, t, e, use_adapter=False), teacher)
        assert torch.equal(base.unet(z, t, encoder_hidden_states=e, return_dict=False)[0], teacher)  # LoRA off
        lora_only = {k: p.detach().clone() for k, p in names.items() if ".lora_" in k}
        for k, p in names.items():
            if ".lora_" in k:
                p.zero_()
        without_lora = student(z, t, e, student.encode_condition(cond))
        assert not torch.allclose(without_lora, moved)  # the LoRA is part of the student's forward
        for k, p in names.items():
            if ".lora_" in k:
                p.copy_(lora_only[k])


def test_export_load_student_and_the_stock_pipeline_give_the_same_outputs(base_path, tmp_path):
    from condistill.pipeline import load_adapter

    base = load_base(base_path)
    student = build_student("controlnet_lora", base, 3, rank=2, targets="attention_ff")
    perturb_(student, seed=2)
    out = _export(student, base, tmp_path / "export")
    config = json.loads((out / "condistill_config.json").read_text())
    assert set(config["weight_files"]) == {"controlnet", "lora"} and config["adapter_options"]["rank"] == 2
    z, t, e, cond = model_inputs(base)
    with torch.no_grad():
        expected = student(z, t, e, student.encode_condition(cond))
        again = load_student(out, load_base(base_path))
        torch.testing.assert_close(again(z, t, e, again.encode_condition(cond)), expected, rtol=0, atol=1e-6)
    pipe = load_adapter(out)
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline" and "condistill" in pipe.unet.peft_config
    with torch.no_grad():
        down, mid = pipe.controlnet(z, t, encoder_hidden_states=e, controlnet_cond=cond, return_dict=False)
        got = pipe.unet(z, t, encoder_hidden_states=e, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    image = pipe("a red cube", image=cond[:1], output_type="np", **pipe.condistill_defaults).images
    assert image.shape == (1, base.resolution, base.resolution, 3)


def test_a_distribution_matching_run_trains_and_exports_it_and_its_cards_code_runs(base_path, tmp_path, monkeypatch):
    import re

    from condistill.training.loop import distill
    from condistill.world.scenes import generate_scene

    out = distill(tiny_run_config(str(base_path), tmp_path / "run", adapter="controlnet_lora", loss="codi+dmd",
                                  dmd_fake_rank=4, batch_size=2))
    config = json.loads((out / "adapter" / "condistill_config.json").read_text())
    assert config["kind"] == "controlnet_lora" and config["one_step_start"] == {"timestep": 999, "from": "noise"}
    card = (out / "adapter" / "README.md").read_text()
    assert "ControlNet together with a LoRA of the UNet trained with condistill" in card and 'pipe.load_lora_weights(ADAPTER, weight_name=' in card
    monkeypatch.chdir(tmp_path)
    generate_scene(0, "heldout").image.save("photo.png")
    blocks = re.findall(r"^```python\n(.*?)^```", card, flags=re.S | re.M)
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:  # the condistill block, then plain diffusers (which reuses its ADAPTER and control)
        scope.pop("image", None)
        exec(compile(block, "card", "exec"), scope)  # noqa: S102
        assert scope["image"].size == (16, 16)
    with pytest.raises(Exception, match="gradient checkpointing"):
        tiny_run_config(str(base_path), tmp_path / "gc", adapter="controlnet_lora", loss="codi+dmd",
                        gradient_checkpointing=True)
