"""Ways a hostile or careless hand damages an exported adapter folder, shared by the integrity
tests of ``load_student`` (tests/adapters/test_integrity.py) and ``load_adapter``
(tests/test_pipeline.py, which imports this as ``adapters.adapter_damage``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: every damage of :func:`damage`
DAMAGES = ["deleted_tensor", "extra_tensor", "nan_tensor", "pickle_only", "mismatched_kind", "unknown_kind"]
#: the kind a "mismatched_kind" config claims instead of the exported one
OTHER_KIND = {"controlnet": "t2i_adapter", "t2i_adapter": "controlnet", "lora": "t2i_adapter"}


def damage(folder: str | Path, how: str, component: str | None = None) -> list[str]:
    """Damage the adapter export in ``folder`` in place; return the phrases the error must contain.

    ``component`` is the weight file to damage (default: the one named like the kind:
    ``controlnet``, ``t2i_adapter`` or ``lora``).
    """
    folder = Path(folder)
    config_file = folder / "condistill_config.json"
    config = json.loads(config_file.read_text())
    kind = config["kind"]
    rel = config["weight_files"][component or kind]
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
        return [f"{file} of {component or kind!r} is missing", "only pickle weights", pickle.name, "never loads"]
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
