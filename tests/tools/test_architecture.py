"""The teacher's networks (tools/worldbuild/architecture.py): the SD 1.5 schedule and the layout conversion."""
from __future__ import annotations

import pytest
import torch

from worldbuild.architecture import TeacherArchitecture, build_scheduler, build_unet, with_cross_attention_everywhere


def test_scheduler_is_sd15_schedule():
    cfg = build_scheduler().config
    assert cfg.beta_schedule == "scaled_linear" and cfg.num_train_timesteps == 1000
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert cfg.prediction_type == "epsilon" and cfg.steps_offset == 1 and cfg.skip_prk_steps
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_config(cfg).config.clip_sample is False  # latents must not be clipped


def test_cross_attention_everywhere_keeps_the_function_and_fits_a_t2i_adapter():
    from condistill.adapters.t2i_adapter import t2i_adapter_fits

    torch.manual_seed(0)
    arch = TeacherArchitecture(text_hidden=16, text_heads=2, text_intermediate=32, text_layers=1,
                               unet_channels=(8, 16, 16), unet_heads=2, unet_norm_groups=8,
                               unet_cross_attention=(False, True, True))
    unet = build_unet(arch).eval()
    for p in unet.parameters():  # non-trivial weights everywhere
        p.data.add_(0.05 * torch.randn_like(p))
    assert not t2i_adapter_fits(unet, "full_adapter")[0]  # the layout diffusers cannot feed
    new, new_arch = with_cross_attention_everywhere(unet, arch)
    assert new_arch.unet_cross_attention == (True, True, True)
    assert set(new.config.down_block_types) == {"CrossAttnDownBlock2D"}
    assert t2i_adapter_fits(new, "full_adapter")[0]
    z, e, t = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(unet(z, t, e).sample, new(z, t, e).sample, atol=1e-6)
    # the added layers are live: they train from their zero projection
    assert any(p.requires_grad for n, p in new.named_parameters() if "down_blocks.0.attentions" in n)
