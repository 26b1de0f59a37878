"""The tiny embedded teacher: the recipe (tools/pretrain_teacher.py), its smoke run, and the committed folder."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pretrain_teacher
from condistill.world.scenes import SyntheticScenes, vocabulary
from worldbuild.architecture import TeacherArchitecture
from worldbuild.render import render_scenes
from worldbuild.tokenizer import build_tokenizer
from worldbuild.training import to_unit_range

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "condistill" / "assets" / "tiny-teacher"

# Loads a folder with nothing but diffusers and samples with it; prints shape facts as JSON.
PLAIN_DIFFUSERS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a large red circle on a plain white background", "a medium blue square left of a small "
               "green triangle on a striped navy background"], num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    print(json.dumps({"shape": list(out.images.shape), "finite": bool(torch.isfinite(torch.from_numpy(out.images)).all()),
                      "condistill_imported": any(m.startswith("condistill") for m in sys.modules),
                      "vae_scale_factor": pipe.vae_scale_factor, "tokenizer_max_length": pipe.tokenizer.model_max_length,
                      "scaling_factor": pipe.vae.config.scaling_factor}))
    """
)


def run_plain_diffusers(folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS_SCRIPT, str(folder)], capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- configs
def test_config_validation_errors():
    with pytest.raises(ValueError, match="vae_steps"):
        pretrain_teacher.PretrainConfig(vae_steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        pretrain_teacher.PretrainConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="vae_crop"):
        pretrain_teacher.PretrainConfig(vae_crop=30)
    with pytest.raises(ValueError, match="divisible"):
        TeacherArchitecture(unet_channels=(32, 60, 128))
    with pytest.raises(SystemExit):
        pretrain_teacher.parse_args(["--unet-channels", "32,x"])
    with pytest.raises(SystemExit):
        pretrain_teacher.parse_args(["--num-scenes", "0"])


# --------------------------------------------------------------------------- recipe smoke run
def test_smoke_recipe_builds_a_plain_diffusers_folder(tmp_path):
    out = tmp_path / "teacher"
    cfg = pretrain_teacher.parse_args(["--output-dir", str(out), "--vae-steps", "2", "--unet-steps", "2",
                                       "--num-scenes", "16", "--log-every", "1", "--workers", "1"])
    lines: list[str] = []
    summary = pretrain_teacher.run(cfg, log=lines.append)
    assert any(line.startswith("unet step 2/2 loss") for line in lines)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for sub in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
    saved_cfg = json.loads((out / "training_config.json").read_text())
    assert saved_cfg["vae_steps"] == 2 and saved_cfg["num_scenes"] == 16
    assert summary["timings"]["total_s"] > 0 and len(summary["unet_loss"]["losses"]) == 2
    facts = run_plain_diffusers(out)
    assert facts["shape"] == [2, 64, 64, 3] and facts["finite"]
    assert not facts["condistill_imported"]
    assert facts["scaling_factor"] == pytest.approx(summary["latents"]["scaling_factor"])


# --------------------------------------------------------------------------- committed teacher
@pytest.fixture(scope="module")
def committed():
    if not (COMMITTED / "model_index.json").exists():
        pytest.fail(f"the committed teacher is missing at {COMMITTED}; run tools/pretrain_teacher.py")
    return COMMITTED


def test_committed_teacher_generates_64px_with_plain_diffusers(committed):
    facts = run_plain_diffusers(committed)
    assert facts["shape"] == [2, 64, 64, 3] and facts["finite"]
    assert not facts["condistill_imported"]
    assert facts["vae_scale_factor"] == 4 and facts["tokenizer_max_length"] == 32


