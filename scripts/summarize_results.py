#!/usr/bin/env python
"""Print the summary tables of docs/results.md from the committed results JSON.

Reads ``docs/results/<condition>-<adapter>[-<steps>]/results.json`` (written by ``condistill eval`` in
``scripts/reproduce_results.sh``) and prints, as markdown:

1. the project's targets per (condition, adapter): the 4-step student against the teacher
   (and bicubic for sr), against the conventionally trained adapter sampled with 50 DDIM steps
   + CFG (fidelity, Frechet distance within 10%, speed-up at least 20x);
2. every row of every evaluation.

    python scripts/summarize_results.py [docs/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from condistill.conditions import condition_class  # noqa: E402
from condistill.evaluation.evaluate import fidelity_metric, markdown_table  # noqa: E402
from condistill.presets import condition_names  # noqa: E402

ADAPTERS = ["controlnet", "t2i_adapter", "lora"]


def pair_dirs(root: Path) -> list[Path]:
    """``<condition>-<adapter>[-<steps>]`` folders holding a results.json (sweeps excluded), in
    table order: adapter kind, condition, then training length."""
    def key(d: Path):
        rep = json.loads((d / "results.json").read_text())
        return (ADAPTERS.index(_adapter_kind(d.name, rep["condition"])), condition_names().index(rep["condition"]),
                _steps(rep) or 0)
    def is_pair(d: Path) -> bool:  # not a sweep, a curve or a comparison folder
        if not (d / "results.json").is_file() or d.name.startswith("sweep"):
            return False
        condition = json.loads((d / "results.json").read_text())["condition"]
        return d.name.startswith(f"{condition}-") and any(
            d.name[len(condition) + 1:] == k or d.name[len(condition) + 1:].startswith(k + "-") for k in ADAPTERS)
    return sorted(filter(is_pair, sorted(root.iterdir())), key=key)


def _adapter_kind(name: str, condition: str) -> str:
    rest = name[len(condition) + 1:]
    for kind in ADAPTERS:
        if rest == kind or rest.startswith(kind + "-"):
            return kind
    raise ValueError(f"{name}: expected <condition>-<adapter>[-<steps>] with adapter one of {ADAPTERS}")


def _steps(report: dict) -> int | None:
    """Training steps of the report's student (recorded by ``condistill eval``), if known."""
    student = next((r["model"] for r in report["rows"] if r["name"] == "student-4"), None)
    return (report.get("models", {}).get(student) or {}).get("steps_trained")


def _rows(report: dict) -> dict:
    return {r["name"]: r["metrics"] for r in report["rows"]}


def teacher_target(condition: str, rows: dict) -> tuple[str, bool | None]:
    """The distillation target of the condition (its class says) and whether student-4 meets it."""
    return condition_class(condition).distillation_target(rows) or ("-", None)


def baseline_targets(condition: str, rows: dict) -> tuple[bool | None, float | None, float | None]:
    """(fidelity >= 50-step baseline, FD ratio, speed-up) of student-4 vs baseline-ddim-50."""
    s, b = rows.get("student-4"), rows.get("baseline-ddim-50")
    if s is None or b is None:
        return None, None, None
    key, better = fidelity_metric(condition)
    fid_ok = s[key] >= b[key] if better == "higher" else s[key] <= b[key]
    return fid_ok, s["frechet_distance"] / b["frechet_distance"], b["seconds_per_image"] / s["seconds_per_image"]


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("**yes**" if v else "no")


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path("docs/results")
    found = pair_dirs(root) if root.is_dir() else []
    if not found:
        print(f"no results.json under {root}/<condition>-<adapter>/; run scripts/reproduce_results.sh", file=sys.stderr)
        return 1
    reports = {d.name: json.loads((d / "results.json").read_text()) for d in found}

    print("| condition | adapter | steps trained | fidelity metric | student-4 | baseline 50 DDIM + CFG | teacher | "
          "target vs teacher | met | fidelity >= baseline | FD student / baseline | speed-up vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rep in reports.items():
        cond = rep["condition"]
        adapter = _adapter_kind(name, cond)
        steps = _steps(rep)
        rows = _rows(rep)
        key, _ = fidelity_metric(cond)
        target, met = teacher_target(cond, rows)
        fid_ok, fd_ratio, speed = baseline_targets(cond, rows)

        def val(row: str) -> str:
            return f"{rows[row][key]:.3f}" if row in rows else "-"

        print(f"| {cond} | {adapter} | {'-' if steps is None else f'{steps:,}'} | {key} | {val('student-4')} | {val('baseline-ddim-50')} | "
              f"{val('teacher-ddim-50')} | {target} | {_yes(met)} | {_yes(fid_ok)} | "
              f"{'-' if fd_ratio is None else f'{fd_ratio:.2f}'} | {'-' if speed is None else f'{speed:.1f}x'} |")
    for name in reports:
        print(f"\n### {name}\n")
        print(markdown_table(reports[name]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
