"""The adapter modules import each other without a circle, and every public name stays where it was."""
from __future__ import annotations

import ast
from pathlib import Path

import condistill.adapters

ADAPTERS = Path(condistill.adapters.__file__).parent


def _imports(path: Path) -> set[str]:
    """The ``condistill.adapters.<module>`` names a module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n.split(".")[2] for n in names if n.startswith("condistill.adapters.") and n.count(".") >= 2}
    return found & {p.stem for p in ADAPTERS.glob("*.py")} - {path.stem}


def test_no_circle_between_adapter_modules():
    graph = {p.stem: _imports(p) for p in ADAPTERS.glob("*.py") if p.stem != "__init__"}
    assert "student" not in graph["integrity"] and "integrity" in graph["student"]

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path + (module,))}"
        for nxt in sorted(graph.get(module, ())):
            visit(nxt, path + (module,))

    for module in graph:
        visit(module, ())


def test_public_names_are_importable_where_they_were():
    from condistill.adapters import AdapterWeightsError, build_student, get_adapter_class  # noqa: F401
    from condistill.adapters.errors import AdapterConfigError
    from condistill.adapters.integrity import REEXPORT, adapter_class_for, read_checked_weights  # noqa: F401
    from condistill.adapters.student import (AdapterWeightsError as FromStudent, available_adapters,  # noqa: F401
                                             check_state_dict_keys, check_state_dict_shapes, register_adapter)

    assert FromStudent is AdapterWeightsError and issubclass(AdapterConfigError, AdapterWeightsError)
    assert issubclass(AdapterWeightsError, ValueError) and "controlnet" in available_adapters()
