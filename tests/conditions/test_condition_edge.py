"""Edge condition: binary Canny outlines, at the image's own size."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from condistill.conditions import EdgeCondition, canny_edges
from condistill.data.record import Record


def square_record(width=64, height=64, box=(16, 16, 47, 47)):
    image = Image.new("RGB", (width, height), (40, 60, 90))
    ImageDraw.Draw(image).rectangle(box, fill=(230, 200, 40))
    return Record(image=image)


def distance_to_border(shape, box):
    """Chebyshev distance of every pixel to the square's outline (inner boundary pixels = 0)."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width]
    x0, y0, x1, y1 = box
    inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    d_in = np.minimum.reduce([xx - x0, x1 - xx, yy - y0, y1 - yy])
    d_out = np.maximum.reduce([x0 - xx, xx - x1, y0 - yy, yy - y1])
    return np.where(inside, d_in, d_out)


@pytest.mark.parametrize("size", [(64, 64), (70, 50)])
def test_edges_follow_the_square_outline(size):
    width, height = size
    box = (16, 12, 47, 37)
    c = EdgeCondition()(square_record(width, height, box))
    assert c.shape == (3, height, width) and c.dtype == torch.float32
    assert set(torch.unique(c).tolist()) <= {0.0, 1.0}
    assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])
    edges = c[0].numpy() > 0.5
    dist = distance_to_border((height, width), box)
    # nothing in the flat interior, the flat surroundings, or at the image border
    assert not edges[dist > 1].any()
    # the outline is found along every side
    x0, y0, x1, y1 = box
    near = edges & (dist <= 1)
    for side in (near[y0 - 1:y0 + 2, x0:x1 + 1].any(0), near[y1 - 1:y1 + 2, x0:x1 + 1].any(0),
                 near[y0:y1 + 1, x0 - 1:x0 + 2].any(1), near[y0:y1 + 1, x1 - 1:x1 + 2].any(1)):
        assert side.mean() > 0.9


def test_flat_image_has_no_edges_and_seed_is_irrelevant():
    record = Record(image=Image.new("RGB", (64, 64), (200, 10, 10)))
    assert EdgeCondition()(record).sum() == 0
    square = square_record()
    assert torch.equal(EdgeCondition()(square, seed=0), EdgeCondition()(square, seed=9))


def test_thresholds_control_which_edges_are_found():
    # a faint square (contrast 20 levels) is found with low thresholds only
    image = Image.new("RGB", (64, 64), (100, 100, 100))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(120, 120, 120))
    assert canny_edges(image, 20, 40).sum() > 50
    assert canny_edges(image, 100, 200).sum() == 0


def test_record_conditioning_is_used_when_asked():
    record = square_record()
    given = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(given).line((0, 16, 31, 16), fill=255)
    record.conditioning = given.convert("RGB")
    used = EdgeCondition(use_record_conditioning=True)(record)[0].numpy()
    assert set(np.unique(used)) == {0.0, 1.0}
    assert used[32:34].all() and used[:32].sum() == 0 and used[34:].sum() == 0
    computed = EdgeCondition()(record)
    assert torch.equal(computed, EdgeCondition()(square_record()))
    # without a conditioning image the option falls back to Canny
    assert torch.equal(EdgeCondition(use_record_conditioning=True)(square_record()), computed)


def test_invalid_thresholds():
    with pytest.raises(ValueError, match="swap"):
        EdgeCondition(low_threshold=200, high_threshold=100)
    with pytest.raises(ValueError, match="high_threshold"):
        EdgeCondition(high_threshold=-1)
    with pytest.raises(ValueError, match="use_record_conditioning"):
        EdgeCondition(use_record_conditioning="yes")
