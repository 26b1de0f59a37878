"""Resumable training state, kept apart from the slim adapter export.

A checkpoint folder ``checkpoints/step-XXXXXXX`` holds:

- ``online.safetensors``: the adapter weights the optimizer updates,
- ``ema.safetensors``: the EMA weights used by the target/ODE branches and exported,
- ``training_state.pt``: optimizer, learning-rate schedule, RNG states (tensors and plain
  containers only, read back with ``weights_only=True``),
- ``state.json``: the step and the resolved configuration.

Folders are written under a temporary name and renamed when complete, so a run that is
killed mid-save never leaves a half checkpoint that ``--resume latest`` would pick.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Turn ``--resume`` into a checkpoint folder (``None`` = start fresh).

    ``latest`` with no checkpoint yet starts fresh, so "run the same command again" works
    for the first run and for every run after it.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a condistill checkpoint (no state.json); pass 'latest' or a "
                                f"folder under {checkpoint_dir(output_dir)}")
    return path


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, step: int, params: dict[str, torch.Tensor], ema, optimizer, lr_scheduler,
                    config: dict, keep: int = 2) -> Path:
    """Write a complete checkpoint for ``step`` and prune to the newest ``keep``."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().float().contiguous().cpu() for k, v in params.items()}, str(tmp / "online.safetensors"))
    save_file({k: v.float().contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "rng": _rng_state()},
               tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], ema, optimizer, lr_scheduler) -> int:
    """Restore online and EMA weights, optimizer, schedule and RNG; return the step."""
    online = load_file(str(path / "online.safetensors"))
    missing, unexpected = set(params) - set(online), set(online) - set(params)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match this adapter: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}; was it written with another --adapter or base?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(online[name].to(device=p.device, dtype=p.dtype))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    state = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    _set_rng_state(state["rng"])
    return int(json.loads((path / "state.json").read_text())["step"])
