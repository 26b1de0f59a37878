"""The LCM-LoRA route in the evaluation: an LCM-LoRA (a condistill lcm_lora export, a file or a hub id) loaded
into the base, alone and stacked on a conventional adapter, sampled by LCMScheduler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_fake_hub_cache, make_tiny_base, perturb_

from condistill.adapters import build_student
from condistill.adapters.lora import LORA_WEIGHT_NAME, stacked_lora
from condistill.adapters.save_load import save_adapter
from condistill.cli import main
from condistill.conditions import get_condition
from condistill.evaluation.lcm_lora import LCM_LORA_NAME, lcm_lora_file, load_lcm_lora
from condistill.frozen import load_base


def _save(student, base, out, condition="edge"):
    return save_adapter(student, out, base_name_or_path=str(base.name_or_path), base_fingerprint=base.fingerprint(),
                        num_grid=50, prediction_type=base.prediction_type, resolution=base.resolution,
                        noise_schedule=base.noise_schedule_config(), condition_name=condition,
                        condition_config=get_condition(condition).config(),
                        recommended_steps=4)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny base, an LCM-LoRA export of it and a conventional (LoRA-kind) baseline export, both non-zero."""
    root = tmp_path_factory.mktemp("lcm")
    base_path = make_tiny_base(root)
    base = load_base(str(base_path))
    lcm = build_student("lcm_lora", base, 1, rank=2)
    perturb_(lcm, seed=1, scale=0.3)
    _save(lcm, base, root / "lcm" / "adapter", condition="none")
    base = load_base(str(base_path))
    baseline = build_student("lora", base, 3, rank=2)
    perturb_(baseline, seed=2, scale=0.3)
    _save(baseline, base, root / "baseline" / "adapter")
    return base_path, root / "lcm", root / "baseline"


def _inputs(base):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, base.resolution // base.vae_scale_factor, base.resolution // base.vae_scale_factor,
                    generator=g)
    return z, torch.tensor([10, 700]), base.encode_prompts(["a red circle", "a blue square"]), \
        torch.rand(2, 3, base.resolution, base.resolution, generator=g)


def test_a_stacked_lcm_lora_is_what_diffusers_computes_with_both_named_adapters(exports):
    from condistill.adapters.save_load import load_student

    base_path, lcm, baseline = exports
    base = load_base(str(base_path))
    student = load_student(str(baseline), base).eval()
    load_lcm_lora(base, str(lcm))
    z, t, emb, cond = _inputs(base)
    with torch.no_grad():
        features = student.encode_condition(cond)
        alone = student(z, t, emb, features)
        teacher = base.predict(z, t, emb)
        with stacked_lora(base.unet, LCM_LORA_NAME, 0.7):
            both = student(z, t, emb, features)
            teacher_lcm = base.predict(z, t, emb)
        assert torch.equal(student(z, t, emb, features), alone)  # switched off again after
    # the reference: a fresh UNet with both LoRA files loaded by diffusers, set_adapters weights 1.0 and 0.7
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_path), safety_checker=None)
    pipe.load_lora_weights(str(baseline / "adapter"), weight_name=LORA_WEIGHT_NAME, adapter_name="condistill")
    pipe.load_lora_weights(str(lcm / "adapter"), weight_name=LORA_WEIGHT_NAME, adapter_name="lcm")
    with torch.no_grad():
        pipe.set_adapters(["condistill", "lcm"], [1.0, 0.7])
        residuals = [f.clone() for f in features]
        ref_both = pipe.unet(z, t, emb, down_intrablock_additional_residuals=residuals, return_dict=False)[0]
        pipe.set_adapters(["lcm"], [0.7])
        ref_teacher_lcm = pipe.unet(z, t, emb, return_dict=False)[0]
    assert torch.allclose(both, ref_both, atol=1e-5) and not torch.allclose(both, alone, atol=1e-3)
    assert torch.allclose(teacher_lcm, ref_teacher_lcm, atol=1e-5) and not torch.allclose(teacher_lcm, teacher,
                                                                                           atol=1e-3)


def test_an_lcm_lora_is_found_as_a_file_a_folder_a_run_or_a_hub_id(exports, tmp_path, monkeypatch):
    _, lcm, _ = exports
    assert lcm_lora_file(str(lcm)) == (str(lcm / "adapter"), LORA_WEIGHT_NAME)
    assert lcm_lora_file(str(lcm / "adapter" / LORA_WEIGHT_NAME)) == (str(lcm / "adapter" / LORA_WEIGHT_NAME), None)
    shipped, name = lcm_lora_file("embedded:lcm-lora")  # the embedded teacher's, in the package
    assert name == LORA_WEIGHT_NAME and (Path(shipped) / name).is_file()
    assert lcm_lora_file("latent-consistency/lcm-lora-sdv1-5") == ("latent-consistency/lcm-lora-sdv1-5",
                                                                   LORA_WEIGHT_NAME)
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors in it"):
        lcm_lora_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        lcm_lora_file(str(tmp_path / "missing.safetensors"))
    # a hub id, read from the offline cache
    cache = make_fake_hub_cache(tmp_path / "hub", "someone/lcm-lora-tiny", lcm / "adapter")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_base(str(exports[0]))
    load_lcm_lora(base, "someone/lcm-lora-tiny")
    assert any(f".{LCM_LORA_NAME}." in n for n, _ in base.unet.named_parameters())


def test_an_lcm_lora_of_another_base_is_refused_in_one_line(exports):
    base = load_base(str(exports[0]))  # the tiny test base, not the embedded teacher the shipped LoRA is for
    with pytest.raises(ValueError, match="--lcm-lora embedded:lcm-lora does not fit the base"):
        load_lcm_lora(base, "embedded:lcm-lora")


@pytest.mark.slow
def test_eval_adds_the_lcm_lora_rows(exports, tmp_path, capsys):
    base_path, lcm, baseline = exports
    out = tmp_path / "out"
    assert main(["eval", "--condition", "edge", "--student", str(baseline), "--baseline", str(baseline),
                 "--lcm-lora", str(lcm), "--num-images", "2", "--batch-size", "2", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    for name in ("lcm-lora-2-g1", "lcm-lora-4-g1.5", "lcm-lora+baseline-2-g1", "lcm-lora+baseline-4-g1.5"):
        assert rows[name]["lcm_lora"] and rows[name]["sampler"] == "lcm", name
    assert rows["lcm-lora+baseline-4-g1"]["model"] == str(baseline) and rows["lcm-lora-4-g1"]["model"] == "teacher"
    assert not rows["baseline-lcm-4"]["lcm_lora"]
    assert rows["lcm-lora+baseline-4-g1"]["metrics"] != rows["baseline-lcm-4"]["metrics"]
