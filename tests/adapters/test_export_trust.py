"""Nothing lost, nothing trusted blindly (training side): every loader checks the config and the scheduler
config (types, ranges, agreement with each other and with the base) and the checksums of the files before it
builds anything; exports are written whole and swapped in; a run's export is found in ``<run>/adapter``.
The pipeline side (load_adapter) is tested in tests/test_pipeline.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from adapter_damage import BAD_CONFIGS, KINDS, edit_export, export
from helpers import make_tiny_base, torch_single_thread  # noqa: F401

from condistill.adapters import AdapterWeightsError, build_student
from condistill.adapters.config_checks import SCHEDULER_FILE, record_checksums
from condistill.adapters.errors import AdapterConfigError
from condistill.adapters.save_load import (SCHEMA_VERSION, find_adapter_dir, load_student, load_student_weights,
                                           read_adapter_config)
from condistill.files import sha256_file
from condistill.frozen import load_base

#: values that look odd but are legitimate: no guidance (0 and 1), a size that is not square (a one-step start is
#: also recorded in the scheduler's config, so no edit of one file alone is legitimate: tests/test_pipeline.py)
GOOD_EDITS = [{"recommended_guidance": 0}, {"recommended_guidance": 1}, {"recommended_guidance": 7.5},
              {"height": 24, "width": 32}]


def _loaders(folder, base_path, kind="t2i_adapter"):
    yield lambda: read_adapter_config(folder)
    yield lambda: load_student(folder, load_base(base_path))
    yield lambda: load_student_weights(build_student(kind, load_base(base_path), 3, **KINDS[kind]), folder)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_every_loader_refuses_a_config_that_cannot_be_trusted(case, copy_of, base_path):
    folder = copy_of()
    edit, phrase = BAD_CONFIGS[case]
    edit_export(folder, edit)
    for load in _loaders(folder, base_path):
        with pytest.raises(AdapterConfigError) as info:
            load()
        message = str(info.value)
        assert phrase in message and str(folder / "condistill_config.json") in message, message
        assert "re-export the adapter" in message and "\n" not in message


@pytest.mark.parametrize("edit", GOOD_EDITS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_legitimate_values_load(edit, copy_of, base_path):
    folder = copy_of()
    edit_export(folder, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(read_adapter_config(folder)[k] == v for k, v in edit.items())
        load_student(folder, load_base(base_path))


def test_save_adapter_refuses_the_same_values_and_writes_nothing(base_path, tmp_path):
    base = load_base(base_path)
    for bad, phrase in (({"resolution": 7}, "resolution = 7"), ({"condition_name": "bogus"}, "'bogus'"),
                        ({"recommended_guidance": float("inf")}, "recommended_guidance = inf"),
                        ({"one_step_start": 500}, "one_step_start = 500")):
        with pytest.raises(ValueError, match="nothing was written") as info:
            export(base, "t2i_adapter", tmp_path / "out", **bad)
        assert phrase in str(info.value)
    assert not list(tmp_path.iterdir())


def test_a_resolution_the_base_cannot_use(tmp_path):
    """Every multiple of 8 passes the config checks; the base's own multiple (16 here) is checked against it."""
    from condistill.config import SettingError, check_resolution

    path = make_tiny_base(tmp_path, block_out_channels=(32, 32, 64, 64), name="deep")
    with pytest.raises(SettingError):
        check_resolution(path, 24)
    folder = export(load_base(path), "controlnet", tmp_path / "ad")
    edit_export(folder, {"resolution": 24})
    assert read_adapter_config(folder)["resolution"] == 24  # the base is not known there
    with pytest.raises(AdapterConfigError, match="resolution = 24 cannot be used with the base .*multiples of 16"):
        load_student(folder, load_base(path))


