"""open_source: dispatch by spec, the base classes, the registry of spec prefixes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from source_helpers import RES, check_record, rgb  # noqa: E402

from condistill.data import (  # noqa: E402
    EmptySourceError,
    ImageFolderSource,
    Record,
    RecordSequenceSource,
    open_source,
    register_source_kind,
)
from condistill.data.sources import SPEC_FORMS, registered_source_kinds  # noqa: E402


# ----------------------------------------------------------------------- dispatch


def test_open_source_errors(tmp_path: Path):
    # the errors of the synthetic spec are checked in tests/world/test_source.py
    with pytest.raises(FileNotFoundError) as info:
        open_source(str(tmp_path / "does" / "not" / "exist"))
    assert "synthetic:heldout" in str(info.value) and "save_to_disk" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError):
        open_source(str(tmp_path / "empty"))


def test_open_source_image_folder_with_split_subfolders(tmp_path: Path):
    for split, n in (("train", 2), ("test", 1)):
        (tmp_path / split).mkdir()
        for i in range(n):
            rgb(40, 40).save(tmp_path / split / f"{i}.png")
    train = open_source(str(tmp_path), resolution=RES)
    assert isinstance(train, ImageFolderSource) and len(train) == 2
    assert len(open_source(str(tmp_path), resolution=RES, split="test")) == 1
    with pytest.raises(ValueError, match="split into folders"):
        open_source(str(tmp_path), resolution=RES, split="heldout")


# ---------------------------------------------------------------------- base classes


def test_record_sequence_source_fits_depth_and_masks():
    from condistill.data import RecordSequenceSource

    depth = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))  # 64 wide, 32 high
    masks = np.zeros((2, 32, 64), bool)
    masks[0, :, 32:] = True
    record = Record(image=Image.new("RGBA", (64, 32), (0, 0, 0, 0)), depth=depth, masks=masks, key="r")
    (fitted,) = list(RecordSequenceSource([record], resolution=16))
    check_record(fitted, 16)
    assert fitted.masks.shape == (2, 16, 16) and fitted.masks.dtype == bool
    assert fitted.masks[0, :, 8:].all() and not fitted.masks[0, :, :8].any() and not fitted.masks[1].any()
    assert 0.2 < fitted.depth[0, 0] < 0.3 and 0.7 < fitted.depth[0, -1] < 0.8  # center quarter..three quarters
    assert fitted.image.getpixel((0, 0)) == (255, 255, 255)


# -------------------------------------------------------------------------- registry


def test_registered_prefix_gets_the_whole_spec_split_and_options():
    records = [Record(image=rgb(40, 40), caption=f"c{i}", key=f"k{i}") for i in range(2)]
    calls = []

    def opener(spec, *, resolution, split, options):
        calls.append((spec, resolution, split, dict(options)))
        return RecordSequenceSource(records, resolution=resolution)

    register_source_kind("condistill-test-kind", opener)
    assert "condistill-test-kind" in registered_source_kinds()
    source = open_source("condistill-test-kind:a:b", resolution=RES, split="heldout", colour="red")
    assert calls == [("condistill-test-kind:a:b", RES, "heldout", {"colour": "red"})]
    fitted = list(source)
    for record in fitted:
        check_record(record)
    assert [r.key for r in fitted] == ["k0", "k1"]
    open_source("  condistill-test-kind  ")
    assert calls[-1] == ("condistill-test-kind", 64, "train", {})
    # a second registration replaces the opener
    register_source_kind("condistill-test-kind", lambda spec, **kwargs: RecordSequenceSource(records[:1], resolution=RES))
    assert len(open_source("condistill-test-kind")) == 1 and len(calls) == 2


def test_register_source_kind_rejects_bad_prefixes_and_openers():
    for prefix in ("", "bad:prefix", "path/like", "1st", None):
        with pytest.raises(ValueError, match="source kind prefix"):
            register_source_kind(prefix, lambda spec, **kwargs: None)
    with pytest.raises(TypeError, match="callable"):
        register_source_kind("condistill-test-uncallable", "not a function")
    assert "condistill-test-uncallable" not in registered_source_kinds()


def test_an_unknown_prefix_is_read_as_a_path_with_the_usual_error():
    with pytest.raises(FileNotFoundError) as info:
        open_source("nosuchkind:abc")
    assert str(info.value) == f"data source 'nosuchkind:abc' does not exist. A data source may be: {SPEC_FORMS}."


def test_synthetic_is_found_without_install_metadata_in_a_fresh_process(tmp_path: Path):
    code = textwrap.dedent(
        """
        import importlib.metadata as md, json, sys
        md.entry_points = lambda **kwargs: md.EntryPoints([])  # as in a checkout that was never installed
        import condistill.data.sources
        from condistill.data.sources import open_source
        before = sorted(m for m in sys.modules if m == "condistill.world" or m.startswith("condistill.world."))
        source = open_source("synthetic:heldout:4")
        print(json.dumps({"before": before, "type": type(source).__module__ + "." + type(source).__name__,
                          "len": len(source), "key": source.load(0).key, "split": source.split}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "before": [],
        "type": "condistill.world.source.SyntheticSource",
        "len": 4,
        "key": "synthetic-heldout-0-0000000",
        "split": "heldout",
    }


def test_a_broken_entry_point_warns_and_its_own_prefix_names_the_failure(tmp_path: Path):
    code = textwrap.dedent(
        """
        import importlib.metadata as md
        real = md.entry_points
        def entry_points(**kwargs):
            found = real(**kwargs)
            if kwargs.get("group") != "condistill.data_sources":
                return found
            return md.EntryPoints([md.EntryPoint("broken", "no_such_module_xyz", "condistill.data_sources"), *found])
        md.entry_points = entry_points
        from condistill.data.sources import open_source
        assert type(open_source("synthetic:heldout:2")).__name__ == "SyntheticSource"
        try:
            open_source("broken:x")
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "could not load data source entry point broken = no_such_module_xyz" in done.stderr
    assert done.stdout.strip() == (
        "ImportError: the data source kind 'broken' comes from entry point 'broken' of group "
        "'condistill.data_sources', which failed to load: No module named 'no_such_module_xyz'"
    )


def _imports(module: Path) -> set[str]:
    """The ``condistill`` modules a file imports, anywhere in it (deferred imports included)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("condistill"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("condistill"))
    return found


def test_the_source_kinds_do_not_import_the_dispatcher():
    # sources.py (open_source) imports the kinds; the kinds take their base classes from source_base.py,
    # so the imports go one way and none of them is deferred to break a circle
    data = Path(__file__).resolve().parents[2] / "condistill" / "data"
    kinds = ("folder", "hf_datasets", "hf_streaming", "webdataset", "source_base")
    for kind in kinds:
        assert "condistill.data.sources" not in _imports(data / f"{kind}.py"), kind
    assert {f"condistill.data.{k}" for k in kinds} <= _imports(data / "sources.py")
    from condistill.data.folder import caption_from_cell
    from condistill.data.source_base import DataSource, IndexedSource, caption_from_cell as shared
    from condistill.data.sources import DataSource as old_data_source, IndexedSource as old_indexed_source

    assert (caption_from_cell, old_data_source, old_indexed_source) == (shared, DataSource, IndexedSource)
