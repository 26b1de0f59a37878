"""The tiny embedded teacher: tokenizer, recipe smoke run, and the committed folder."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from worldbuild import teacher as T
from condistill.world.scenes import SyntheticScenes, vocabulary

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "condistill" / "assets" / "tiny-teacher"
sys.path.insert(0, str(ROOT / "tools"))
import pretrain_teacher  # noqa: E402

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


# --------------------------------------------------------------------------- tokenizer
def test_every_scene_word_is_one_token():
    tok = T.build_tokenizer()
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} -> {tok.convert_ids_to_tokens(ids)}"
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"]
    # a whole caption is one token per word, framed by BOS/EOS and padded to 32 with EOS
    caption = SyntheticScenes("heldout", 1)[0].caption
    ids = T.tokenize(tok, [caption])[0].tolist()
    n = len(caption.split())
    assert len(ids) == 32 == tok.model_max_length
    assert ids[0] == tok.bos_token_id and ids[n + 1] == tok.eos_token_id
    assert set(ids[n + 1:]) == {tok.eos_token_id}


def test_unknown_words_fall_back_to_characters():
    tok = T.build_tokenizer()
    pieces = tok.tokenize("Zebra-striped!")
    assert "".join(pieces).replace("</w>", "") == "zebra-striped!"
    assert len(pieces) > 3
    ids = tok("zebra", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(ids) == 5
    assert tok.decode(tok("a zebra on red").input_ids, skip_special_tokens=True) == "a zebra on red"


def test_tokenizer_files_load_as_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    T.write_tokenizer_files(tmp_path)
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and all(len(m.split(" ")) == 2 for m in merges[1:])
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=32)
    assert tok.tokenize("a small purple diamond") == ["a</w>", "small</w>", "purple</w>", "diamond</w>"]
    assert tok("navy").input_ids == T.build_tokenizer()("navy").input_ids


def test_tokenizer_rejects_bad_vocabulary():
    with pytest.raises(ValueError, match="single words"):
        T.clip_bpe_files(["two words"])
    with pytest.raises(ValueError, match="non-empty"):
        T.clip_bpe_files(["red", ""])
    with pytest.raises(TypeError):
        T.clip_bpe_files("red")


# --------------------------------------------------------------------------- configs
def test_config_validation_errors():
    with pytest.raises(ValueError, match="vae_steps"):
        pretrain_teacher.PretrainConfig(vae_steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        pretrain_teacher.PretrainConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="vae_crop"):
        pretrain_teacher.PretrainConfig(vae_crop=30)
    with pytest.raises(ValueError, match="divisible"):
        T.TeacherArchitecture(unet_channels=(32, 60, 128))
    with pytest.raises(SystemExit):
        pretrain_teacher.parse_args(["--unet-channels", "32,x"])
    with pytest.raises(SystemExit):
        pretrain_teacher.parse_args(["--num-scenes", "0"])


def test_scheduler_is_sd15_schedule():
    cfg = T.build_scheduler().config
    assert cfg.beta_schedule == "scaled_linear" and cfg.num_train_timesteps == 1000
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert cfg.prediction_type == "epsilon" and cfg.steps_offset == 1 and cfg.skip_prk_steps
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_config(cfg).config.clip_sample is False  # latents must not be clipped


def test_pixel_heuristic_reads_real_scenes():
    recs = SyntheticScenes("heldout", 48)[:]
    score = T.heuristic_score([r.image for r in recs], [r.caption for r in recs])
    assert score["background"] == 1.0 and score["colour"] >= 0.95
    # and it is not trivially right: swapping images between prompts breaks it
    shifted = T.heuristic_score([r.image for r in recs[1:] + recs[:1]], [r.caption for r in recs])
    assert shifted["both"] < 0.5


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
    ref = T.build_tokenizer()
    caption = SyntheticScenes("heldout", 3)[2].caption
    assert tok(caption).input_ids == ref(caption).input_ids
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in vocabulary())


def test_committed_scaling_factor_normalises_latents(committed):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(committed / "vae").eval()
    images, _ = T.render_scenes(64, "heldout")
    with torch.no_grad():
        z = vae.encode(T.to_unit_range(images)).latent_dist.mean * vae.config.scaling_factor
        rec = vae.decode(z / vae.config.scaling_factor).sample
    assert 0.8 < float(z.std()) < 1.25
    assert float((rec.clamp(-1, 1) - T.to_unit_range(images)).abs().mean()) * 127.5 < 10.0


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


def test_cross_attention_everywhere_keeps_the_function_and_fits_a_t2i_adapter():
    from condistill.adapters.t2i_adapter import t2i_adapter_fits

    torch.manual_seed(0)
    arch = T.TeacherArchitecture(text_hidden=16, text_heads=2, text_intermediate=32, text_layers=1,
                                 unet_channels=(8, 16, 16), unet_heads=2, unet_norm_groups=8,
                                 unet_cross_attention=(False, True, True))
    unet = T.build_unet(arch).eval()
    for p in unet.parameters():  # non-trivial weights everywhere
        p.data.add_(0.05 * torch.randn_like(p))
    assert not t2i_adapter_fits(unet, "full_adapter")[0]  # the layout diffusers cannot feed
    new, new_arch = T.with_cross_attention_everywhere(unet, arch)
    assert new_arch.unet_cross_attention == (True, True, True)
    assert set(new.config.down_block_types) == {"CrossAttnDownBlock2D"}
    assert t2i_adapter_fits(new, "full_adapter")[0]
    z, e, t = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(unet(z, t, e).sample, new(z, t, e).sample, atol=1e-6)
    # the added layers are live: they train from their zero projection
    assert any(p.requires_grad for n, p in new.named_parameters() if "down_blocks.0.attentions" in n)


def test_cross_attention_everywhere_needs_a_teacher_to_convert(tmp_path):
    with pytest.raises(ValueError, match="pass init_from"):
        pretrain_teacher.PretrainConfig(output_dir=str(tmp_path), cross_attention_everywhere=True)
