#!/usr/bin/env python
"""Write a Stable-Diffusion-1.5-shaped diffusers folder with random weights (no download).

The UNet, VAE, text encoder and scheduler take the published SD 1.5 configuration values
(860M-parameter UNet, 8x VAE, CLIP ViT-L/14 text encoder with its 49,408-token embedding table
and 77 positions), so the speed and memory of a step on these components are those of the real
model; only the weights are random. The tokenizer is the embedded teacher's small BPE vocabulary
with its length raised to 77: every id it produces is a valid row of the large embedding table.

    python benchmarks/sd_components.py --out runs/sd15-random
    python benchmarks/train_step.py --base runs/sd15-random --resolution 256 --batch-size 2 --steps 2 --warmup 1

``--sdxl-out DIR`` also writes SDXL-base-1.0-shaped components the same way (:func:`build_sdxl`: the
2.6B-parameter UNet with its ``text_time`` embedding, the CLIP ViT-L and OpenCLIP ViT-bigG text encoders,
the VAE with SDXL's scaling factor and ``force_upcast``, the Euler scheduler).

``--taesd-out DIR`` also writes a TAESD-shaped fast decoder (diffusers ``AutoencoderTiny`` with its
default configuration, which is TAESD's: 64 channels per block, decoder blocks (3, 3, 3, 1), 8x
upsampling, 1.2M decoder parameters) with random weights, for ``sampling_latency.py --decoder DIR``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

#: The published SD 1.5 UNet configuration (the values that decide its size and cost).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    # the published SD 1.5 VAE config has no force_upcast key, so a float16 base keeps its VAE in float16
    # (condistill.frozen reads the key as written); diffusers' default (True) would keep it in float32
    force_upcast=False,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
)


#: The published SDXL base 1.0 configuration (``stabilityai/stable-diffusion-xl-base-1.0``).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
#: CLIP ViT-L/14 (penultimate hidden state into the UNet) and OpenCLIP ViT-bigG/14 with its projection
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
)

#: Tiny stand-ins of the same layouts (SD: latents 4 x 8 x 8 of 32 px images; SDXL: latents 4 x 8 x 8 of
#: 32 px images, two 32-wide text encoders), for ``build_sd15(out, **TINY_SD15)`` / ``build_sdxl(out, **TINY_SDXL)``:
#: a CPU check of a script that runs the full-size ones on a GPU. The embedded tokenizer has 637 tokens.
_TINY_TEXT = dict(vocab_size=637, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=32, hidden_act="quick_gelu", projection_dim=32, layer_norm_eps=1e-5)
_TINY_VAE = dict(SD15_VAE, sample_size=32, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=16,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY_SD15 = dict(
    unet=dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
              attention_head_dim=4, norm_num_groups=16,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    vae=_TINY_VAE, text=_TINY_TEXT,
)
TINY_SDXL = dict(
    unet=dict(SDXL_UNET, sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
              transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16),
    vae=dict(_TINY_VAE, scaling_factor=0.13025, force_upcast=True), text=_TINY_TEXT, text_2=dict(_TINY_TEXT, hidden_act="gelu"),
)

#: a TAESD-shaped decoder for the tiny components' 4x VAE
TINY_TAESD = dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                  num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))


def _tokenizer(max_length: int):
    """The embedded teacher's small BPE tokenizer with its length raised to ``max_length``: every id it
    produces is a valid row of a text encoder's embedding table of at least 637 rows."""
    from transformers import CLIPTokenizer

    from condistill.hub import resolve_pretrained_dir

    tokenizer = CLIPTokenizer.from_pretrained(resolve_pretrained_dir("embedded:tiny-teacher") / "tokenizer")
    tokenizer.model_max_length = max_length
    return tokenizer


def _text_encoder(cls, config: dict, tokenizer):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)).eval()


def _save(pipe, out: Path, dtype) -> int:
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in pipe.unet.parameters())


def build_sd15(out: Path, seed: int = 0, unet: dict = SD15_UNET, vae: dict = SD15_VAE, text: dict = SD15_TEXT,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> int:
    """Save the random-weight SD-1.5-shaped pipeline folder at ``out``; return the UNet's parameter count.

    ``unet``, ``vae`` and ``text`` are the component configurations (the published ones by default;
    :data:`TINY_SD15` for tiny ones). The weights are drawn on ``device`` (a GPU draws the full-size
    ones in a second) and saved in ``dtype`` (default: as built, float32).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(text["max_position_embeddings"])
    with torch.device(device):
        text_encoder = _text_encoder(CLIPTextModel, text, tokenizer)  # drawn first, as it always was
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(**vae), text_encoder=text_encoder,
            tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return _save(pipe, out, dtype)


def build_sdxl(out: Path, seed: int = 0, unet: dict = SDXL_UNET, vae: dict = SDXL_VAE, text: dict = SDXL_TEXT,
               text_2: dict = SDXL_TEXT_2, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> int:
    """Save a random-weight SDXL-base-1.0-shaped pipeline folder at ``out``; return the UNet's parameter count.

    As :func:`build_sd15` (``TINY_SDXL`` for tiny components); both tokenizers are the embedded one.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer(text["max_position_embeddings"])
    with torch.device(device):
        pipe = StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(**vae),
            text_encoder=_text_encoder(CLIPTextModel, text, tokenizer),
            text_encoder_2=_text_encoder(CLIPTextModelWithProjection, text_2, tokenizer),
            tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    return _save(pipe, out, dtype)


def build_taesd(out: Path, seed: int = 0, **config) -> int:
    """Save a random-weight TAESD-shaped ``AutoencoderTiny`` at ``out``; return its decoder's parameter count.

    ``config`` overrides diffusers' default ``AutoencoderTiny`` configuration (which is TAESD's)."""
    from diffusers import AutoencoderTiny

    from condistill.decoders import save_fast_decoder

    torch.manual_seed(seed)
    decoder = AutoencoderTiny(**config)
    save_fast_decoder(decoder, out)
    return sum(p.numel() for p in decoder.decoder.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--sdxl-out", default=None, help="also write SDXL-shaped components here (must not exist)")
    p.add_argument("--taesd-out", default=None, help="also write a TAESD-shaped fast decoder here (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    builds = [(args.out, build_sd15, "UNet"), (args.sdxl_out, build_sdxl, "UNet"),
              (args.taesd_out, build_taesd, "decoder")]
    builds = [(Path(out), build, what) for out, build, what in builds if out]
    for out, _, _ in builds:
        if out.exists():
            raise SystemExit(f"{out} exists; pass a new folder")
    for out, build, what in builds:
        print(f"wrote {out} ({what} parameters: {build(out, args.seed):,})")


if __name__ == "__main__":
    main()
