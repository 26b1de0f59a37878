"""condistill.hub: one rule for local folders, the packaged assets and hub ids."""
from __future__ import annotations

import pytest

from condistill import hub


def test_embedded_names_are_the_packaged_folders():
    teacher = hub.resolve_pretrained_dir("embedded:tiny-teacher")
    assert teacher == hub.ASSETS_DIR / "tiny-teacher" and (teacher / "model_index.json").is_file()
    judge = hub.resolve_pretrained_dir("embedded:judge")
    assert (judge / "judge.safetensors").is_file()


def test_unknown_embedded_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="embedded:tiny-teacher") as info:
        hub.resolve_pretrained_dir("embedded:nope")
    assert "'embedded:nope' is not an embedded model" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not an embedded model"):
        hub.embedded_path("embedded:")


def test_legacy_data_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_pretrained_dir("data/tiny-teacher") == hub.ASSETS_DIR / "tiny-teacher"
    assert hub.embedded_path("data/judge") == hub.ASSETS_DIR / "judge"


def test_a_local_folder_wins_over_the_legacy_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tiny-teacher").mkdir(parents=True)
    assert hub.resolve_pretrained_dir("data/tiny-teacher").resolve() == tmp_path / "data" / "tiny-teacher"
    assert hub.embedded_path("data/tiny-teacher") is None


def test_other_names_are_not_embedded():
    assert hub.embedded_path("org/model") is None
    assert hub.embedded_path("runs/edge") is None
