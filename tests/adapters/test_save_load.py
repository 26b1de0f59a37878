"""save_adapter / read_adapter_config / load_student_weights: exact round trips and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_damage import rehash
from helpers import make_tiny_base, model_inputs, perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import AdapterWeightsError, build_student
from condistill.frozen import load_base
from condistill.adapters.save_load import (
    condistill_version,
    load_student,
    load_student_weights,
    read_adapter_config,
    save_adapter,
)

KINDS = [
    ("controlnet", {}),
    ("t2i_adapter", {"adapter_type": "light_adapter"}),
    ("lora", {"rank": 2, "lora_alpha": 3, "targets": "all"}),
]
KIND_IDS = [k for k, _ in KINDS]


def _export(student, base, out, **overrides):
    kwargs = dict(
        base_name_or_path=str(base.name_or_path),
        base_fingerprint=base.fingerprint(),
        condition_name="edge",
        condition_config={"low_threshold": 100, "high_threshold": 200},
        num_grid=50,
        prediction_type=base.prediction_type,
        recommended_steps=4,
        recommended_guidance=1.0,
        resolution=base.resolution,
        noise_schedule=base.noise_schedule_config(),
        extra={"loss": "codi"},
    )
    kwargs.update(overrides)
    return save_adapter(student, out, **kwargs)


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
def test_round_trip_with_perturbed_weights(kind, options, base_path, tmp_path):
    base = load_base(base_path)
    student = build_student(kind, base, 3, **options)
    perturb_(student, seed=11)
    out = _export(student, base, tmp_path / "export")

    # every weight file is safetensors, nothing pickled
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    config = read_adapter_config(out)
    assert config["kind"] == kind
    for rel in config["weight_files"].values():
        assert (out / rel).is_file() and rel.endswith(".safetensors")

    rebuilt = load_student(out, load_base(base_path))
    z, t, ehs, cond = model_inputs(base)
    with torch.no_grad():
        expected = student(z, t, ehs, student.encode_condition(cond))
        got = rebuilt(z, t, ehs, rebuilt.encode_condition(cond))
        teacher = student(z, t, ehs, use_adapter=False)
    assert torch.equal(got, expected)
    assert (expected - teacher).abs().max() > 1e-3  # the perturbation matters

    # load_student_weights into a freshly built student of the same options
    fresh = build_student(kind, load_base(base_path), 3, **options)
    load_student_weights(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh(z, t, ehs, fresh.encode_condition(cond)), expected)


def test_config_contents_and_scheduler(base_path, tmp_path):
    from condistill.method.codi_scheduler import CoDiScheduler

    base = load_base(base_path)
    student = build_student("controlnet", base, 3)
    out = _export(student, base, tmp_path / "export", recommended_steps=2, recommended_guidance=3.0, num_grid=20)
    config = read_adapter_config(out)
    assert config["condistill_version"] == condistill_version()
    assert config["base_fingerprint"] == base.fingerprint()
    assert config["condition_config"] == {"low_threshold": 100, "high_threshold": 200}
    assert (config["num_grid"], config["recommended_steps"], config["recommended_guidance"]) == (20, 2, 3.0)
    assert config["resolution"] == 16 and config["prediction_type"] == "epsilon"
    assert config["weight_files"] == {"controlnet": "controlnet/diffusion_pytorch_model.safetensors"}
    assert config["adapter_options"]["condition_channels"] == 3
    assert config["extra"] == {"loss": "codi"}

    raw = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert raw["_class_name"] == "CoDiScheduler"
    scheduler = CoDiScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.num_grid == 20
    assert scheduler.config.prediction_type == "epsilon"
    assert torch.equal(scheduler.alphas_cumprod, base.alphas_cumprod)


def test_noise_schedule_read_from_base_folder_when_not_given(base_path, tmp_path):
    base = load_base(base_path)
    cfg_file = base_path / "scheduler" / "scheduler_config.json"
    out = _export(build_student("t2i_adapter", base, 3), base, tmp_path / "e", noise_schedule=None)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    base_sched = json.loads(cfg_file.read_text())
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert sched[key] == base_sched[key]


def test_run_folder_layout(base_path, tmp_path):
    base = load_base(base_path)
    _export(build_student("t2i_adapter", base, 3), base, tmp_path / "run" / "adapter")
    assert read_adapter_config(tmp_path / "run")["kind"] == "t2i_adapter"
    with pytest.raises(FileNotFoundError, match="No condistill_config.json"):
        read_adapter_config(tmp_path / "elsewhere")


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
def test_missing_and_unexpected_keys_are_named(kind, options, base_path, tmp_path):
    base = load_base(base_path)
    out = _export(build_student(kind, base, 3, **options), base, tmp_path / "export")
    rel = read_adapter_config(out)["weight_files"][kind]
    file = out / rel
    original = load_file(file)
    dropped = sorted(original)[0]

    broken = dict(original)
    del broken[dropped]
    save_file(broken, file)
    rehash(out)  # as a hand that also edits the checksums: the tensor checks behind them run
    with pytest.raises(AdapterWeightsError, match="1 missing key") as info:
        load_student_weights(build_student(kind, load_base(base_path), 3, **options), out)
    assert dropped in str(info.value) and str(file) in str(info.value)

    extra_key = "unet.some_block.lora_A.weight" if kind == "lora" else "some_block.extra.weight"
    save_file(dict(original, **{extra_key: torch.zeros(2)}), file)
    rehash(out)
    with pytest.raises(AdapterWeightsError, match="1 unexpected key") as info:
        load_student_weights(build_student(kind, load_base(base_path), 3, **options), out)
    assert "some_block" in str(info.value)


def test_wrong_options_are_reported(base_path, tmp_path):
    base = load_base(base_path)
    out = _export(build_student("lora", base, 3, rank=2, lora_alpha=3), base, tmp_path / "export")
    with pytest.raises(AdapterWeightsError, match="wrong shape"):
        load_student_weights(build_student("lora", load_base(base_path), 3, rank=4, lora_alpha=3), out)
    with pytest.raises(AdapterWeightsError, match="lora_alpha=3.0"):
        load_student_weights(build_student("lora", load_base(base_path), 3, rank=2, lora_alpha=2), out)
    with pytest.raises(ValueError, match="holds a 'lora' adapter but the student is 'controlnet'"):
        load_student_weights(build_student("controlnet", load_base(base_path), 3), out)


def test_read_adapter_config_validation(base_path, tmp_path):
    base = load_base(base_path)
    out = _export(build_student("t2i_adapter", base, 3), base, tmp_path / "export")
    file = out / "condistill_config.json"
    good = json.loads(file.read_text())

    file.write_text(json.dumps(dict(good, shiny_new_option=1)))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        read_adapter_config(out)

    file.write_text(json.dumps({k: v for k, v in good.items() if k not in ("num_grid", "kind")}))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['kind', 'num_grid'\]"):
        read_adapter_config(out)

    major = int(condistill_version().split(".")[0])
    file.write_text(json.dumps(dict(good, condistill_version=f"{major + 1}.0.0")))
    with pytest.raises(ValueError, match="newer major version.*upgrade"):
        read_adapter_config(out)

    file.write_text(json.dumps(dict(good, condistill_version=f"{major}.99.0")))
    read_adapter_config(out)  # newer minor: fine

    file.write_text(json.dumps(dict(good, kind="hypernetwork")))
    with pytest.raises(ValueError, match="unknown adapter kind 'hypernetwork'"):
        read_adapter_config(out)

    file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter_config(out)


def test_load_student_checks_base(base_path, tmp_path):
    base = load_base(base_path)
    out = _export(build_student("t2i_adapter", base, 3), base, tmp_path / "export")
    other = load_base(make_tiny_base(tmp_path, block_out_channels=(32, 64), name="other"))
    with pytest.raises(ValueError, match=r"block_out_channels: \[32, 64, 64\] != \[32, 64\]"):
        load_student(out, other)


def test_save_adapter_input_errors(base_path, tmp_path):
    base = load_base(base_path)
    student = build_student("t2i_adapter", base, 3)
    with pytest.raises(ValueError, match="recommended_steps"):
        _export(student, base, tmp_path / "a", recommended_steps=0)
    with pytest.raises(ValueError, match="num_grid"):
        _export(student, base, tmp_path / "b", num_grid=1)
    with pytest.raises(ValueError, match="differs from the base fingerprint"):
        _export(student, base, tmp_path / "c", prediction_type="v")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        _export(student, base, tmp_path / "d", condition_config={"f": object()})
    with pytest.raises(TypeError, match="condistill Student"):
        _export(torch.nn.Linear(2, 2), base, tmp_path / "e")


def test_schema_keys_sampling_size_and_newer_schemas(base_path, tmp_path):
    """The export writes its schema version, the sampling size and the one-step start (a bare timestep in its dict
    form, in the config and the scheduler's); a newer schema loads with a warning."""
    from condistill.adapters.save_load import SCHEMA_VERSION
    from condistill.pipeline import trained_condition

    base = load_base(base_path)
    student = build_student("controlnet", base, 3)
    out = _export(student, base, tmp_path / "export", height=24, width=32, one_step_start=499)
    config = read_adapter_config(out)
    assert (config["schema_version"], config["height"], config["width"]) == (SCHEMA_VERSION, 24, 32)
    assert config["one_step_start"] == {"timestep": 499, "from": "zero"}  # edge is not an image: the zero latent
    written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["one_step_start"]
    assert written == json.loads((out / "condistill_config.json").read_text())["one_step_start"] == config["one_step_start"]
    condition = trained_condition(config)  # the recorded options, though this config has no "name" in them
    assert (condition.name, condition.low_threshold, condition.high_threshold) == ("edge", 100, 200)
    assert condition.training_resolution == 16
    for bad in ({"height": 0}, {"width": "64"}, {"one_step_start": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _export(student, base, tmp_path / "bad", **bad)
    raw = json.loads((out / "condistill_config.json").read_text())
    raw.update(schema_version=SCHEMA_VERSION + 1, a_later_key=True)
    (out / "condistill_config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning) as caught:
        read_adapter_config(out)
    text = " ".join(str(w.message) for w in caught)
    assert f"schema version {SCHEMA_VERSION + 1}" in text and "a_later_key" in text
