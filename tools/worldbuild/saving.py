"""Saving a trained teacher as a plain diffusers folder, and loading one back into fresh models."""
from __future__ import annotations

from pathlib import Path


def load_weights_from(folder: str | Path, vae, text_encoder, unet) -> None:
    """Load a saved teacher folder's weights into freshly built models of the same architecture.

    The VAE's ``scaling_factor`` comes along (it is part of its config, not its weights).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    src_vae = AutoencoderKL.from_pretrained(folder / "vae")
    for name, model, src in (("vae", vae, src_vae),
                             ("unet", unet, UNet2DConditionModel.from_pretrained(folder / "unet")),
                             ("text_encoder", text_encoder, CLIPTextModel.from_pretrained(folder / "text_encoder"))):
        try:
            model.load_state_dict(src.state_dict())
        except RuntimeError as e:
            raise ValueError(f"{folder / name} does not match the architecture in its training_config.json: {e}")
    vae.register_to_config(scaling_factor=src_vae.config.scaling_factor)


def save_teacher(output_dir: str | Path, vae, text_encoder, tokenizer, unet, scheduler) -> Path:
    """Save a standard ``StableDiffusionPipeline`` folder (fp32 safetensors, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def folder_size_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
