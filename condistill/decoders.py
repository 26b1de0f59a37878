"""Fast decoders: a TAESD-style ``AutoencoderTiny`` in place of a pipeline's full VAE.

A 4-step student spends a large share of its time in the full VAE decode; a tiny distilled
decoder (diffusers ``AutoencoderTiny``, the TAESD architecture) costs a fraction of it for a
small loss of fidelity::

    import condistill
    from condistill.decoders import use_fast_decoder

    pipe = condistill.load_adapter("runs/edge")
    use_fast_decoder(pipe, "embedded:tiny-decoder")     # SD 1.x/2.x bases: "madebyollin/taesd"
    image = pipe("a red cube", image=pipe.condistill_condition.control_image(photo), **pipe.condistill_defaults).images[0]

How ``AutoencoderTiny`` meets the pipelines' latents: the UNet works on *scaled* latents
``z = vae_latent * vae.config.scaling_factor``, and every stock pipeline calls
``vae.decode(z / vae.config.scaling_factor)``. A TAESD-style decoder is trained on the scaled
latents themselves and says so with ``scaling_factor = 1.0`` in its config, so the pipeline
hands it ``z`` unchanged (its ``latent_magnitude`` / ``latent_shift`` only map latents to
8-bit images in ``AutoencoderTiny.forward``; decoding does not use them). Its decoder first
soft-clamps ``z`` to about +-3 (``3 tanh(z / 3)``), which is harmless on unit-variance
scaled latents. The pipelines compute their ``vae_scale_factor`` once, from the VAE they were
built with, so a decoder must upsample by that same factor and take the same number of latent
channels: :func:`use_fast_decoder` checks both before it changes anything.

Decoders:

* ``embedded:tiny-decoder``: distilled from the embedded tiny teacher's VAE (4x, 4 latent
  channels) by ``tools/train_tiny_decoder.py``; its encoder is distilled too, so image-to-image
  pipelines that encode with ``pipe.vae`` keep working;
* any folder saved with ``AutoencoderTiny.save_pretrained`` (or a pipeline folder whose
  ``vae/`` is one), or a hub id such as ``madebyollin/taesd`` (SD 1.x/2.x) read from the local
  Hugging Face cache (:func:`condistill.hub.resolve_pretrained_dir`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from condistill.hub import resolve_pretrained_dir

__all__ = ["EMBEDDED_DECODER", "base_with_decoder", "decoder_mismatch", "load_fast_decoder", "save_fast_decoder",
           "upsampling_factor", "use_fast_decoder"]

#: The packaged decoder of the embedded tiny teacher.
EMBEDDED_DECODER = "embedded:tiny-decoder"
DECODER_CLASS = "AutoencoderTiny"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_SUGGESTION = ("use a decoder distilled from this base's VAE: embedded:tiny-decoder for embedded:tiny-teacher, "
               "madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL")


def _decoder_folder(root: Path, spec: str) -> Path:
    """The folder holding the ``AutoencoderTiny`` config: ``root`` itself or its ``vae/``."""
    for folder in (root, root / "vae"):
        config_file = folder / "config.json"
        if not config_file.is_file():
            continue
        try:
            class_name = json.loads(config_file.read_text()).get("_class_name")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{config_file} is not a model config ({error}); re-download or re-save the decoder {spec!r}.") from None
        if class_name == DECODER_CLASS:
            return folder
        raise ValueError(
            f"The fast decoder {spec!r} holds a {class_name} ({config_file}), not an {DECODER_CLASS} "
            f"(TAESD-style) decoder; {_SUGGESTION}."
        )
    raise ValueError(
        f"The fast decoder {spec!r} ({root}) has no {DECODER_CLASS} config.json (at its root or in vae/); pass a "
        f"folder saved with AutoencoderTiny.save_pretrained, or {_SUGGESTION}."
    )


def load_fast_decoder(spec: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                      revision: str | None = None):
    """Load a TAESD-style ``AutoencoderTiny`` (frozen, in eval mode) from ``spec``.

    Args:
        spec: a local folder saved with ``AutoencoderTiny.save_pretrained`` (or a pipeline
            folder whose ``vae/`` is one), ``embedded:tiny-decoder``, or a hub repo id
            (``madebyollin/taesd``) found in the local Hugging Face cache (downloaded only when
            the hub is not offline).
        torch_dtype: dtype of the loaded weights (default: as saved).
        revision: hub revision of a repo id.

    Raises:
        FileNotFoundError: ``spec`` is neither a folder, an embedded name nor a cached hub id.
        ValueError: the folder holds no ``AutoencoderTiny``, or its weights are not safetensors.
    """
    from diffusers import AutoencoderTiny

    text = os.fspath(spec)
    root = resolve_pretrained_dir(text, revision=revision, what="fast decoder")
    folder = _decoder_folder(root, text)
    if not (folder / WEIGHTS_NAME).is_file():
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise ValueError(
            f"The fast decoder {text!r} has no {WEIGHTS_NAME} in {folder} (found {found}); condistill loads "
            "safetensors weights only: re-save it with AutoencoderTiny.save_pretrained(folder)."
        )
    kwargs = {"use_safetensors": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    decoder = AutoencoderTiny.from_pretrained(folder, **kwargs)
    decoder.requires_grad_(False)
    return decoder.eval()


def save_fast_decoder(decoder, out: str | os.PathLike) -> Path:
    """``decoder.save_pretrained(out)`` in safetensors, without the ``block_out_channels`` entry.

    ``AutoencoderTiny`` derives that entry from ``decoder_block_out_channels`` in its constructor
    and registers it, so a plain save writes it and every later load warns that it is not an
    argument. The loaded config has it all the same.
    """
    out = Path(out)
    decoder.save_pretrained(out, safe_serialization=True)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("block_out_channels", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def upsampling_factor(autoencoder) -> int:
    """Pixels per latent pixel of a VAE or ``AutoencoderTiny``, read from its config."""
    config = autoencoder.config
    steps = len(config.block_out_channels) - 1
    return int(getattr(config, "upsampling_scaling_factor", 2)) ** steps


def decoder_mismatch(decoder, latent_channels: int, scale_factor: int) -> list[str]:
    """What keeps ``decoder`` from decoding a base's latents (empty list when it fits).

    Args:
        decoder: an ``AutoencoderTiny``.
        latent_channels: channels of the base's latents (its VAE's ``latent_channels``).
        scale_factor: pixels per latent pixel of the base (a pipeline's ``vae_scale_factor``).
    """
    problems = []
    if int(decoder.config.latent_channels) != int(latent_channels):
        problems.append(f"it decodes {decoder.config.latent_channels}-channel latents but the base's have "
                        f"{latent_channels} channels")
    if upsampling_factor(decoder) != int(scale_factor):
        problems.append(f"it upsamples by {upsampling_factor(decoder)} but the base's VAE by {scale_factor}")
    return problems


def _as_decoder(spec_or_module, torch_dtype):
    from diffusers import AutoencoderTiny

    if isinstance(spec_or_module, (str, os.PathLike)):
        return load_fast_decoder(spec_or_module, torch_dtype=torch_dtype)
    if not isinstance(spec_or_module, AutoencoderTiny):
        raise TypeError(
            f"use_fast_decoder takes an AutoencoderTiny or where to load one from (folder, embedded:tiny-decoder, "
            f"hub id), got {type(spec_or_module).__name__}."
        )
    return spec_or_module


def _placed(decoder, device, dtype):
    """``decoder`` on ``device``, cast only when its dtype differs (diffusers warns about any cast)."""
    decoder = decoder.to(device=device)
    if next(decoder.parameters()).dtype != dtype:
        decoder = decoder.to(dtype=dtype)
    return decoder.eval()


def use_fast_decoder(pipe, spec_or_module, torch_dtype: torch.dtype | None = None):
    """Make a fast decoder the ``vae`` of a stock diffusers pipeline, in place; returns ``pipe``.

    The decoder is loaded (for a spec), moved to the pipeline's device and to the dtype of its
    current VAE (or ``torch_dtype``) and registered as the pipeline's ``vae`` component, so
    ``pipe.components``, ``pipe.save_pretrained`` and the decode step of ``pipe(...)`` all use
    it. The replaced VAE stays reachable as ``pipe.condistill_full_vae``.

    Args:
        pipe: a diffusers pipeline with a ``vae`` component (e.g. from ``condistill.load_adapter``).
        spec_or_module: an ``AutoencoderTiny``, or a spec for :func:`load_fast_decoder`.
        torch_dtype: dtype for the decoder (default: that of the pipeline's VAE).

    Raises:
        TypeError: ``pipe`` has no ``vae`` component, or ``spec_or_module`` is not an AutoencoderTiny.
        ValueError: the decoder's latent channels or upsampling factor differ from the base's VAE;
            the pipeline is left unchanged.
    """
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict) or "vae" not in components:
        raise TypeError(f"use_fast_decoder needs a diffusers pipeline with a vae component, got {type(pipe).__name__}.")
    full = components["vae"]
    if full is not None:
        channels, dtype = int(full.config.latent_channels), next(full.parameters()).dtype
    else:
        channels, dtype = int(pipe.unet.config.out_channels), pipe.unet.dtype
    scale = int(getattr(pipe, "vae_scale_factor", None) or (upsampling_factor(full) if full is not None else 8))
    decoder = _as_decoder(spec_or_module, torch_dtype or dtype)
    problems = decoder_mismatch(decoder, channels, scale)
    if problems:
        raise ValueError(f"This fast decoder does not fit the pipeline's base: {'; '.join(problems)}. {_SUGGESTION}.")
    decoder = _placed(decoder, pipe.device, torch_dtype or dtype)
    if full is not None and not hasattr(pipe, "condistill_full_vae"):
        pipe.condistill_full_vae = full
    pipe.vae = decoder  # DiffusionPipeline.__setattr__ records the new class in pipe.config
    return pipe


def base_with_decoder(base, spec_or_module):
    """A copy of a :class:`condistill.frozen.Base` whose ``decode_latents`` runs the fast decoder.

    The other modules are shared, not copied; ``encode_images`` uses the decoder's encoder.
    """
    decoder = _as_decoder(spec_or_module, None)
    problems = decoder_mismatch(decoder, base.latent_channels, base.vae_scale_factor)
    if problems:
        raise ValueError(f"This fast decoder does not fit the base {base.name_or_path!r}: {'; '.join(problems)}. "
                         f"{_SUGGESTION}.")
    vae_param = next(base.vae.parameters())
    decoder = _placed(decoder, vae_param.device, vae_param.dtype)
    return dataclasses.replace(base, vae=decoder)