# ---- checksums -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_records_the_sha256_of_every_file_loading_reads(kind, exports):
    folder = exports[kind]
    config = read_adapter_config(folder)
    assert config["schema_version"] == SCHEMA_VERSION == 4
    expected = {*config["weight_files"].values(), SCHEDULER_FILE,
                *(str(Path(rel).parent / "config.json") for rel in config["weight_files"].values() if "/" in rel)}
    assert set(config["checksums"]) == expected
    assert all(config["checksums"][rel] == sha256_file(folder / rel) for rel in expected)


def _flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) - 3] ^= 0x01  # inside the last tensor
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_one_bit_flip_is_refused_by_every_loader(kind, copy_of, base_path):
    """A bit flipped in any weight file, a blank added to a component's config.json or the scheduler config."""
    folder = copy_of(kind)
    config = read_adapter_config(folder)
    for rel in config["checksums"]:
        file = folder / rel
        original = file.read_bytes()
        if rel.endswith(".json"):
            file.write_bytes(original + b" ")
        else:
            _flip_a_bit(file)
        for load in list(_loaders(folder, base_path, kind))[1:]:
            with pytest.raises(AdapterWeightsError) as info:
                load()
            message = str(info.value)
            assert f"{file} changed since export: damaged or edited; re-export or re-download" in message, message
        file.write_bytes(original)
    load_student(folder, load_base(base_path))


def test_checksums_must_cover_what_loading_reads_and_exist(copy_of, base_path):
    folder = copy_of("controlnet")
    config = json.loads((folder / "condistill_config.json").read_text())
    rel = "controlnet/config.json"
    edit_export(folder, {"checksums": {k: v for k, v in config["checksums"].items() if k != rel}})
    with pytest.raises(AdapterConfigError, match=f"records no SHA-256 of \\['{rel}'\\], which loading reads"):
        load_student(folder, load_base(base_path))
    edit_export(folder, {"checksums": dict(config["checksums"], **{"controlnet/gone.json": "0" * 64})})
    with pytest.raises(AdapterWeightsError, match="gone.json is missing, though the checksums of .* list it"):
        load_student(folder, load_base(base_path))
    edit_export(folder, {"checksums": dict(config["checksums"], **{"../outside.json": "0" * 64})})
    with pytest.raises(AdapterWeightsError, match="is not a path inside the adapter folder"):
        load_student(folder, load_base(base_path))


def test_an_export_from_before_checksums_loads_with_one_warning_line(copy_of, base_path):
    folder = copy_of()
    config = json.loads((folder / "condistill_config.json").read_text())
    del config["checksums"]
    (folder / "condistill_config.json").write_text(json.dumps(dict(config, schema_version=2)))
    read_adapter_config(folder)  # reading the config hashes nothing and says nothing about it
    for load in list(_loaders(folder, base_path))[1:]:
        with pytest.warns(UserWarning) as caught:
            load()
        said = [str(w.message) for w in caught if "checksums" in str(w.message)]
        assert len(said) == 1 and "\n" not in said[0], said
        assert said[0].startswith(f"{folder} has no checksums") and "re-export" in said[0]
        assert all(Path(w.filename).name == Path(__file__).name for w in caught if "checksums" in str(w.message))


