"""Tiny, randomly initialised diffusers components for fast offline tests.

Nothing here downloads anything: every component is built inline from a tiny config,
the CLIP tokenizer from a vocab.json + merges.txt written into the test's temporary folder,
and the result is saved with ``save_pretrained`` into a standard diffusers folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

#: The repository's root folder (this file is in its tests/ folder).
ROOT = Path(__file__).resolve().parents[1]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = ["a", "the", "red", "blue", "green", "cube", "ball", "photo", "of", "on", "sky"]


def write_tiny_clip_tokenizer_files(folder: str | Path) -> tuple[Path, Path]:
    """Write a tiny CLIP BPE vocabulary (``vocab.json``, ``merges.txt``) into ``folder``.

    The vocabulary holds the CLIP special tokens, single letters (with and without the
    ``</w>`` end-of-word suffix) and a few whole words reachable through the merges.
    Returns the two file paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(_LETTERS) + [c + "</w>" for c in _LETTERS]
    merges: list[str] = []
    for word in _WORDS:
        # merge the word left to right: "r e", "re d</w>" ...
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def make_tiny_tokenizer(folder: str | Path, model_max_length: int = 16):
    """Build a ``CLIPTokenizer`` offline from tiny vocab/merges files written into ``folder``."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_tiny_clip_tokenizer_files(folder)
    vocab = json.loads(vocab_path.read_text())
    merges = [
        tuple(line.split())
        for line in merges_path.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_tiny_components(
    tmp_path: str | Path,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    seed: int = 0,
) -> dict:
    """Build the components of a tiny Stable-Diffusion-like pipeline (seeded, random weights).

    Layout mirrors SD 1.x/2.x: cross-attention down blocks followed by one plain
    ``DownBlock2D`` without downsampler, last two ``block_out_channels`` equal (so the
    light T2I-Adapter fits), a VAE that downsamples by 2 and a 32-dim text encoder.
    Latents are ``4 x 8 x 8`` and images ``3 x 16 x 16``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(block_out_channels)
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=16,
    )
    torch.manual_seed(seed + 2)
    tokenizer = make_tiny_tokenizer(Path(tmp_path) / "_tokenizer_src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def make_tiny_base(
    tmp_path: str | Path,
    prediction_type: str = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    name: str = "tiny_base",
    seed: int = 0,
) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` into ``tmp_path / name`` and return that folder.

    ``prediction_type`` is written to the scheduler config (``"epsilon"`` or
    ``"v_prediction"``); ``block_out_channels`` sets the UNet widths (see
    :func:`make_tiny_components`).
    """
    from diffusers import StableDiffusionPipeline

    out = Path(tmp_path) / name
    if (out / "model_index.json").exists():
        return out
    components = make_tiny_components(
        tmp_path, prediction_type=prediction_type, block_out_channels=block_out_channels, seed=seed
    )
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(out)
    return out


def make_fake_hub_cache(
    cache_root: str | Path, repo_id: str, source_folder: str | Path, commit: str = "0" * 40
) -> Path:
    """Copy ``source_folder`` into a Hugging Face hub cache layout and return the cache root.

    Layout: ``<cache_root>/models--<org>--<name>/snapshots/<commit>/...`` plus
    ``refs/main`` holding the commit hash, which is what ``huggingface_hub`` reads with
    ``HF_HUB_OFFLINE=1``.
    """
    import shutil

    cache_root = Path(cache_root)
    repo_dir = cache_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source_folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return cache_root


@torch.no_grad()
def perturb_(student, seed: int = 0, scale: float = 0.05) -> None:
    """Add seeded Gaussian noise to every trainable parameter of ``student`` (in place).

    Moves the zero-initialised adapter away from the identity so that round trips and stock
    pipeline comparisons test real, non-zero weights.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(student.trainable_named_parameters().items()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        param.add_(noise.to(device=param.device, dtype=param.dtype) * scale)


def model_inputs(base, batch: int = 2, seed: int = 0):
    """Seeded ``(z, t, encoder_hidden_states, cond)`` for a tiny base: latents, timesteps, text, condition."""
    gen = torch.Generator().manual_seed(seed)
    h = base.resolution // base.vae_scale_factor
    z = torch.randn(batch, base.latent_channels, h, h, generator=gen)
    t = torch.randint(0, base.num_train_timesteps, (batch,), generator=gen)
    prompts = (["a red cube", ""] * batch)[:batch]
    ehs = base.encode_prompts(prompts)
    cond = torch.rand(batch, 3, base.resolution, base.resolution, generator=gen)
    return z, t, ehs, cond


try:
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def torch_single_thread():
        """Run a test module's tiny models on one CPU thread, restoring the setting afterwards.

        On a shared, busy machine torch's default thread pool oversubscribes the cores and makes
        these tiny forwards about 10x slower. Import this fixture into a test module to use it.
        """
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(previous)

except ImportError:  # helpers used outside pytest
    pass


def tiny_run_config(base, out, **overrides):
    """A :class:`condistill.config.DistillConfig` of a two-step edge ControlNet run on ``base`` into ``out``."""
    from condistill.config import DistillConfig

    opts = dict(condition="edge", adapter="controlnet", base=base, data="synthetic:train:24", output_dir=str(out),
                max_steps=2, batch_size=4, checkpoint_every=0, validate_every=0, log_every=1, seed=0)
    opts.update(overrides)
    return DistillConfig(**opts)


def make_tiny_sdxl_base(tmp_path: str | Path, name: str = "tiny_sdxl", seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionXLPipeline`` into ``tmp_path / name`` and return that folder.

    Layout mirrors SDXL: a plain ``DownBlock2D`` then two cross-attention down blocks (the last
    without downsampler), ``addition_embed_type="text_time"`` (pooled text + six size/crop ids),
    two text encoders (a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``, 32 wide each,
    so the UNet cross-attends to 64 channels) sharing the embedded teacher's tokenizer, and a VAE
    that downsamples by 4 with ``force_upcast``. Images are ``3 x 64 x 64``, latents ``4 x 16 x 16``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from condistill.hub import ASSETS_DIR

    out = Path(tmp_path) / name
    if (out / "model_index.json").exists():
        return out
    tokenizer = CLIPTokenizer.from_pretrained(ASSETS_DIR / "tiny-teacher" / "tokenizer")
    time_dim, projection = 8, 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    encoders = []
    for i, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        torch.manual_seed(seed + 2 + i)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=projection,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        encoders.append(cls(config).eval())
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out)
    return out
