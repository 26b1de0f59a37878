"""Scenes rendered into arrays for the teacher and the judge (tools/worldbuild/render.py)."""
from __future__ import annotations

import numpy as np
import pytest

from condistill.world.judge import ATTRIBUTES
from condistill.world.scenes import SHAPES, attribute_labels, generate_scene
from worldbuild.render import MAIN_OBJECT, render_scenes


def test_arrays_match_the_scenes_and_targets_are_optional():
    scenes = render_scenes("heldout", 3, 32, seed=2)
    assert scenes.images.shape == (3, 32, 32, 3) and scenes.images.dtype == np.uint8
    assert scenes.depth.shape == (3, 32, 32) and scenes.depth.dtype == np.float16
    assert scenes.labels.shape == (3, len(ATTRIBUTES)) and scenes.dense.dtype == np.uint8
    rec = generate_scene(2, "heldout", 32, 2)
    assert np.array_equal(scenes.images[2], np.asarray(rec.image)) and scenes.captions[2] == rec.caption
    assert list(scenes.labels[2]) == [attribute_labels(rec)[a] for a in ATTRIBUTES]
    main = scenes.dense[2] >= MAIN_OBJECT
    assert np.array_equal(main, rec.masks[0])
    assert set(np.unique(scenes.dense[2][main] % MAIN_OBJECT)) == {1 + SHAPES.index(rec.attributes["objects"][0]["shape"])}
    light = render_scenes("heldout", 3, 32, seed=2, targets=False)
    assert light.depth is None and light.labels is None and light.dense is None
    assert np.array_equal(light.images, scenes.images) and light.captions == scenes.captions
    chw = light.images_chw()
    assert tuple(chw.shape) == (3, 3, 32, 32) and chw.is_contiguous()
    with pytest.raises(ValueError, match="positive"):
        render_scenes("train", 0)
