"""Inpaint condition: masked image + mask, coverage range, seeding, display."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from condistill.conditions import InpaintCondition
from condistill.data.record import Record


def inpaint_record(width=64, height=64):
    image = Image.new("RGB", (width, height), (200, 180, 150))
    ImageDraw.Draw(image).rectangle((20, 20, 44, 44), fill=(20, 90, 200))
    return Record(image=image)


def test_layout_masked_image_and_mask():
    record = inpaint_record(64, 48)
    c = InpaintCondition()(record, seed=4)
    assert c.shape == (4, 48, 64) and c.dtype == torch.float32
    mask = c[3]
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    image = torch.from_numpy(np.asarray(record.image).transpose(2, 0, 1).copy()).float() / 255
    hole = mask.bool()
    assert float(c[:3][:, hole].abs().max()) == 0.0
    assert torch.equal(c[:3][:, ~hole], image[:, ~hole])
    assert np.array_equal(mask.numpy().astype(bool), InpaintCondition().make_mask(48, 64, seed=4))


def test_deterministic_per_seed_and_varies_across_seeds():
    cond = InpaintCondition()
    first = cond.make_mask(64, 64, seed=11)
    assert first.dtype == bool and first.shape == (64, 64)
    assert np.array_equal(first, InpaintCondition().make_mask(64, 64, seed=11))
    masks = {cond.make_mask(64, 64, seed=s).tobytes() for s in range(20)}
    assert len(masks) == 20


@pytest.mark.parametrize(
    "options",
    [{}, {"min_coverage": 0.3, "max_coverage": 0.32}, {"rectangle_probability": 1.0},
     {"rectangle_probability": 0.0, "min_coverage": 0.05, "max_coverage": 0.9}],
    ids=["default", "narrow", "rectangles", "strokes"],
)
def test_coverage_stays_in_range_over_many_seeds(options):
    cond = InpaintCondition(**options)
    coverages = np.array([cond.make_mask(40, 56, seed=s).mean() for s in range(150)])
    assert coverages.min() >= cond.min_coverage - 1e-9
    assert coverages.max() <= cond.max_coverage + 1e-9
    if cond.max_coverage - cond.min_coverage > 0.2:  # the range is used, not one value
        assert coverages.max() - coverages.min() > 0.5 * (cond.max_coverage - cond.min_coverage)


def test_shape_kinds_differ():
    rects = InpaintCondition(rectangle_probability=1.0, min_coverage=0.05, max_coverage=0.2)
    # a single accepted rectangle fills its bounding box; strokes leave gaps in theirs
    fills = []
    for cond in (rects, InpaintCondition(rectangle_probability=0.0, min_coverage=0.05, max_coverage=0.2)):
        ratios = []
        for seed in range(30):
            m = cond.make_mask(64, 64, seed=seed)
            ys, xs = np.nonzero(m)
            ratios.append(m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        fills.append(np.median(ratios))
    assert fills[0] > fills[1] + 0.2


def test_to_pil_shows_the_hole():
    record = inpaint_record()
    cond = InpaintCondition()
    c = cond(record, seed=2)
    shown = np.asarray(cond.to_pil(c))
    assert shown.shape == (64, 64, 3)
    hole = c[3].numpy() > 0.5
    assert np.array_equal(shown[~hole], np.asarray(record.image)[~hole])
    hole_pixels = shown[hole]
    assert (hole_pixels[:, 0] == hole_pixels[:, 1]).all()  # grey
    assert set(np.unique(hole_pixels[:, 0])) == {115, 178}  # two checker tones, never black


def test_errors():
    with pytest.raises(ValueError, match="swap"):
        InpaintCondition(min_coverage=0.6, max_coverage=0.4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        InpaintCondition(max_coverage=1.5)
    with pytest.raises(ValueError, match="widen the coverage range"):
        InpaintCondition(min_coverage=0.3, max_coverage=0.31).make_mask(3, 3, seed=0)
    with pytest.raises(ValueError, match="height"):
        InpaintCondition().make_mask(0, 10)


def test_start_image_keeps_the_known_pixels_and_fills_the_hole_with_their_mean():
    cond = InpaintCondition()
    batch = torch.stack([cond(inpaint_record(), seed=s) for s in (2, 3)])
    start = cond.start_image(batch)
    assert start.shape == (2, 3, 64, 64)
    for c, s in zip(batch, start):
        hole = c[3] > 0.5
        torch.testing.assert_close(s[:, ~hole], c[:3][:, ~hole] * 2 - 1)
        mean = c[:3][:, ~hole].mean(dim=1) * 2 - 1
        torch.testing.assert_close(s[:, hole], mean[:, None].expand(3, int(hole.sum())))
    everything = batch.clone()
    everything[:, 3] = 1.0
    everything[:, :3] = 0.0
    assert torch.equal(cond.start_image(everything), torch.zeros(2, 3, 64, 64))  # no known pixel: mid-grey

