"""The teacher's networks: sizes (:class:`TeacherArchitecture`) and the diffusers/transformers builders.

* text encoder: ``CLIPTextModel`` built from a small ``CLIPTextConfig``;
* VAE: ``AutoencoderKL`` that downsamples by 4 (64x64 RGB -> 4x16x16 latents);
* UNet: ``UNet2DConditionModel`` with cross-attention on the text encoder, epsilon
  prediction;
* scheduler: the SD-1.x noise schedule (scaled_linear, 0.00085..0.012, 1000 steps),
  stored as a ``PNDMScheduler`` config exactly like real SD 1.5 folders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# SD-1.x noise schedule (the values in stable-diffusion-v1-5/scheduler/scheduler_config.json)
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@dataclass
class TeacherArchitecture:
    """Sizes of the teacher's networks (defaults: the committed ``condistill/assets/tiny-teacher``)."""

    resolution: int = 64
    # text encoder
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 256
    max_length: int = 32
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_norm_groups: int = 4
    latent_channels: int = 4
    # UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_cross_attention: tuple[bool, ...] = (False, True, True)
    unet_heads: int = 4
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 8
    # add an attention-pooled text embedding to the timestep embedding (diffusers'
    # ``addition_embed_type="text"``, as in DeepFloyd IF): every ResNet block then sees the
    # prompt, including the 16x16 level that has no cross-attention
    unet_pooled_text: bool = False

    def __post_init__(self):
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.unet_cross_attention = tuple(bool(c) for c in self.unet_cross_attention)
        if len(self.vae_channels) < 2:
            raise ValueError("vae_channels needs at least two levels (one downsampling step)")
        if any(c % self.vae_norm_groups for c in self.vae_channels):
            raise ValueError(f"every VAE width {self.vae_channels} must be divisible by vae_norm_groups={self.vae_norm_groups}")
        if any(c % self.unet_norm_groups for c in self.unet_channels):
            raise ValueError(f"every UNet width {self.unet_channels} must be divisible by unet_norm_groups={self.unet_norm_groups}")
        if len(self.unet_cross_attention) != len(self.unet_channels):
            raise ValueError("unet_cross_attention needs one flag per UNet level "
                             f"({len(self.unet_channels)}), got {len(self.unet_cross_attention)}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden={self.text_hidden} must be divisible by text_heads={self.text_heads}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} must be divisible by the VAE factor {self.downsample_factor}")
        latent = self.latent_size
        if latent % (2 ** (len(self.unet_channels) - 1)):
            raise ValueError(f"latent size {latent} must be divisible by 2**(UNet levels - 1)")
        for name in ("text_layers", "text_intermediate", "max_length", "latent_channels", "unet_heads",
                     "unet_layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor


def build_text_encoder(arch: TeacherArchitecture, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_length,
        hidden_act="quick_gelu",
        projection_dim=arch.text_hidden,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae(arch: TeacherArchitecture):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.vae_norm_groups,
        sample_size=arch.resolution,
        mid_block_add_attention=False,
        scaling_factor=1.0,
    )


def build_unet(arch: TeacherArchitecture):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.unet_cross_attention))
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.unet_heads,  # diffusers' legacy name: number of heads
        norm_num_groups=arch.unet_norm_groups,
        addition_embed_type="text" if arch.unet_pooled_text else None,
        addition_embed_type_num_heads=arch.text_heads,
    )


def with_cross_attention_everywhere(unet, arch: "TeacherArchitecture"):
    """The same function as ``unet`` in a UNet with cross-attention at every level.

    diffusers adds T2I-Adapter features *after* a plain ``DownBlock2D``'s downsampler but
    *before* a ``CrossAttnDownBlock2D``'s, so a UNet whose first down block has no
    cross-attention takes features at a layout no stock ``T2IAdapter`` produces (Stable
    Diffusion has cross-attention in its first three down blocks, like the result here).
    The new attention layers get a zero output projection, so every output is unchanged
    (up to float rounding) and training can take them from there. Returns ``(unet, arch)``.
    """
    import dataclasses

    import torch.nn as nn

    new_arch = dataclasses.replace(arch, unet_cross_attention=(True,) * len(arch.unet_channels))
    new = build_unet(new_arch)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(".attentions." not in k for k in missing):
        raise ValueError(f"cannot move these weights into the all-cross-attention layout: missing {missing}, "
                         f"unexpected {unexpected}")
    added = {k.split(".attentions.")[0] + ".attentions." + k.split(".attentions.")[1].split(".")[0] for k in missing}
    with torch.no_grad():
        for prefix in added:
            proj_out = new.get_submodule(prefix + ".proj_out")
            nn.init.zeros_(proj_out.weight)
            nn.init.zeros_(proj_out.bias)
    return new.eval(), new_arch


def build_scheduler():
    """The SD 1.5 scheduler folder: PNDM with the scaled_linear schedule, epsilon prediction."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        **SD_SCHEDULE,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    # PNDM ignores it, but SD 1.5 folders record clip_sample=false so that swapping in DDIM
    # (DDIMScheduler.from_config) does not clip the predicted latents to [-1, 1]: unit-variance
    # latents are not bounded like pixels, and clipping them washes out every colour.
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def build_training_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon", clip_sample=False)
