import io

import numpy as np
import pytest
import torch
from PIL import Image

from condistill import get_condition
from condistill.demo.inputs import (BadInput, canvas_for, condition_from_upload, inpaint_condition, read_upload,
                                    sketch_to_edges)


def test_canvas_is_a_whole_multiple_of_the_resolution_with_a_one_pixel_brush():
    assert canvas_for(64) == canvas_for(64, least=512)
    assert (canvas_for(64).size, canvas_for(64).brush) == (512, 8)
    assert (canvas_for(512).size, canvas_for(512).brush) == (512, 2)  # 1 canvas px would not show
    assert (canvas_for(768).size, canvas_for(1024).size) == (768, 1024)


@pytest.mark.parametrize("offset", range(8))
def test_a_stroke_one_training_pixel_wide_becomes_a_line_one_or_two_pixels_wide(offset):
    """Wherever a brush-wide stroke falls between training pixels it is kept, about one pixel wide (Canny's
    lines are one), and never doubled as Canny would double it."""
    canvas = canvas_for(64)
    ink = np.zeros((canvas.size, canvas.size), dtype=bool)
    top = 200 + offset
    ink[top:top + canvas.brush, 40:400] = True  # a horizontal stroke, the brush's width
    edges = sketch_to_edges(ink, 64)
    assert edges.shape == (1, 3, 64, 64) and edges.dtype == torch.float32
    rows = torch.nonzero(edges[0, 0].any(dim=1)).flatten().tolist()
    assert 1 <= len(rows) <= 2 and rows[0] in (top // 8, top // 8 + 1)
    assert edges[0, 0, rows[0], 6:49].all()  # covered columns 40/8 .. 400/8, within a pixel at the ends
    assert set(torch.unique(edges).tolist()) <= {0.0, 1.0} and torch.equal(edges[0, 0], edges[0, 2])


def test_ink_of_layers_images_and_paper():
    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[4, :, 3] = 255
    layer[8, :, 3] = 60  # a stroke's soft rim, mostly transparent: not ink
    assert torch.equal(sketch_to_edges(layer, 16)[0, 0].nonzero()[:, 0].unique(), torch.tensor([4]))
    paper = np.full((16, 16, 3), 255, np.uint8)
    paper[:, 3] = 0  # pen on paper: dark is ink
    assert sketch_to_edges(paper, 16)[0, 0, :, 3].all() and sketch_to_edges(paper, 16).sum() == 16 * 3
    assert sketch_to_edges(np.zeros((16, 16, 4), np.uint8), 16).sum() == 0  # an empty layer: no edges
    with pytest.raises(BadInput, match=r"\[H, W, 1\|3\|4\]"):
        sketch_to_edges(np.zeros((4, 4, 2)), 4)


def test_a_wide_canvas_is_center_cropped_as_training_crops_images():
    ink = np.zeros((64, 128), dtype=bool)
    ink[:, 10] = True  # outside the central 64 columns (32..95): cropped away
    ink[:, 70] = True  # column 38 of the crop
    edges = sketch_to_edges(ink, 64)
    assert edges[0, 0, :, 38].all() and edges.sum() == 64 * 3


def _png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_upload_opens_images_and_refuses_anything_else_in_words(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_png())
    assert read_upload(good).size == (40, 30) and read_upload(good).mode == "RGB"
    corrupt = tmp_path / "notes.png"
    corrupt.write_bytes(b"this is not an image at all")
    with pytest.raises(BadInput, match="notes.png is not an image this demo can read"):
        read_upload(corrupt)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png((200, 200))[:300])
    with pytest.raises(BadInput, match="cut.png"):
        read_upload(truncated)
    with pytest.raises(BadInput, match=r"good.png is 40x30 pixels; the demo takes images up to 1,000 pixels"):
        read_upload(good, max_pixels=1000)
    with pytest.raises(BadInput, match=r"the demo takes images up to 0 MB"):
        read_upload(good, max_bytes=10)
    with pytest.raises(BadInput, match="could not be read"):
        read_upload(tmp_path / "gone.png")


def test_uploads_become_the_condition_training_makes():
    photo = Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8))
    edge = get_condition("edge").at_resolution(64)
    assert torch.equal(condition_from_upload(edge, photo), edge.control_image(photo))

    sr = get_condition("sr").at_resolution(64)
    low = photo.resize((24, 20))
    up = condition_from_upload(sr, low)
    assert up.shape == (1, 3, 64, 64)
    expected = np.asarray(sr.bicubic_upscale(low.crop((2, 0, 22, 20)), (64, 64)), dtype=np.float32) / 255
    assert np.allclose(up[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)

    depth = get_condition("depth").at_resolution(64)
    grey = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)))
    made = condition_from_upload(depth, grey.convert("RGB"), depth_map=True)
    assert made.shape == (1, 3, 64, 64) and made[0, 0, 0, 0] == 0 and made[0, 0, 0, -1] == 1  # near is bright


def test_depth_of_a_photo_without_the_estimator_is_a_message_not_a_traceback(monkeypatch):
    depth = get_condition("depth", source="estimator").at_resolution(64)

    def no_weights(image):
        raise FileNotFoundError("the MiDaS weights are not in the cache\nmore lines")

    monkeypatch.setattr(depth, "estimate", no_weights)
    with pytest.raises(BadInput, match="could not be made: the MiDaS weights are not in the cache.*depth map"):
        condition_from_upload(depth, Image.new("RGB", (64, 64)))


def test_inpaint_condition_cuts_the_brushed_hole_after_fitting_both():
    photo = Image.new("RGB", (128, 96), (255, 0, 0))
    mask = np.zeros((96, 128), dtype=bool)
    mask[:, 64:] = True  # the right half
    cond = inpaint_condition(get_condition("inpaint").at_resolution(32), photo, mask)
    assert cond.shape == (1, 4, 32, 32)
    hole = cond[0, 3]
    assert hole[:, :14].sum() == 0 and hole[:, 18:].all()  # 128x96 -> center crop 96 -> columns 16.. are the hole
    assert (cond[0, 0][hole > 0] == 0).all() and (cond[0, 0][hole == 0] == 1).all()
    with pytest.raises(BadInput, match="brush the mask on the uploaded image"):
        inpaint_condition(get_condition("inpaint").at_resolution(32), photo, mask[:10])
