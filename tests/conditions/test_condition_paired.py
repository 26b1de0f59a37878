"""Paired condition: the data's own control images, or a named controlnet-aux detector's."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from helpers import make_fake_hub_cache

from condistill.conditions import PairedCondition, condition_from_config
from condistill.conditions.detectors import DETECTORS, Detector, DetectorWeightsError, detectors_without_weights
from condistill.data.record import Record


def photo(size=(64, 48)):
    image = Image.new("RGB", size, (40, 60, 90))
    ImageDraw.Draw(image).rectangle((12, 10, 40, 30), fill=(230, 200, 40))
    return image


def test_the_control_image_is_taken_as_it_is_and_missing_ones_are_refused():
    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    cond = PairedCondition(control_type="scribble")
    c = cond(Record(image=photo(), conditioning=control))
    assert c.shape == (3, 48, 64)
    assert torch.equal(c, torch.from_numpy(np.asarray(control).copy()).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match="has no control image.*detector"):
        cond(Record(image=photo(), key="k"))
    assert cond.record_conditioning == "required"
    assert condition_from_config(cond.config()) == cond and cond.config()["control_type"] == "scribble"


def test_at_sampling_time_the_given_image_is_the_control_image_fitted_like_training():
    control = photo((96, 64))
    got = PairedCondition().at_resolution(64).control_image(control)
    fitted = control.resize((96, 64)).crop((16, 0, 80, 64))
    assert got.shape == (1, 3, 64, 64)
    assert torch.allclose(got[0], torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1).float() / 255)


def test_a_detector_without_weights_makes_missing_controls_and_the_sampling_control():
    assert "canny" in detectors_without_weights() and "lineart_standard" in detectors_without_weights()
    cond = PairedCondition(control_type="edges", detector="canny")
    assert cond.record_conditioning == "optional"
    made = cond(Record(image=photo()))
    assert made.shape == (3, 48, 64) and made.max() > 0.5 and made.min() == 0.0
    assert torch.equal(cond.control_image(photo(), resolution=0)[0], made)
    # fidelity: the outputs' own controls against the inputs'
    real = torch.from_numpy(np.asarray(photo()).copy()).permute(2, 0, 1).float()[None] / 255
    data = {"pixel_values": real * 2 - 1, "conditioning": made[None]}
    scores = cond.fidelity_scores(real, data, None)
    assert scores["control_distance"] == 0.0 and scores["psnr"] > 60
    assert cond.fidelity_scores(torch.zeros_like(real), data, None)["control_distance"] > 0.01


def test_unknown_detector_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="detector must be None or one of canny"):
        PairedCondition(detector="sobel")
    with pytest.raises(ValueError, match="control_type must be a short name"):
        PairedCondition(control_type="")
    with pytest.raises(ValueError, match="unknown detector 'x'.*no weights needed: canny, lineart_standard"):
        Detector("x")


def _hed_weights(folder):
    from controlnet_aux.hed import ControlNetHED_Apache2

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / DETECTORS["hed"].files[0])
    return folder


def test_a_detector_with_weights_loads_them_from_the_offline_hub_cache(tmp_path, monkeypatch):
    cache = make_fake_hub_cache(tmp_path / "hub", "lllyasviel/Annotators", _hed_weights(tmp_path / "files"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cond = PairedCondition(control_type="soft edges", detector="hed", detect_resolution=64)
    cond.check()
    made = cond(Record(image=photo()))
    assert made.shape == (3, 48, 64) and torch.isfinite(made).all()
    # the same file from a local folder
    local = PairedCondition(detector="hed", detector_path=str(tmp_path / "files"), detect_resolution=64)
    assert torch.equal(local(Record(image=photo())), made)


def test_missing_weights_stop_in_one_line_naming_the_files_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DetectorWeightsError) as hub:
        PairedCondition(detector="lineart").check()
    message = str(hub.value)
    assert "\n" not in message and "sk_model.pth sk_model2.pth" in message
    assert "hf download lllyasviel/Annotators sk_model.pth sk_model2.pth" in message
    with pytest.raises(DetectorWeightsError, match="pidi.*table5_pidinet.pth.*the folder"):
        PairedCondition(detector="pidi", detector_path=str(tmp_path)).check()


def test_the_model_card_says_what_control_image_the_adapter_takes():
    from condistill.publish.card import condition_text

    config = {"condition_name": "paired", "condition_config": PairedCondition(control_type="scribble").config()}
    assert condition_text(config) == ("scribble-to-image", "your scribble control image, used as it is")
    default = {"condition_name": "paired", "condition_config": PairedCondition().config()}
    assert condition_text(default)[1] == "your control image, used as it is"
    config["condition_config"]["detector"] = "hed"
    assert condition_text(config)[1] == "your photo; the hed detector makes its scribble control image"
    assert condition_text({"condition_name": "edge", "condition_config": {}}) == ("edge-to-image", "your image")
    assert condition_text({"condition_name": "not-installed"}) == ("not-installed", "your image")


@pytest.mark.parametrize("name", detectors_without_weights())
def test_every_detector_without_weights_makes_a_control_image(name):
    control = Detector(name)(photo())
    assert control.mode == "RGB" and control.size == (64, 48)


def test_a_photos_only_dataset_with_a_detector_opens_and_a_controls_only_one_needs_the_column(tmp_path):
    import datasets

    from condistill.data import open_source

    datasets.Dataset.from_dict({"image": [photo(), photo()], "text": ["a", "b"]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).save_to_disk(tmp_path / "photos")
    records = list(open_source(str(tmp_path / "photos"), resolution=32, conditioning="optional"))
    assert len(records) == 2 and all(r.conditioning is None for r in records)  # the detector makes them
    with pytest.raises(KeyError, match="no column 'conditioning_image'"):
        open_source(str(tmp_path / "photos"), resolution=32, conditioning="required")