# ---- atomic exports ----------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_replaces_an_earlier_one_whole(base_path, tmp_path):
    base = load_base(base_path)
    out = export(base, "controlnet", tmp_path / "ad")
    (out / "README.md").write_text("card")  # the model card belongs to the export
    export(base, "lora", out)
    assert sorted(p.name for p in out.iterdir()) == ["condistill_config.json", "pytorch_lora_weights.safetensors",
                                                     "scheduler", "t2i_adapter"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no staging or previous folder left
    assert read_adapter_config(out)["kind"] == "lora"


def test_a_failed_write_leaves_the_earlier_export_intact(base_path, tmp_path, monkeypatch):
    import condistill.adapters.save_load as save_load

    base = load_base(base_path)
    out = export(base, "controlnet", tmp_path / "ad")
    before = _tree(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_load, "record_checksums", fail)  # after the weights are written, before the config
    with pytest.raises(OSError, match="disk full"):
        export(base, "t2i_adapter", out)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_a_kill_during_writing_leaves_the_earlier_export_intact(base_path, tmp_path):
    base = load_base(base_path)
    out = export(base, "controlnet", tmp_path / "ad")
    before = _tree(out)
    script = f"""
import os, sys
sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
import condistill.adapters.save_load as save_load
from adapter_damage import export
from condistill.frozen import load_base
def killed(*args, **kwargs):
    os._exit(9)
save_load.record_checksums = killed
export(load_base({str(base_path)!r}), "t2i_adapter", {str(out)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-ad-")]  # what the killed write left
    export(base, "t2i_adapter", out)  # the next write removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"] and read_adapter_config(out)["kind"] == "t2i_adapter"


@pytest.mark.parametrize("extra", ["checkpoints/step-1/state.safetensors", "notes.txt"])
@pytest.mark.parametrize("with_export", [True, False], ids=["export", "no-export"])
def test_a_folder_holding_anything_but_an_export_is_refused(extra, with_export, exports, tmp_path, base_path):
    out = shutil.copytree(exports["controlnet"], tmp_path / "run") if with_export else tmp_path / "run"
    (out / extra).parent.mkdir(parents=True, exist_ok=True)
    (out / extra).write_text("keep me")
    before = _tree(out)
    with pytest.raises(ValueError, match=f"{extra.split('/')[0]}.*nothing was written") as info:
        export(load_base(base_path), "controlnet", out)
    assert "<run>/adapter" in str(info.value)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_empty_folder_is_written(base_path, tmp_path):
    (tmp_path / "ad").mkdir()
    assert read_adapter_config(export(load_base(base_path), "t2i_adapter", tmp_path / "ad"))["kind"] == "t2i_adapter"


def test_exported_files_are_readable_by_others(base_path, tmp_path):
    old = os.umask(0o022)
    try:
        out = export(load_base(base_path), "lora", tmp_path / "ad")
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {m for p, m in modes.items() if p.endswith(".safetensors")} == {0o644}, modes
    assert {m for p, m in modes.items() if (out / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o755}, modes


# ---- where a run's export is ------------------------------------------------------------------------


def test_find_adapter_dir_prefers_the_run_s_adapter_folder(exports, tmp_path):
    run = shutil.copytree(exports["controlnet"], tmp_path / "run")  # a run written before adapter/: at its root
    assert find_adapter_dir(run) == run
    shutil.copytree(exports["lora"], run / "adapter")
    assert find_adapter_dir(run) == run / "adapter" and read_adapter_config(run)["kind"] == "lora"
    assert find_adapter_dir(run / "condistill_config.json") == run  # the config file itself
    assert find_adapter_dir(run / "adapter") == run / "adapter"


@pytest.mark.parametrize("layout", ["run", "folder"])
def test_an_export_caught_between_its_two_renames_is_read_from_the_previous_one(layout, exports, tmp_path):
    """replace_folder renames adapter to .old-adapter, then the new one to adapter: in between, readers use the old."""
    run = tmp_path / "run"
    run.mkdir()
    path = run if layout == "run" else run / "adapter"
    shutil.copytree(exports["t2i_adapter"], run / ".old-adapter")
    with pytest.warns(UserWarning) as caught:
        found = find_adapter_dir(path)
    assert found == run / ".old-adapter" and len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and str(run / "adapter") in message and str(found) in message
    with pytest.warns(UserWarning, match="previous export"):
        assert read_adapter_config(path)["kind"] == "t2i_adapter"
    (run / ".old-adapter").rename(run / "adapter")
    with pytest.raises(FileNotFoundError, match="No condistill_config.json"):
        find_adapter_dir(tmp_path / "elsewhere")


def test_the_checksums_helper_matches_what_save_adapter_records(exports):
    config = read_adapter_config(exports["lora"])
    assert record_checksums(exports["lora"], config["weight_files"]) == config["checksums"]
