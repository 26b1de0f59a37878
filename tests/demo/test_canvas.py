import numpy as np
import pytest
import torch

from condistill.demo.canvas import MAX_POINTS, empty, strokes_ink
from condistill.demo.inputs import BadInput, canvas_for, sketch_to_edges


def test_strokes_are_drawn_again_with_the_browser_brush():
    value = {"strokes": [[[100, 200.4], [300, 200.4]], [[50, 50]]], "generation": 3}
    ink = strokes_ink(value, 512, 8)
    assert ink.shape == (512, 512)
    column = np.nonzero(ink[:, 200])[0]
    assert 7 <= len(column) <= 9 and abs(column.mean() - 200.4) < 1  # 8 px wide, centred on the stroke
    assert ink[200, 96:304].all() and not ink[200, 90] and not ink[200, 310]  # round caps reach brush/2 past the ends
    assert 40 <= ink[46:55, 46:55].sum() <= 81  # a dot is a round blot
    assert not strokes_ink(empty(), 512, 8).any() and not strokes_ink(None, 512, 8).any()


def test_a_stroke_drawn_with_the_page_brush_is_one_or_two_training_pixels_wide():
    canvas = canvas_for(64)
    widths = []
    for y in np.linspace(100, 108, 17):  # wherever it falls between training pixels
        edges = sketch_to_edges(strokes_ink({"strokes": [[[40, y], [400, y]]]}, canvas.size, canvas.brush), 64)
        rows = torch.nonzero(edges[0, 0].any(dim=1)).flatten().tolist()
        assert rows and rows[-1] - rows[0] == len(rows) - 1 and len(rows) <= 2, (y, rows)
        widths.append(len(rows))
    assert widths.count(1) >= len(widths) // 2  # mostly one pixel, as Canny draws


@pytest.mark.parametrize("strokes", ["not a list", [[["a", 1]]], [[[1, 2, 3]]]])
def test_unreadable_strokes_are_refused_in_words(strokes):
    with pytest.raises(BadInput, match="cannot read; reload the page"):
        strokes_ink({"strokes": strokes}, 64, 2)


def test_a_drawing_past_the_point_budget_is_refused():
    with pytest.raises(BadInput, match="clear the canvas"):
        strokes_ink({"strokes": [[[0, 0]] * (MAX_POINTS + 1)]}, 64, 2)
