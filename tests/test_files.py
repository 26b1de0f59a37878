"""Atomic writes: a reader sees the old file or folder or the new one, leftovers are cleaned up, modes are shared."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from condistill.files import (previous_folder, recover_folder, replace_file, set_shared_mode, sha256_file,
                              staged_folder, write_text)


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    final = tmp_path / "adapter"
    with staged_folder(final) as stage:
        (stage / "weights").write_text("v1")
        (stage / "config").write_text("v1")
    assert _tree(final) == {"config": "v1", "weights": "v1"}
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(final) as stage:
            (stage / "weights").write_text("v2")  # killed before the config was written
            raise KeyboardInterrupt
    assert _tree(final) == {"config": "v1", "weights": "v1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with staged_folder(final) as stage:
        (stage / "weights").write_text("v3")
    assert _tree(final) == {"weights": "v3"}  # nothing of the old one stays beside the new


def test_leftovers_of_a_killed_write_are_recovered(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-adapter-{int(dead.stdout)}"
    stale.mkdir()
    live = tmp_path / f".tmp-adapter-{os.getppid()}"  # a process that still runs may still be writing it
    live.mkdir()
    os.replace(final, tmp_path / ".old-adapter")  # killed between the two renames
    assert previous_folder(final) == tmp_path / ".old-adapter"  # what readers use meanwhile
    said = []
    recover_folder(final, said.append)
    assert _tree(final) == {"weights": "old"} and not stale.exists() and live.exists()
    assert previous_folder(final) is None and any("restoring" in line for line in said)


def test_replace_file_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = write_text(tmp_path / "card.md", "old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["card.md"]


def test_modes_follow_the_umask_and_hashes_the_bytes(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    assert path.stat().st_mode & 0o777 == 0o600  # what safetensors leaves
    old = os.umask(0o022)
    try:
        set_shared_mode(tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and tmp_path.stat().st_mode & 0o777 == 0o755
    import hashlib

    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
