"""Registry, config round trips, prepare/save_png and input checks shared by all conditions."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from condistill.conditions import (
    Condition,
    DepthCondition,
    EdgeCondition,
    InpaintCondition,
    SRCondition,
    available_conditions,
    condition_from_config,
    get_condition,
    register_condition,
)
from condistill.conditions import condition as base
from condistill.data.record import Record


def scene(width=64, height=64):
    """Flat grey background, a red square and a blue disc, with a matching depth map."""
    image = Image.new("RGB", (width, height), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 27, 27), fill=(220, 40, 40))
    draw.ellipse((34, 30, 56, 52), fill=(40, 80, 225))
    depth = np.full((height, width), 0.1, dtype=np.float32)
    depth[8:28, 8:28] = 0.6
    depth[30:53, 34:57] = 0.9
    return Record(image=image, caption="a red square", depth=depth, key="test-scene")


def test_available_conditions_lists_the_builtins():
    assert available_conditions() == ["depth", "edge", "inpaint", "none", "paired", "segmentation", "sr"]


def test_get_condition_builds_the_registered_class_with_options():
    cond = get_condition("sr", scales=(4,))
    assert isinstance(cond, SRCondition) and cond.scales == (4,)
    assert isinstance(get_condition("edge"), EdgeCondition)
    assert isinstance(get_condition("depth"), DepthCondition)
    assert isinstance(get_condition("inpaint"), InpaintCondition)


def test_unknown_condition_name_lists_available_ones():
    with pytest.raises(ValueError, match="Unknown condition 'canny'.*depth, edge, inpaint, none, paired, segmentation, sr"):
        get_condition("canny")


def test_unknown_option_names_the_valid_options():
    with pytest.raises(TypeError, match="'threshold'.*Valid options: low_threshold, high_threshold"):
        get_condition("edge", threshold=3)


def test_invalid_option_value_is_a_value_error():
    with pytest.raises(ValueError, match="min_coverage"):
        get_condition("inpaint", min_coverage=0.6, max_coverage=0.2)


class _Ones(Condition):
    name = "ones"
    channels = 1

    def __init__(self, *, value: float = 1.0):
        self.value = value

    def compute(self, record, seed):
        width, height = record.image.size
        return torch.full((1, height, width), float(self.value))


class _WrongShape(_Ones):
    name = "wrong"

    def compute(self, record, seed):
        return torch.zeros(2, 3, 3)


def test_register_condition_adds_a_custom_condition(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    assert register_condition(_Ones) is _Ones
    assert "ones" in available_conditions()
    cond = get_condition("ones", value=0.5)
    assert torch.equal(cond(scene()), torch.full((1, 64, 64), 0.5))
    assert condition_from_config(cond.config()) == cond


def test_register_condition_rejects_bad_classes(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class OtherEdge(_Ones):
        name = "edge"

    with pytest.raises(ValueError, match="already registered"):
        register_condition(OtherEdge)
    with pytest.raises(TypeError, match="Condition subclass"):
        register_condition(dict)

    class Abstract(Condition):
        name = "abstract"
        channels = 1

    with pytest.raises(TypeError, match="abstract"):
        register_condition(Abstract)

    class NoName(_Ones):
        name = ""

    with pytest.raises(ValueError, match="name"):
        register_condition(NoName)


def test_call_checks_the_subclass_output():
    with pytest.raises(RuntimeError, match="shape"):
        _WrongShape()(scene())
    with pytest.raises(RuntimeError, match=r"outside \[0, 1\]"):
        _Ones(value=2.0)(scene())


CUSTOM = [
    EdgeCondition(low_threshold=30, high_threshold=90, use_record_conditioning=True),
    DepthCondition(source="record", normalize=True, estimator="zoe", estimator_model_type="zoedepth_nk"),
    SRCondition(scales=(3, 4), downsample="area", blur_probability=0.25, jpeg_quality=(50, 60)),
    InpaintCondition(min_coverage=0.2, max_coverage=0.3, rectangle_probability=1.0),
]


@pytest.mark.parametrize("cond", CUSTOM, ids=lambda c: c.name)
def test_config_round_trips_through_json(cond):
    config = json.loads(json.dumps(cond.config()))
    assert config["name"] == cond.name
    rebuilt = condition_from_config(config)
    assert type(rebuilt) is type(cond)
    assert rebuilt.config() == cond.config()
    assert type(cond).from_config(config).config() == cond.config()
    assert rebuilt != type(cond)()  # the options really were carried over


def test_from_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="'edge', not 'sr'"):
        SRCondition.from_config({"name": "edge"})
    with pytest.raises(TypeError, match="Valid options"):
        SRCondition.from_config({"name": "sr", "scale": 4})
    with pytest.raises(ValueError, match="'name'"):
        condition_from_config({"scales": [4]})


@pytest.mark.parametrize("name", ["depth", "edge", "inpaint", "sr"])
def test_save_png_writes_a_readable_png_of_the_image_size(tmp_path, name):
    cond = get_condition(name)
    record = scene(width=48, height=40)
    record.depth = record.depth[:40, :48]
    c = cond(record, seed=3)
    path = cond.save_png(c, tmp_path / "sub" / f"{name}.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (48, 40)
        assert png.mode == "RGB"
        np.asarray(png)  # decodes


def test_to_pil_rejects_the_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\[4, H, W\]"):
        InpaintCondition().to_pil(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError):
        SRCondition().to_pil(np.zeros((3, 8, 8)))


def test_call_input_errors():
    cond = SRCondition()
    with pytest.raises(TypeError, match="prepare"):
        cond(scene().image)
    with pytest.raises(ValueError, match="non-negative integer"):
        cond(scene(), seed=-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        cond(scene(), seed=1.5)
    with pytest.raises(TypeError, match="PIL.Image"):
        cond(Record(image=np.zeros((8, 8, 3), np.uint8)))


def test_prepare_matches_calling_with_a_record():
    record = scene()
    depth = DepthCondition()
    assert torch.equal(depth.prepare(record.image, seed=2, depth=record.depth), depth(record, seed=2))
    sr = SRCondition()
    assert torch.equal(sr.prepare(record.image, seed=5), sr(record, seed=5))
    with pytest.raises(TypeError, match="valid fields"):
        sr.prepare(record.image, mask=None)
    with pytest.raises(TypeError, match="PIL.Image"):
        sr.prepare(np.zeros((8, 8, 3), np.uint8))


def test_non_rgb_images_are_converted():
    record = scene()
    grey = Record(image=record.image.convert("L"))
    c = SRCondition()(grey, seed=0)
    assert c.shape == (3, 64, 64)
    assert torch.allclose(c[0], c[1]) and torch.allclose(c[1], c[2])


def test_conditions_that_are_not_images_have_no_start_image():
    for name in ("edge", "depth"):
        with pytest.raises(ValueError, match=f"the {name} condition holds no image to start sampling from"):
            get_condition(name).start_image(torch.zeros(1, 1, 8, 8))


def test_which_conditions_start_from_their_own_image():
    from condistill.conditions import condition_class

    for name, image in (("sr", True), ("inpaint", True), ("edge", False), ("depth", False)):
        assert condition_class(name).has_start_image() is image
        assert condition_class(name).start_description() == ("the input" if image else "the zero latent")
    with pytest.raises(ValueError, match="Available conditions"):
        condition_class("nope")


def test_a_registered_condition_brings_its_own_fidelity_metric_to_eval(monkeypatch):
    """One class and one registration: eval's parser takes the new name and its tables use the class's metric."""
    from condistill.evaluation.command import eval_parser as _eval_parser
    from condistill.evaluation.evaluate import fidelity_metric, markdown_table, ratio_summary

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class Brightness(_Ones):
        name = "brightness"
        fidelity = ("brightness_error", "lower")

        def fidelity_scores(self, images, data, judge):
            return {"brightness_error": float((images.mean() - data["conditioning"].mean()).abs())}

    register_condition(Brightness)
    assert fidelity_metric("brightness") == ("brightness_error", "lower")
    assert _eval_parser().parse_args(["--condition", "brightness", "--student", "x"]).condition == "brightness"
    scores = Brightness().fidelity_scores(torch.full((1, 3, 4, 4), 0.5), {"conditioning": torch.zeros(1, 1, 4, 4)}, None)
    assert scores == {"brightness_error": 0.5}
    rows = [{"name": n, "sampler": "codi", "steps": s, "guidance": 1.0,
             "metrics": {"brightness_error": e, "frechet_distance": 10.0, "seconds_per_image": t}}
            for n, s, e, t in (("student-4", 4, 0.1, 0.1), ("baseline-50", 50, 0.2, 1.0))]
    report = {"condition": "brightness", "rows": rows}
    assert "brightness_error (lower better)" in markdown_table(report).splitlines()[0]
    assert ratio_summary(report, "student-4", "baseline-50")["student_better_or_equal"] is True
    assert fidelity_metric("edge") == ("edge_f1", "higher")  # the built-in ones say theirs the same way


def test_a_registered_condition_with_presets_is_a_train_recipe(monkeypatch, capsys):
    """Its class's description and presets are what ``condistill train NAME --help`` shows; without presets a
    condition has no recipe."""
    from condistill.cli import main
    from condistill.presets import CPU, RECIPES, presets_for

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class Glow(_Ones):
        name = "glow"
        description = "glow: a constant glow over the image."
        presets = {"cpu-demo": dict(_help="a glow on CPU", output_dir="runs/glow", max_steps=5, **CPU)}

    register_condition(Glow)
    register_condition(_Ones)  # no presets
    assert list(RECIPES)[:4] == ["edge", "depth", "sr", "inpaint"] and "glow" in RECIPES and "ones" not in RECIPES
    assert presets_for("glow")["cpu-demo"]["max_steps"] == 5
    with pytest.raises(SystemExit):
        main(["train", "glow", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "glow: a constant glow over the image." in out and "a glow on CPU" in out
