#!/usr/bin/env python
"""Write a Stable-Diffusion-1.5-shaped diffusers folder with random weights (no download).

The UNet, VAE, text encoder and scheduler take the published SD 1.5 configuration values
(860M-parameter UNet, 8x VAE, CLIP ViT-L/14 text encoder with its 49,408-token embedding table
and 77 positions), so the speed and memory of a step on these components are those of the real
model; only the weights are random. The tokenizer is the embedded teacher's small BPE vocabulary
with its length raised to 77: every id it produces is a valid row of the large embedding table.

    python benchmarks/sd_components.py --out runs/sd15-random
    python benchmarks/train_step.py --base runs/sd15-random --resolution 256 --batch-size 2 --steps 2 --warmup 1

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
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
)


def build_sd15(out: Path, seed: int = 0) -> int:
    """Save the random-weight SD-1.5-shaped pipeline folder at ``out``; return the UNet's parameter count."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from condistill.hub import resolve_pretrained_dir

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(resolve_pretrained_dir("embedded:tiny-teacher") / "tokenizer")
    tokenizer.model_max_length = SD15_TEXT["max_position_embeddings"]
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE), text_encoder=text_encoder,
        tokenizer=tokenizer, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in pipe.unet.parameters())


def build_taesd(out: Path, seed: int = 0) -> int:
    """Save a random-weight TAESD-shaped ``AutoencoderTiny`` at ``out``; return its decoder's parameter count."""
    from diffusers import AutoencoderTiny

    from condistill.decoders import save_fast_decoder

    torch.manual_seed(seed)
    decoder = AutoencoderTiny()
    save_fast_decoder(decoder, out)
    return sum(p.numel() for p in decoder.decoder.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--taesd-out", default=None, help="also write a TAESD-shaped fast decoder here (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    outs = [Path(args.out)] + ([Path(args.taesd_out)] if args.taesd_out else [])
    for out in outs:
        if out.exists():
            raise SystemExit(f"{out} exists; pass a new folder")
    print(f"wrote {outs[0]} (UNet parameters: {build_sd15(outs[0], args.seed):,})")
    if args.taesd_out:
        print(f"wrote {outs[1]} (decoder parameters: {build_taesd(outs[1], args.seed):,})")


if __name__ == "__main__":
    main()
