"""Depth condition: exact record depth, estimator loading errors and estimator glue."""
import numpy as np
import pytest
import torch
from PIL import Image

from condistill.conditions import DepthCondition, EstimatorWeightsError
from condistill.conditions import depth as depth_module
from condistill.data.record import Record


def depth_record(width=64, height=48, with_depth=True):
    image = Image.new("RGB", (width, height), (90, 90, 90))
    depth = np.tile(np.linspace(0.05, 0.95, height, dtype=np.float32)[:, None], (1, width))
    depth[10:20, 10:30] = 1.0
    return Record(image=image, depth=depth if with_depth else None, key="d")


@pytest.mark.parametrize("source", ["auto", "record"])
def test_record_depth_is_used_exactly_and_replicated(source):
    record = depth_record()
    c = DepthCondition(source=source)(record)
    assert c.shape == (3, 48, 64) and c.dtype == torch.float32
    for ch in range(3):
        assert torch.equal(c[ch], torch.from_numpy(record.depth))


def test_normalize_stretches_to_the_full_range():
    record = depth_record()
    record.depth = record.depth * 0.5 + 0.2
    c = DepthCondition(normalize=True)(record)[0]
    assert float(c.min()) == 0.0 and abs(float(c.max()) - 1.0) < 1e-6
    # order (near brighter) is kept
    assert float(c[15, 15]) > float(c[40, 40]) > float(c[0, 40])


def test_record_depth_problems_are_reported():
    with pytest.raises(ValueError, match="has no depth.*source='auto'"):
        DepthCondition(source="record")(depth_record(with_depth=False))
    bad = depth_record()
    bad.depth = bad.depth[:, :10]
    with pytest.raises(ValueError, match="shape"):
        DepthCondition()(bad)
    metric = depth_record()
    metric.depth = metric.depth * 10
    with pytest.raises(ValueError, match="disparity-like"):
        DepthCondition()(metric)
    integer = depth_record()
    integer.depth = (integer.depth * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="divide 8-bit"):
        DepthCondition()(integer)


def test_missing_local_estimator_folder_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(EstimatorWeightsError) as info:
        DepthCondition(source="estimator", estimator_path=str(missing))
    message = str(info.value)
    assert "dpt_hybrid-midas-501f0c75.pt" in message
    assert str(missing) in message and "does not exist" in message
    assert "estimator_path" in message and "hf download" in message
    assert "source='record'" in message


def test_folder_without_the_weight_file_names_the_file(tmp_path):
    with pytest.raises(EstimatorWeightsError, match="ZoeD_M12_N.pt.*not in"):
        DepthCondition(source="estimator", estimator="zoe", estimator_path=str(tmp_path))


def test_auto_without_record_depth_needs_the_estimator(tmp_path):
    cond = DepthCondition(source="auto", estimator_path=str(tmp_path / "weights"))  # fine while unused
    assert cond(depth_record()).shape == (3, 48, 64)
    with pytest.raises(EstimatorWeightsError, match="dpt_hybrid-midas"):
        cond(depth_record(with_depth=False))


def test_loader_failures_are_wrapped_with_instructions(monkeypatch):
    class OfflineDetector:
        @classmethod
        def from_pretrained(cls, path, model_type, filename):
            raise OSError(f"cannot reach the Hub for {path}/{filename}")

    monkeypatch.setattr(depth_module, "import_controlnet_aux", lambda name: OfflineDetector)
    cond = DepthCondition(source="estimator", estimator_path="someone/depth-weights")
    with pytest.raises(EstimatorWeightsError, match="Hub repository 'someone/depth-weights'.*OSError.*--local-dir"):
        cond.load_estimator()


def test_estimator_output_is_resized_and_scaled(monkeypatch):
    calls = []

    def detector(image, detect_resolution, image_resolution, output_type):
        # mimics controlnet-aux: uint8 [h, w, 3] at the detect resolution, near = bright
        calls.append((image.shape, detect_resolution, output_type))
        ramp = np.linspace(0, 255, 128).round().astype(np.uint8)
        return np.repeat(np.tile(ramp[:, None], (1, 96))[..., None], 3, axis=2)

    cond = DepthCondition(source="estimator", detect_resolution=128)
    monkeypatch.setattr(cond, "load_estimator", lambda: detector)
    c = cond(depth_record(with_depth=False))
    assert calls == [((48, 64, 3), 128, "np")]
    assert c.shape == (3, 48, 64) and torch.equal(c[0], c[2])
    column = c[0, :, 5]
    assert float(column[0]) < 0.05 and float(column[-1]) > 0.95
    assert bool((column[1:] >= column[:-1]).all())
    # "estimator" ignores the record's own depth
    assert torch.equal(cond(depth_record()), c)


def test_invalid_options():
    with pytest.raises(ValueError, match="source"):
        DepthCondition(source="lidar")
    with pytest.raises(ValueError, match="estimator must be one of"):
        DepthCondition(estimator="leres")
    with pytest.raises(ValueError, match="zoedepth"):
        DepthCondition(estimator="zoe", estimator_model_type="dpt_large")
    with pytest.raises(ValueError, match="detect_resolution"):
        DepthCondition(detect_resolution=16)
