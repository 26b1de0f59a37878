"""The package's shape: what the library imports, and the size limits its layout keeps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "condistill"


def _modules_after(code: str) -> list[str]:
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('condistill'))))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_and_load_adapter_import_no_evaluation_or_world():
    loaded = _modules_after("import condistill.training.loop, condistill.pipeline, condistill.cli")
    assert "condistill.training.loop" in loaded and "condistill.pipeline" in loaded
    for prefix in ("condistill.evaluation", "condistill.world"):
        assert not [m for m in loaded if m.startswith(prefix)], loaded


def test_plain_import_is_lazy():
    assert _modules_after("import condistill") == ["condistill"]


def test_module_sizes_and_top_level_count():
    too_long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 500}
    assert not too_long, too_long
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top


def test_no_module_imports_another_modules_private_names():
    import ast

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("condistill"):
                offenders += [f"{path.relative_to(PACKAGE)}: {node.module}.{alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, offenders
