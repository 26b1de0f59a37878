"""Segmentation condition: the scenes' object classes, colour-coded; fidelity by the judge's segmentation."""
import numpy as np
import pytest
import torch
from PIL import Image

from condistill.conditions import SegmentationCondition, get_condition
from condistill.conditions.segmentation import CLASSES, PALETTE, class_map, mean_iou
from condistill.data.record import Record
from condistill.world.judge import load_judge
from condistill.world.scenes import generate_scene


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_the_map_colours_each_visible_object_by_its_shape():
    record = generate_scene(3, "heldout")
    c = SegmentationCondition()(record)
    assert c.shape == (3, 64, 64) and c.dtype == torch.float32
    classes = class_map(c).numpy()
    expected = np.zeros((64, 64), dtype=np.int64)
    for mask, obj in zip(record.masks, record.attributes["objects"]):
        expected[mask] = CLASSES.index(obj["shape"])
    assert np.array_equal(classes, expected) and (classes > 0).any() and (classes == 0).any()
    colours = {tuple(v) for v in (c.permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    assert colours <= set(PALETTE)


def test_a_given_map_wins_and_survives_resizing_and_jpeg_noise():
    record = generate_scene(5, "heldout")
    seg = SegmentationCondition()
    made = seg(record)
    noisy = np.clip(np.asarray(seg.to_pil(made)).astype(int) + np.random.default_rng(0).integers(-30, 30, (64, 64, 3)),
                    0, 255).astype(np.uint8)
    given = Image.fromarray(noisy).resize((128, 128), Image.NEAREST)
    photo = Record(image=record.image, conditioning=given)
    assert torch.equal(seg(photo), made)


def test_records_without_masks_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="no object masks.*condistill train paired"):
        SegmentationCondition()(Record(image=Image.new("RGB", (32, 32))))
    record = generate_scene(1, "heldout")
    record.attributes["objects"][0]["shape"] = "star"
    with pytest.raises(ValueError, match="shape 'star' is not one of"):
        SegmentationCondition()(record)


def test_mean_iou():
    target = torch.tensor([[[0, 0, 1, 1]]])
    assert mean_iou(target, target) == 1.0
    assert mean_iou(torch.tensor([[[0, 0, 0, 1]]]), target) == pytest.approx((2 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        mean_iou(target, target[..., :2])


def test_the_judge_segments_real_scenes_well_and_mismatched_maps_badly(judge):
    records = [generate_scene(i, "heldout") for i in range(32)]
    seg = get_condition("segmentation")
    data = {"conditioning": torch.stack([seg(r) for r in records])}
    images = torch.stack([torch.from_numpy(np.asarray(r.image).copy()).permute(2, 0, 1).float() / 255 for r in records])
    real = seg.fidelity_scores(images, data, judge)["segmentation_miou"]
    shuffled = seg.fidelity_scores(images.roll(1, 0), data, judge)["segmentation_miou"]
    assert real > 0.7 and shuffled < 0.4, (real, shuffled)


def test_the_distillation_target_is_twice_the_teachers_miou():
    rows = {"student-4": {"segmentation_miou": 0.5}, "teacher-ddim-50": {"segmentation_miou": 0.2}}
    text, met = SegmentationCondition.distillation_target(rows)
    assert met and "0.400" in text
    assert SegmentationCondition.distillation_target({"student-4": {}}) is None


def test_at_sampling_time_the_given_image_is_the_map():
    record = generate_scene(2, "heldout")
    seg = SegmentationCondition()
    made = seg(record)
    got = seg.control_image(seg.to_pil(made), resolution=0)
    assert torch.equal(got[0], made)
    assert seg.card_text()[1].startswith("your segmentation map")


def test_the_judge_refuses_duplicate_class_names(judge):
    with pytest.raises(ValueError, match="must name each of"):
        judge.segment(torch.zeros(1, 3, 64, 64), ("none", "circle", "circle", "square", "triangle", "diamond"))
