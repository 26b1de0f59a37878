"""Starting a ControlNet student from an existing ControlNet published as one file (ldm or diffusers layout),
from a folder, or from a hub id in an offline cache."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import make_fake_hub_cache, make_tiny_base, perturb_

from condistill.adapters import build_student
from condistill.frozen import load_base
from condistill.publish.controlnet_layout import controlnet_ldm_state_dict


@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory):
    """A tiny SD-shaped base (VAE factor 8, SD's condition embedding) and an existing ControlNet for it."""
    base = load_base(str(make_tiny_base(tmp_path_factory.mktemp("sf-base"))))
    existing = build_student("controlnet", base.unet, 3, vae_scale_factor=8)
    perturb_(existing, seed=5)
    return base, existing


def _state(student):
    return {k: v.detach().clone() for k, v in student.controlnet.state_dict().items()}


@pytest.mark.parametrize("layout", ["ldm.safetensors", "ldm-unprefixed.pth", "diffusers.safetensors"])
def test_a_single_file_gives_the_existing_weights_exactly(sd_shaped, tmp_path, layout):
    base, existing = sd_shaped
    state = _state(existing)
    ldm = controlnet_ldm_state_dict(state, dict(existing.controlnet.config))
    path = tmp_path / f"cn-{layout}"
    if layout == "ldm.safetensors":
        save_file(ldm, str(path))
    elif layout == "ldm-unprefixed.pth":  # as the original v1.1 .pth files are keyed
        torch.save({k.removeprefix("control_model."): v for k, v in ldm.items()}, path)
    else:
        save_file(state, str(path))
    student = build_student("controlnet", base.unet, 3, vae_scale_factor=8, pretrained_controlnet=str(path))
    got = student.controlnet.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert all(p.requires_grad for p in student.controlnet.parameters())
    assert student.initialized_from == str(path)


def test_a_folder_and_an_offline_hub_id_give_the_same_weights(sd_shaped, tmp_path, monkeypatch):
    base, existing = sd_shaped
    existing.controlnet.save_pretrained(tmp_path / "folder")
    cache = make_fake_hub_cache(tmp_path / "hub", "someone/tiny-controlnet", tmp_path / "folder")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = _state(existing)
    run = tmp_path / "run"  # a training run's folder: its own config.json at the top, the export in adapter/
    existing.controlnet.save_pretrained(run / "adapter" / "controlnet")
    (run / "config.json").write_text('{"condition": "edge"}')
    for source in (str(tmp_path / "folder"), "someone/tiny-controlnet", str(run)):
        got = build_student("controlnet", base.unet, 3, vae_scale_factor=8, pretrained_controlnet=source)
        assert all(torch.equal(got.controlnet.state_dict()[k], state[k]) for k in state), source


def test_files_that_are_no_controlnet_or_do_not_fit_are_refused(sd_shaped, tmp_path):
    base, existing = sd_shaped
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    for junk in ("junk.safetensors", "junk.pth"):
        with pytest.raises(ValueError, match="is not a readable weights file"):
            build_student("controlnet", base.unet, 3, vae_scale_factor=8, pretrained_controlnet=str(tmp_path / junk))
    save_file({"x.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is no ControlNet: it has neither an input_hint_block"):
        build_student("controlnet", base.unet, 3, vae_scale_factor=8,
                      pretrained_controlnet=str(tmp_path / "other.safetensors"))
    wider = load_base(str(make_tiny_base(tmp_path / "wider", block_out_channels=(32, 64, 128))))
    state = _state(existing)
    save_file(controlnet_ldm_state_dict(state, dict(existing.controlnet.config)), str(tmp_path / "cn.safetensors"))
    with pytest.raises(ValueError, match="does not fit this base"):
        build_student("controlnet", wider.unet, 3, vae_scale_factor=8, pretrained_controlnet=str(tmp_path / "cn.safetensors"))
    with pytest.raises(ValueError, match="conditioning_channels 3 != condition channels 1"):
        build_student("controlnet", base.unet, 1, vae_scale_factor=8, pretrained_controlnet=str(tmp_path / "cn.safetensors"))


@pytest.mark.parametrize("adapter_type,blocks", [("full_adapter", 2), ("light_adapter", 4)])
def test_a_t2i_adapter_file_in_the_original_layout_gives_the_existing_weights(base_path, tmp_path, adapter_type,
                                                                              blocks):
    """The file ``condistill export --format single-file`` writes for A1111/ComfyUI starts a student again."""
    from condistill.publish.t2i_layout import t2i_original_state_dict

    base = load_base(base_path)
    existing = build_student("t2i_adapter", base.unet, 3, vae_scale_factor=4, adapter_type=adapter_type,
                             num_res_blocks=blocks)
    perturb_(existing, seed=7)
    state = {k: v.detach().clone() for k, v in existing.adapter.state_dict().items()}
    save_file(t2i_original_state_dict(state, dict(existing.adapter.config)), str(tmp_path / "t2i.safetensors"))
    student = build_student("t2i_adapter", base.unet, 3, vae_scale_factor=4,
                            pretrained_adapter=str(tmp_path / "t2i.safetensors"))
    got = student.adapter.state_dict()
    assert dict(student.adapter.config)["adapter_type"] == adapter_type
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="neither 1 condition channels at the VAE factor 4|does not fit 1 condition "
                                         "channels and this base: size mismatch for adapter.body.0.in_conv"):
        build_student("t2i_adapter", base.unet, 1, vae_scale_factor=4,
                      pretrained_adapter=str(tmp_path / "t2i.safetensors"))
