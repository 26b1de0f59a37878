"""Conditions of other packages: installed entry points, and package.module:Class for training."""
from __future__ import annotations

import textwrap

import pytest

from condistill.cli import main
from condistill.conditions import condition as base
from condistill.conditions import available_conditions, condition_class

MODULE = '''
import torch
from condistill.conditions import Condition


class Glow(Condition):
    name = "{name}"
    channels = 1
    fidelity = ("glow_error", "lower")

    def __init__(self, *, level: float = 0.5):
        self.level = level

    def compute(self, record, seed):
        return torch.full((1, record.image.height, record.image.width), self.level)
'''


def _package(tmp_path, module: str, name: str, entry_point: bool):
    """A module on sys.path and, with ``entry_point``, the installed-distribution metadata declaring it."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(MODULE.format(name=name)))
    if entry_point:
        info = tmp_path / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[condistill.conditions]\n{name} = {module}:Glow\n")


def test_an_installed_entry_point_resolves_by_name_only(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    _package(tmp_path, "glowpkg", "glow", entry_point=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "glow" in available_conditions()
    cls = condition_class("glow")  # loaded through the entry point, then registered
    assert cls.__module__ == "glowpkg" and cls.fidelity == ("glow_error", "lower")
    with pytest.raises(ValueError, match="found once that package is installed with its 'condistill.conditions' "
                                         "entry point"):
        condition_class("sparkle")


def test_train_takes_package_module_class_and_the_export_names_only_the_condition(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    _package(tmp_path, "sparklemod", "sparkle", entry_point=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit):
        main(["train", "sparklemod:Glow", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the sparkle condition of sparklemod.Glow" in out and "this condition has no presets of its own" in out
    assert main(["train", "sparklemod:Nope"]) == 2
    assert "sparklemod has no Nope" in capsys.readouterr().err
    assert main(["train", "nosuchmodule:Glow"]) == 2
    assert "cannot import nosuchmodule" in capsys.readouterr().err


@pytest.mark.slow
def test_a_user_condition_trains_and_loads_only_where_its_package_is_installed(tmp_path, monkeypatch):
    """Two training steps with package.module:Class; load_adapter elsewhere resolves the recorded name through an
    installed entry point only, and without one it says what to install (nothing named in the config is imported)."""
    from condistill.pipeline import load_adapter

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    _package(tmp_path, "glowtrain", "glowtrain", entry_point=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "glowtrain:Glow", "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--validate-every", "0", "--checkpoint-every", "0", "--threads", "1"]) == 0
    monkeypatch.setattr(base, "_REGISTRY", {k: v for k, v in base._REGISTRY.items() if k != "glowtrain"})
    with pytest.raises(ValueError, match="trained with the condition .glowtrain., which is not installed here.*"
                                         "entry-point group"):
        load_adapter(out)
    info = tmp_path / "glowtrain-0.1.dist-info"  # now installed with its entry point
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: glowtrain\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[condistill.conditions]\nglowtrain = glowtrain:Glow\n")
    pipe = load_adapter(out)
    assert pipe.condistill_condition.name == "glowtrain" and pipe.condistill_condition.level == 0.5
