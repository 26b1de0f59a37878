"""Adapter files are checked before anything is built from them (training side: load_student,
load_student_weights, Student.load_weights); the same checks run in load_adapter (tests/test_pipeline.py)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_damage import DAMAGES, KINDS, assert_names, damage, forbid_pickle_loading, rehash
from helpers import torch_single_thread  # noqa: F401

from condistill.adapters import AdapterWeightsError, available_adapters, build_student, get_adapter_class
from condistill.adapters.save_load import load_student, load_student_weights, read_adapter_config
from condistill.frozen import load_base

def test_every_kind_declares_the_files_it_writes(exports):
    for kind in available_adapters():
        declared = get_adapter_class(kind).weight_components
        assert declared and read_adapter_config(exports[kind])["weight_files"] == declared


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_load_student_refuses_damaged_files(kind, how, copy_of, base_path, monkeypatch):
    folder = copy_of(kind)
    phrases = damage(folder, how)
    forbid_pickle_loading(monkeypatch)
    with pytest.raises(AdapterWeightsError) as info:
        load_student(folder, load_base(base_path))
    assert_names(info.value, phrases)
    # the same checks when loading into a student built by hand
    with pytest.raises(AdapterWeightsError) as info:
        load_student_weights(build_student(kind, load_base(base_path), 3, **KINDS[kind]), folder)
    assert_names(info.value, phrases)


@pytest.mark.parametrize("how", ["deleted_tensor", "nan_tensor", "pickle_only"])
def test_lora_condition_adapter_file_is_checked_too(how, copy_of, base_path, monkeypatch):
    folder = copy_of("lora")
    phrases = damage(folder, how, component="t2i_adapter")
    forbid_pickle_loading(monkeypatch)
    with pytest.raises(AdapterWeightsError) as info:
        load_student(folder, load_base(base_path))
    assert_names(info.value, phrases)


@pytest.mark.parametrize("kind", list(KINDS))
def test_nothing_is_loaded_into_the_student_when_a_check_fails(kind, copy_of, base_path):
    """A NaN in the *last* tensor read must not leave the earlier ones loaded."""
    folder = copy_of(kind)
    damage(folder, "nan_tensor")
    student = build_student(kind, load_base(base_path), 3, **KINDS[kind])
    before = student.trainable_state_dict()
    with pytest.raises(AdapterWeightsError):
        student.load_weights(folder, read_adapter_config(folder)["weight_files"])
    after = student.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_folder_without_config_uses_the_default_names(copy_of, base_path):
    folder = copy_of("t2i_adapter")
    (folder / "condistill_config.json").unlink()
    student = build_student("t2i_adapter", load_base(base_path), 3, **KINDS["t2i_adapter"])
    student.load_weights(folder)  # no config: the kind's default file names
    (folder / "t2i_adapter" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, folder / "t2i_adapter" / "diffusion_pytorch_model.bin")
    with pytest.raises(AdapterWeightsError, match="only pickle weights"):
        load_student_weights(student, folder)


def test_config_edits_are_named(copy_of, base_path):
    folder = copy_of("controlnet")
    file = folder / "condistill_config.json"
    good = json.loads(file.read_text())
    cases = {
        "pickle named in the config": (
            {"weight_files": {"controlnet": "controlnet/diffusion_pytorch_model.bin"}},
            "'diffusion_pytorch_model.bin' of 'controlnet' is not safetensors",
        ),
        "a path out of the folder": (
            {"weight_files": {"controlnet": "../elsewhere/diffusion_pytorch_model.safetensors"}},
            "is not a path inside the adapter folder",
        ),
        "weight files of another kind": (
            {"weight_files": {"lora": "pytorch_lora_weights.safetensors", "t2i_adapter": "t2i_adapter/x.safetensors"}},
            "says kind 'controlnet' but its weight_files list ['lora', 't2i_adapter'] (the files of a 'lora' adapter)",
        ),
        "no weight files": ({"weight_files": []}, "weight_files must map component names"),
        "options of another kind": (
            {"kind": "t2i_adapter", "weight_files": {"t2i_adapter": "controlnet/diffusion_pytorch_model.safetensors"}},
            "says kind 't2i_adapter' but its adapter_options",
        ),
    }
    for name, (edit, phrase) in cases.items():
        file.write_text(json.dumps(dict(good, **edit)))
        with pytest.raises(AdapterWeightsError) as info:
            load_student(folder, load_base(base_path))
        assert phrase in str(info.value), (name, str(info.value))


def test_a_file_that_is_not_safetensors(copy_of, base_path):
    folder = copy_of("controlnet")
    (folder / "controlnet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage, cut short")
    with pytest.raises(AdapterWeightsError, match="changed since export"):
        load_student(folder, load_base(base_path))
    rehash(folder)
    with pytest.raises(AdapterWeightsError, match="is not a valid safetensors file"):
        load_student(folder, load_base(base_path))


def test_sharded_checkpoint_is_checked(copy_of, base_path):
    """A ``*.safetensors.index.json`` (sharded weights) is followed to its shards, which are checked too."""
    folder = copy_of("t2i_adapter")
    sub = folder / "t2i_adapter"
    state = load_file(sub / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, sub / name)
    (sub / "diffusion_pytorch_model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config_file = folder / "condistill_config.json"
    config = json.loads(config_file.read_text())
    config["weight_files"] = {"t2i_adapter": "t2i_adapter/diffusion_pytorch_model.safetensors.index.json"}
    config_file.write_text(json.dumps(config))
    rehash(folder)
    assert "t2i_adapter/part-2.safetensors" in json.loads(config_file.read_text())["checksums"]  # shards are hashed
    student = load_student(folder, load_base(base_path))
    assert torch.equal(student.adapter.state_dict()[keys[0]], state[keys[0]])

    (sub / "part-2.safetensors").unlink()
    with pytest.raises(AdapterWeightsError, match="part-2.safetensors of 't2i_adapter' is missing"):
        load_student(folder, load_base(base_path))