def test_committed_teacher_layout_and_size(committed):
    assert folder_bytes(committed) < 25 * 1024 * 1024
    index = json.loads((committed / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    unet_cfg = json.loads((committed / "unet" / "config.json").read_text())
    assert unet_cfg["sample_size"] == 16 and unet_cfg["in_channels"] == 4 == unet_cfg["out_channels"]
    vae_cfg = json.loads((committed / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] != 1.0 and len(vae_cfg["block_out_channels"]) == 3
    summary = json.loads((committed / "training_summary.json").read_text())
    assert 2e6 <= summary["parameters"]["unet"] <= 5e6
    # the recorded latent statistics justify the scaling factor: scaled latents have unit std
    # (a continued teacher keeps its scaling factor and re-measures the std: equal to float rounding)
    assert summary["latents"]["std"] * vae_cfg["scaling_factor"] == pytest.approx(1.0, rel=1e-4)


def test_committed_tokenizer_matches_builder(committed):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(committed / "tokenizer")
    ref = build_tokenizer()
    caption = SyntheticScenes("heldout", 3)[2].caption
    assert tok(caption).input_ids == ref(caption).input_ids
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in vocabulary())


def test_committed_scaling_factor_normalises_latents(committed):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(committed / "vae").eval()
    images = render_scenes("heldout", 64, targets=False).images_chw()
    with torch.no_grad():
        z = vae.encode(to_unit_range(images)).latent_dist.mean * vae.config.scaling_factor
        rec = vae.decode(z / vae.config.scaling_factor).sample
    assert 0.8 < float(z.std()) < 1.25
    assert float((rec.clamp(-1, 1) - to_unit_range(images)).abs().mean()) * 127.5 < 10.0


def test_recipe_continues_a_saved_teacher(tmp_path):
    """--init-from keeps the VAE and its scaling factor and trains the UNet further."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    first, second = tmp_path / "first", tmp_path / "second"
    small = ["--num-scenes", "16", "--log-every", "1", "--workers", "1", "--unet-channels", "16,32,32"]
    pretrain_teacher.run(pretrain_teacher.parse_args(["--output-dir", str(first), "--vae-steps", "2",
                                                      "--unet-steps", "1", *small]), log=lambda _: None)
    lines: list[str] = []
    summary = pretrain_teacher.run(pretrain_teacher.parse_args(
        ["--output-dir", str(second), "--init-from", str(first), "--unet-steps", "2", *small[:-2]]),
        log=lines.append)
    assert any(line.startswith("continuing from") for line in lines)
    vae_a, vae_b = AutoencoderKL.from_pretrained(first / "vae"), AutoencoderKL.from_pretrained(second / "vae")
    assert vae_a.config.scaling_factor == vae_b.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(vae_a.state_dict().values(), vae_b.state_dict().values()))
    unet_a = UNet2DConditionModel.from_pretrained(first / "unet")
    unet_b = UNet2DConditionModel.from_pretrained(second / "unet")
    assert list(unet_b.config.block_out_channels) == list(unet_a.config.block_out_channels) == [16, 32, 32]
    assert not all(torch.equal(a, b) for a, b in zip(unet_a.state_dict().values(), unet_b.state_dict().values()))
    resolved = json.loads((second / "training_config.json").read_text())
    assert resolved["vae_steps"] == 0 and resolved["continued_from"]["unet_steps"] == 1
    assert summary["continued_from"]["unet_loss"]["steps"] == [1]


def test_continuing_refuses_its_own_folder_and_non_teacher_folders(tmp_path):
    with pytest.raises(SystemExit):
        pretrain_teacher.parse_args(["--output-dir", str(tmp_path), "--init-from", str(tmp_path)])
    with pytest.raises(ValueError, match="same folder"):
        (tmp_path / "training_config.json").write_text(json.dumps({"architecture": {}}))
        pretrain_teacher.PretrainConfig(output_dir=str(tmp_path), init_from=str(tmp_path))


def test_cross_attention_everywhere_needs_a_teacher_to_convert(tmp_path):
    with pytest.raises(ValueError, match="pass init_from"):
        pretrain_teacher.PretrainConfig(output_dir=str(tmp_path), cross_attention_everywhere=True)
