"""The evaluation modules import without a circle: clip_score and third_party share evaluation/backends.py."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

EVALUATION = Path(__file__).resolve().parents[2] / "condistill" / "evaluation"


def _imports(module: str) -> set[str]:
    """The condistill modules ``module`` (a file of condistill/evaluation) imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse((EVALUATION / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("condistill"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("condistill")}
    return found


def test_clip_score_does_not_import_third_party():
    assert not {name for name in _imports("clip_score") if "third_party" in name}
    assert "condistill.evaluation.backends" in _imports("clip_score")
    assert not {name for name in _imports("backends") if "third_party" in name or "clip_score" in name}


def test_clip_score_imports_alone_and_third_party_registers_it():
    script = ("import sys, json; import condistill.evaluation.clip_score as cs; "
              "alone = sorted(m for m in sys.modules if m.startswith('condistill.evaluation')); "
              "import condistill.evaluation.third_party as tp; "
              "print(json.dumps([alone, tp.STATUS['clip_score']()[0] in (True, False), tp.set_backend.__module__]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    alone, registered, home = json.loads(proc.stdout.strip().splitlines()[-1])
    assert alone == ["condistill.evaluation", "condistill.evaluation.backends", "condistill.evaluation.clip_score"]
    assert registered and home == "condistill.evaluation.backends"
