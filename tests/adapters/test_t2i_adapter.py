"""T2I-Adapter student: features aligned with the UNet's residual slots, exact zero init, trainability."""
from __future__ import annotations


import pytest
import torch

from helpers import make_tiny_base, model_inputs, perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.adapters.student import unet_residual_layout
from condistill.adapters.t2i_adapter import t2i_adapter_fits
from condistill.frozen import load_base


@pytest.fixture(scope="module")
def narrow_base_path(tmp_path_factory):
    """Last two UNet widths differ: the light adapter cannot fit."""
    return make_tiny_base(tmp_path_factory.mktemp("narrow"), block_out_channels=(32, 64), name="narrow")


@pytest.mark.parametrize("adapter_type", ["full_adapter", "light_adapter"])
def test_features_fit_unet_slots_and_start_at_zero(adapter_type, base_path):
    base = load_base(base_path)
    student = build_student("t2i_adapter", base, 3, adapter_type=adapter_type)
    assert student.adapter.config.adapter_type == adapter_type
    assert student.adapter.config.downscale_factor == base.vae_scale_factor
    _, _, _, cond = model_inputs(base)
    features = student.encode_condition(cond)
    latent = base.resolution // base.vae_scale_factor
    assert unet_residual_layout(base.unet) == [(32, 1), (64, 2), (64, 4)]
    assert [(f.shape[1], latent // f.shape[-1]) for f in features] == unet_residual_layout(base.unet)
    assert all(torch.count_nonzero(f) == 0 for f in features)


@pytest.mark.parametrize("adapter_type", ["full_adapter", "light_adapter"])
def test_zero_init_still_trains_every_parameter(adapter_type, base_path):
    base = load_base(base_path)
    student = build_student("t2i_adapter", base, 3, adapter_type=adapter_type)
    params = student.trainable_named_parameters()
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    z, t, ehs, cond = model_inputs(base)
    for _ in range(3):
        loss = student(z, t, ehs, student.encode_condition(cond)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = [k for k in params if torch.equal(params[k], before[k])]
    assert frozen == []
    assert any(torch.count_nonzero(f) > 0 for f in student.encode_condition(cond))


def test_light_adapter_needs_equal_last_widths(narrow_base_path):
    base = load_base(narrow_base_path)
    fits, why = t2i_adapter_fits(base.unet, "light_adapter")
    assert not fits and "block_out_channels [32, 64]" in why
    with pytest.raises(ValueError, match="adapter_type='full_adapter'"):
        build_student("t2i_adapter", base, 3, adapter_type="light_adapter")
    student = build_student("t2i_adapter", base, 3, adapter_type="full_adapter")
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        assert torch.equal(student(z, t, ehs, student.encode_condition(cond)), student(z, t, ehs, use_adapter=False))
    with pytest.raises(ValueError, match="adapter_type must be one of"):
        build_student("t2i_adapter", base, 3, adapter_type="huge_adapter")
    # SDXL's layout does not fit an SD-layout UNet; the message names the type that does
    with pytest.raises(ValueError, match=r"gives \[\(32, 2\).*Use adapter_type='full_adapter'"):
        build_student("t2i_adapter", base, 3, adapter_type="full_adapter_xl")


def test_pretrained_adapter_trains(base_path, tmp_path):
    base = load_base(base_path)
    donor = build_student("t2i_adapter", base, 3, adapter_type="light_adapter", num_res_blocks=1)
    perturb_(donor, seed=2)
    donor.adapter.save_pretrained(tmp_path / "ad")
    student = build_student("t2i_adapter", base, 3, pretrained_adapter=tmp_path / "ad")
    assert student.adapter_options["adapter_type"] == "light_adapter"
    assert student.adapter_options["num_res_blocks"] == 1
    params = student.trainable_named_parameters()
    donor_params = donor.trainable_named_parameters()
    assert all(torch.equal(params[k], donor_params[k]) for k in params)
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    z, t, ehs, cond = model_inputs(base)
    student(z, t, ehs, student.encode_condition(cond)).pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(params[k], before[k]) for k in params)
    with pytest.raises(ValueError, match="in_channels 3 != condition channels 4"):
        build_student("t2i_adapter", base, 4, pretrained_adapter=tmp_path / "ad")
