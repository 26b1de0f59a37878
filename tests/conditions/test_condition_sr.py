"""SR condition: seeded degradations, low-res size, bicubic upscaling."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from condistill.conditions import SRCondition, bicubic_upscale
from condistill.data.record import Record


def sr_record(width=64, height=64):
    image = Image.new("RGB", (width, height), (30, 120, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 30, 40), fill=(240, 240, 30))
    draw.ellipse((36, 20, 60, 44), fill=(200, 30, 200))
    return Record(image=image)


def test_shape_dtype_range():
    c = SRCondition()(sr_record(64, 48), seed=0)
    assert c.shape == (3, 48, 64) and c.dtype == torch.float32
    assert 0.0 <= float(c.min()) and float(c.max()) <= 1.0


def test_deterministic_per_seed_and_varies_across_seeds():
    cond, record = SRCondition(), sr_record()
    every_step = SRCondition(blur_probability=1, noise_probability=1, jpeg_probability=1)
    for seed in (0, 7, 123456):
        assert torch.equal(cond(record, seed=seed), cond(record, seed=seed))
        assert torch.equal(SRCondition()(record, seed=seed), cond(record, seed=seed))
        assert every_step.degrade(record.image, seed).tobytes() == every_step.degrade(record.image, seed).tobytes()
    outputs = [cond(record, seed=s) for s in range(8)]
    distinct = {tuple(o.flatten()[::37].tolist()) for o in outputs}
    assert len(distinct) >= 6
    scales = {cond.degradation_params(s)["scale"] for s in range(40)}
    assert scales == {2, 4, 8}


def test_degrade_size_follows_the_drawn_scale():
    cond, image = SRCondition(), sr_record(64, 40).image
    for seed in range(10):
        scale = cond.degradation_params(seed)["scale"]
        low = cond.degrade(image, seed)
        assert low.mode == "RGB"
        assert low.size == (round(64 / scale), round(40 / scale))


def test_clean_degradation_is_plain_bicubic():
    cond = SRCondition(scales=(4,), blur_probability=0, noise_probability=0, jpeg_probability=0)
    image = sr_record().image
    low = cond.degrade(image, seed=3)
    assert np.array_equal(np.asarray(low), np.asarray(image.resize((16, 16), Image.BICUBIC)))
    up = bicubic_upscale(low, (64, 64))
    expected = torch.from_numpy(np.asarray(up).transpose(2, 0, 1).copy()).float() / 255
    assert torch.equal(cond(Record(image=image), seed=3), expected)
    assert SRCondition.bicubic_upscale is bicubic_upscale


def test_probabilities_switch_each_step_without_reshuffling_the_others():
    always = SRCondition(blur_probability=1, noise_probability=1, jpeg_probability=1)
    never = SRCondition(blur_probability=0, noise_probability=0, jpeg_probability=0)
    for seed in range(20):
        a, n = always.degradation_params(seed), never.degradation_params(seed)
        assert a["blur_sigma"] >= 0.4 and a["noise_std"] >= 0.005 and 40 <= a["jpeg_quality"] <= 95
        assert n["blur_sigma"] == 0 and n["noise_std"] == 0 and n["jpeg_quality"] is None
        assert a["scale"] == n["scale"]
    # each degradation changes the low-resolution image
    image = sr_record().image
    base = np.asarray(never.degrade(image, 1), dtype=np.int16)
    for option in ("blur_probability", "noise_probability", "jpeg_probability"):
        only = SRCondition(**{"blur_probability": 0, "noise_probability": 0, "jpeg_probability": 0, option: 1})
        assert np.abs(np.asarray(only.degrade(image, 1), dtype=np.int16) - base).max() > 0, option


def test_bicubic_upscale_checks_size():
    low = Image.new("RGB", (8, 8))
    assert bicubic_upscale(low, (20, 12)).size == (20, 12)
    with pytest.raises(ValueError, match="width, height"):
        bicubic_upscale(low, 32)
    with pytest.raises(TypeError):
        bicubic_upscale(np.zeros((8, 8, 3)), (16, 16))


def test_invalid_options():
    with pytest.raises(ValueError, match="scales"):
        SRCondition(scales=())
    with pytest.raises(ValueError, match="scale must be a number >= 1"):
        SRCondition(scales=(0.5,))
    with pytest.raises(ValueError, match="blur_probability"):
        SRCondition(blur_probability=1.5)
    with pytest.raises(ValueError, match="jpeg_quality"):
        SRCondition(jpeg_quality=(90, 40))
    with pytest.raises(ValueError, match="downsample"):
        SRCondition(downsample="lanczos3")


def test_start_image_is_the_upscaled_input_in_minus_one_to_one():
    cond = SRCondition()
    batch = torch.stack([cond(sr_record(), seed=s) for s in (0, 1)])
    start = cond.start_image(batch)
    assert start.shape == (2, 3, 64, 64)
    torch.testing.assert_close(start, batch * 2 - 1)
    with pytest.raises(ValueError, match=r"batch of sr conditions \[B, 3, H, W\]"):
        cond.start_image(batch[0])
