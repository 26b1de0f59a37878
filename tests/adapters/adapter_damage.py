"""Ways a hostile or careless hand damages an exported adapter folder, shared by the integrity
tests of ``load_student`` (tests/adapters/test_integrity.py) and ``load_adapter``
(tests/test_pipeline.py, which imports this as ``adapters.adapter_damage``).

A damaged file no longer has the SHA-256 its export recorded, which loading refuses first. To reach the
checks behind that one (what an export written before checksums, or a hand that also edits them, gets),
:func:`damage` records the damaged files' checksums again (:func:`rehash`) unless told not to."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from condistill.adapters.config_checks import SCHEDULER_FILE, record_checksums

#: the adapter kinds and the options the integrity tests export them with
KINDS = {
    "controlnet": {},
    "t2i_adapter": {"adapter_type": "light_adapter"},
    "lora": {"rank": 2, "lora_alpha": 3, "targets": "all"},
    "controlnet_lora": {"rank": 2, "targets": "attention_ff"},
    "lcm_lora": {"rank": 2},
}
#: every damage of :func:`damage`
DAMAGES = ["deleted_tensor", "extra_tensor", "nan_tensor", "pickle_only", "mismatched_kind", "unknown_kind"]
#: the kind a "mismatched_kind" config claims instead of the exported one
OTHER_KIND = {"controlnet": "t2i_adapter", "t2i_adapter": "controlnet", "lora": "t2i_adapter",
              "controlnet_lora": "controlnet", "lcm_lora": "controlnet"}

#: (edit of condistill_config.json or, under "scheduler", of scheduler/scheduler_config.json; phrase of the error)
BAD_CONFIGS = {
    "negative resolution": ({"resolution": -64}, "resolution = -64: must be a positive int multiple of 8"),
    "zero resolution": ({"resolution": 0}, "resolution = 0"),
    "odd resolution": ({"resolution": 7}, "resolution = 7"),
    "resolution as text": ({"resolution": "64"}, "resolution = '64'"),
    "height off the pixel grid": ({"height": 12}, "height = 12"),
    "unknown condition": ({"condition_name": "bogus"}, "condition_name = 'bogus': must be a known condition"),
    "condition options that do not build": ({"condition_config": {"low_threshold": 300, "high_threshold": 200}},
                                            "does not build a 'edge' condition"),
    "NaN guidance": ({"recommended_guidance": float("nan")}, "recommended_guidance = nan: must be a finite number"),
    "negative guidance": ({"recommended_guidance": -1.0}, "recommended_guidance = -1.0"),
    "guidance as text": ({"recommended_guidance": "3"}, "recommended_guidance = '3'"),
    "no steps": ({"recommended_steps": 0}, "recommended_steps = 0: must be an int in 1..num_grid (50)"),
    "more steps than the grid": ({"recommended_steps": 51}, "recommended_steps = 51"),
    "one-point grid": ({"num_grid": 1}, "num_grid = 1: must be an int >= 2"),
    "grid that does not divide the schedule": ({"num_grid": 7}, "num_grid = 7: num_grid=7 does not divide"),
    "grids that differ": ({"num_grid": 25}, "num_grid = 50 in scheduler/scheduler_config.json: differs from "
                                            "num_grid = 25 in condistill_config.json"),
    "one-step start off the grid": ({"one_step_start": 500}, "one_step_start = 500: timestep 500 must be a timestep "
                                                             "of the training grid (19, 39, ... 999)"),
    "one-step start from the input on edge": ({"one_step_start": {"timestep": 499, "from": "input"}},
                                              "from 'input' needs a condition that is an image"),
    "one-step start that differs from the scheduler's": (
        {"one_step_start": {"timestep": 499, "from": "zero"}},
        "one_step_start = None in scheduler/scheduler_config.json: differs from one_step_start = "
        "{'timestep': 499, 'from': 'zero'} in condistill_config.json"),
    "one-step start as a flag": ({"one_step_start": True}, "one_step_start = True"),
    "unknown prediction type": ({"prediction_type": "banana"}, "prediction_type = 'banana': must be one of"),
    "prediction type against the base": ({"prediction_type": "v_prediction"},
                                         "prediction_type = 'v_prediction': differs from the base fingerprint's "
                                         "'epsilon'"),
    "scheduler prediction type against the config": (
        {"scheduler": {"prediction_type": "v_prediction"}},
        "prediction_type = 'v_prediction' in scheduler/scheduler_config.json: differs from prediction_type = "
        "'epsilon' in condistill_config.json"),
    "scheduler grid against the config": ({"scheduler": {"num_grid": 25}}, "num_grid = 25 in scheduler"),
    "checksums that are not SHA-256": ({"checksums": {"scheduler/scheduler_config.json": "abc"}},
                                       "every value must be a hex SHA-256"),
    "schema 3 or later without checksums": ({"checksums": None}, "checksums = null: an export of schema_version 4"),
}


def export(base, kind: str, out: str | Path, **overrides) -> Path:
    """Export a perturbed student of ``kind`` (options of :data:`KINDS`) on ``base`` to ``out``."""
    from condistill.adapters import build_student
    from condistill.adapters.save_load import save_adapter
    from helpers import perturb_

    student = build_student(kind, base, 3, **KINDS[kind])
    perturb_(student, seed=5)
    kwargs = dict(base_name_or_path=str(base.name_or_path), base_fingerprint=base.fingerprint(),
                  condition_name="edge", condition_config={}, num_grid=50, prediction_type=base.prediction_type,
                  resolution=base.resolution, noise_schedule=base.noise_schedule_config())
    return save_adapter(student, out, **{**kwargs, **overrides})


def edit_export(folder: str | Path, edit: dict) -> None:
    """Apply ``edit`` to the config files of the export in ``folder`` (its "scheduler" entry to the scheduler's)."""
    folder, edit = Path(folder), dict(edit)
    for file, changes in ((folder / SCHEDULER_FILE, edit.pop("scheduler", {})), (folder / "condistill_config.json", edit)):
        if not changes:
            continue
        data = json.loads(file.read_text())
        data.update(changes)
        file.write_text(json.dumps(data))


def rehash(folder: str | Path) -> None:
    """Record the current SHA-256 of the files loading reads in ``folder``'s config, as if exported so."""
    config_file = Path(folder) / "condistill_config.json"
    config = json.loads(config_file.read_text())
    config["checksums"] = record_checksums(folder, config["weight_files"])
    config_file.write_text(json.dumps(config))


def damage(folder: str | Path, how: str, component: str | None = None, keep_checksums: bool = False) -> list[str]:
    """Damage the adapter export in ``folder`` in place; return the phrases the error must contain.

    ``component`` is the weight file to damage (default: the one named like the kind:
    ``controlnet``, ``t2i_adapter`` or ``lora``; ``lora`` for ``controlnet_lora``). The checksums are recorded again for the
    damaged files (:func:`rehash`) unless ``keep_checksums``.
    """
    phrases = _damage(Path(folder), how, component)
    if not keep_checksums:
        rehash(folder)
    return phrases


def _damage(folder: Path, how: str, component: str | None) -> list[str]:
    config_file = folder / "condistill_config.json"
    config = json.loads(config_file.read_text())
    kind = config["kind"]
    component = component or {"controlnet_lora": "lora", "lcm_lora": "lora"}.get(kind, kind)
    rel = config["weight_files"][component]
    file = folder / rel
    state = load_file(file)
    keys = sorted(state)
    if how == "deleted_tensor":
        del state[keys[0]]
        save_file(state, file)
        return ["1 missing key", keys[0], str(file), "re-export"]
    if how == "extra_tensor":
        is_lora = rel.endswith("lora_weights.safetensors")
        extra = "unet.some_block.lora_A.weight" if is_lora else "some_block.extra.weight"
        save_file(dict(state, **{extra: torch.zeros(2)}), file)
        return ["1 unexpected key", extra, str(file)]
    if how == "nan_tensor":
        state[keys[0]] = torch.full_like(state[keys[0]], float("nan"))
        state[keys[-1]] = state[keys[-1]].clone()
        state[keys[-1]].view(-1)[0] = float("inf")
        save_file(state, file)
        return ["non-finite values (NaN or Inf) in 2 tensor(s)", keys[0], keys[-1], str(file), "Re-export"]
    if how == "pickle_only":
        pickle = file.with_name(file.name.replace(".safetensors", ".bin"))
        torch.save(state, pickle)
        file.unlink()
        return [f"{file} of {component!r} is missing", "only pickle weights", pickle.name, "never loads"]
    if how == "mismatched_kind":
        other = OTHER_KIND[kind]
        config_file.write_text(json.dumps(dict(config, kind=other)))
        return [f"says kind {other!r} but its weight_files list {sorted(config['weight_files'])}", "Re-export"]
    if how == "unknown_kind":
        config_file.write_text(json.dumps(dict(config, kind="hypernetwork")))
        return ["unknown adapter kind 'hypernetwork'", "Re-export"]
    raise ValueError(f"unknown damage {how!r}")


def assert_names(error: BaseException, phrases: list[str]) -> None:
    """Every phrase is in the error's message (shown in full when one is not)."""
    message = str(error)
    missing = [p for p in phrases if p not in message]
    assert not missing, f"{missing} not in: {message}"


def forbid_pickle_loading(monkeypatch) -> None:
    """Make ``torch.load`` (how diffusers would read a ``.bin``) fail the test if anything calls it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load{args[:1]} was called: a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
