import numpy as np
import pytest

from condistill.world.scenes import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    SHAPES,
    SyntheticScenes,
    attribute_labels,
    generate_scene,
    parse_caption,
    vocabulary,
)


def test_same_seed_same_scene_and_different_index_differs():
    a, b = generate_scene(7, "train", 64, seed=3), generate_scene(7, "train", 64, seed=3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.depth, b.depth) and np.array_equal(a.masks, b.masks)
    assert a.caption == b.caption
    c = generate_scene(8, "train", 64, seed=3)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_train_and_heldout_are_disjoint_streams():
    train = {np.asarray(generate_scene(i, "train").image).tobytes() for i in range(200)}
    held = {np.asarray(generate_scene(i, "heldout").image).tobytes() for i in range(200)}
    assert not train & held


@pytest.mark.parametrize("resolution", [32, 64, 96])
def test_record_schema(resolution):
    r = generate_scene(3, "heldout", resolution)
    assert r.image.mode == "RGB" and r.image.size == (resolution, resolution)
    assert r.depth.shape == (resolution, resolution) and r.depth.dtype == np.float32
    assert 0.0 <= r.depth.min() and r.depth.max() <= 1.0
    k = len(r.attributes["objects"])
    assert 1 <= k <= 3 and r.masks.shape == (k, resolution, resolution) and r.masks.dtype == bool
    # masks are disjoint visible regions, and the main object is visible
    assert r.masks.sum(0).max() <= 1 and r.masks[0].sum() > 0
    assert r.key and r.caption


def test_main_object_is_nearest_and_named_first():
    for i in range(100):
        r = generate_scene(i, "train")
        objs = r.attributes["objects"]
        # the main object's visible pixels are at its own disparity, the nearest in the scene
        assert np.allclose(r.depth[r.masks[0]], objs[0]["disparity"])
        assert objs[0]["size"] in ("medium", "large")
        parsed = parse_caption(r.caption)
        assert parsed == {
            "background": r.attributes["background"]["colour"],
            "colour": objs[0]["colour"],
            "shape": objs[0]["shape"],
        }


def test_variety_covers_every_attribute():
    labels = [attribute_labels(generate_scene(i)) for i in range(600)]
    assert {l["background"] for l in labels} == set(range(len(BACKGROUND_COLOURS)))
    assert {l["colour"] for l in labels} == set(range(len(OBJECT_COLOURS)))
    assert {l["shape"] for l in labels} == set(range(len(SHAPES)))
    counts = {len(generate_scene(i).attributes["objects"]) for i in range(100)}
    assert counts == {1, 2, 3}


def test_occlusion_depth_structure():
    # the floor gets nearer towards the bottom of the image: depth grows down a clear column
    r = generate_scene(0, "train", 64)
    col = r.depth[:, 0]
    floor = col[col > 0.1]
    assert np.all(np.diff(floor) >= -1e-6)


def test_captions_use_the_vocabulary():
    vocab = set(vocabulary())
    for i in range(200):
        assert set(generate_scene(i).caption.split()) <= vocab


def test_sequence_interface_and_errors():
    ds = SyntheticScenes("heldout", size=5, resolution=32)
    assert len(ds) == 5 and ds[-1].key == ds[4].key and len(ds[1:3]) == 2
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("validation")
    with pytest.raises(ValueError, match="size"):
        SyntheticScenes("train", size=0)
