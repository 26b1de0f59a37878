"""The exports the integrity and trust tests damage: one per adapter kind, written once per module."""
import shutil

import pytest

from adapter_damage import KINDS, export

from condistill.frozen import load_base


@pytest.fixture(scope="module")
def exports(base_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    base = load_base(base_path)
    return {kind: export(base, kind, root / kind) for kind in KINDS}


@pytest.fixture
def copy_of(exports, tmp_path):
    """A fresh copy of a kind's export, to damage."""
    return lambda kind="t2i_adapter": shutil.copytree(exports[kind], tmp_path / kind)
