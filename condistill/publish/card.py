"""The model card (``README.md``) at the root of a run's export.

Training writes it after the export (:func:`write_model_card`); ``condistill eval --student
RUN`` replaces its results section with the measured table (:func:`record_eval`). The card
is built only from files of the run folder: ``condistill_config.json`` (what the adapter is,
how to sample it), ``config.json`` (how it was trained) and the last validation grid, copied
to ``samples.png``. It never invents a result: until an evaluation is recorded its results
section says that none has been.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from condistill.adapters.config_checks import CARD_NAME, SAMPLES_NAME
from condistill.adapters.save_load import EXPORT_SUBFOLDER
from condistill.files import replace_file, write_text
from condistill.publish.card_usage import (  # noqa: F401  (also imported from here)
    BASE_MARK, base_folder, is_local_base, one_step_text, other_tools_text, usage_text, base_code, condition_text,
    is_embedded_base, trained_one_step, training_size, with_base)

__all__ = ["CARD_NAME", "SAMPLES_NAME", "NO_RESULTS", "write_model_card", "render_card", "update_results",
           "record_eval", "read_front_matter", "base_license", "set_card_source", "base_code", "with_base",
           "is_embedded_base"]

RESULTS_START = "<!-- condistill:results:start -->"
RESULTS_END = "<!-- condistill:results:end -->"
NO_RESULTS = ("No evaluation has been recorded for this adapter yet. `condistill eval --condition CONDITION "
              "--student RUN` measures it and records the table here.")
_SOURCE_LINE = re.compile(r'^ADAPTER = ".*"$', re.MULTILINE)
_KIND_TEXT = {
    "controlnet": "a ControlNet",
    "t2i_adapter": "a T2I-Adapter",
    "lora": "a LoRA of the UNet with a light T2I-Adapter for the condition",
    "lcm_lora": "a LoRA of the UNet without a condition (an LCM-LoRA)",
    "controlnet_lora": "a ControlNet together with a LoRA of the UNet",
}
def read_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(metadata, body)`` of a markdown file with ``---`` YAML front matter (a YAML-free parse).

    Reads what model cards use: ``key: value`` scalars (quotes stripped) and ``key:`` followed by
    ``- item`` lists. A file without front matter is ``({}, text)``.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, text
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return {}, text
    meta: dict[str, Any] = {}
    key = None
    for line in lines[1:end]:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- ") and key is not None:
            if not isinstance(meta.get(key), list):
                meta[key] = []
            meta[key].append(_unquote(stripped[2:].strip()))
        elif ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            meta[key] = _unquote(value) if value else []
    return meta, "\n".join(lines[end + 1:]) + ("\n" if text.endswith("\n") else "")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def base_license(base: str) -> str | None:
    """The ``license`` of the base's README.md front matter (local folder or hub cache), else None.

    Nothing is downloaded: a hub base is read only when its README.md is in the local cache.
    """
    folder = base_folder(base)
    readme: str | None = None
    if folder is not None:
        readme = str(folder / CARD_NAME) if (folder / CARD_NAME).is_file() else None
    elif not is_local_base(base):
        try:
            from huggingface_hub import try_to_load_from_cache

            from condistill.hub import hub_cache_dir

            found = try_to_load_from_cache(base, CARD_NAME, cache_dir=hub_cache_dir())
            readme = found if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - no cache, odd name: the license is just unknown
            readme = None
    if readme is None:
        return None
    try:
        meta, _ = read_front_matter(Path(readme).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    value = meta.get("license")
    return value if isinstance(value, str) and value else None


def _yaml_scalar(value: str) -> str:
    return json.dumps(value) if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/+-]*", value) else value


#: how the model card names each training loss
LOSS_NAMES = {"codi": "CoDi (consistency + conditional regression)",
              "diffusion": "diffusion (conventional adapter training)",
              "codi+dmd": "CoDi + distribution matching (consistency + conditional regression + DMD)",
              "dmd": "distribution matching + conditional regression (DMD, no consistency term)"}

def _start_description(condition: str) -> str:
    """``Condition.start_description`` of a registered condition; a generic phrase for one that is not."""
    from condistill.conditions import available_conditions, condition_class

    return condition_class(condition).start_description() if condition in available_conditions() else "its start"


def render_card(config: Mapping[str, Any], train: Mapping[str, Any] | None, *, num_processes: int = 1,
                samples: bool = False, results: str | None = None, source: str = ".",
                stochastic: bool | None = None) -> str:
    """The card's text from an adapter config, the run's training config (or None) and a results block."""
    kind, condition, base = config["kind"], config["condition_name"], str(config["base_name_or_path"])
    train = dict(train or {})
    extra = config.get("extra") or {}
    local = is_local_base(base)
    meta = []
    if not local:
        meta.append(f"base_model: {_yaml_scalar(base)}")
    meta.append("library_name: diffusers")
    license_ = base_license(base)
    if license_:
        meta.append(f"license: {_yaml_scalar(license_)}")
    meta.append("tags:")
    meta += [f"- {tag}" for tag in ("condistill", condition, kind.replace("_", "-"), "few-step")]
    meta.append("pipeline_tag: text-to-image")

    what = _KIND_TEXT.get(kind, kind)
    task = condition_text(config)[0]
    base_line = (f"the frozen local base `{base}` (not on the hub: pass `base=` to `load_adapter` where that path does not exist)"
                 if local else f"the frozen base [`{base}`](https://huggingface.co/{base})")
    steps = config["recommended_steps"]
    guidance = config["recommended_guidance"]
    if stochastic is None:
        stochastic = bool(train.get("stochastic_sampling", True))
    sampler = "codi-stochastic (fresh noise between steps)" if stochastic else "codi (reuses the model's noise estimate)"
    lines = ["---", *meta, "---", "", f"# condistill {condition} {kind.replace('_', '-')}", "",
             f"{what[0].upper() + what[1:]} trained with condistill "
             f"(conditional diffusion distillation, CoDi) on {base_line}: a few-step {task} "
             f"generator ({condition} condition, {config['resolution']} px). Only the adapter is in this repository; "
             "the base model is loaded from its own repository or folder.", ""]

    lines += ["## Training", ""]
    loss = extra.get("loss", train.get("loss", "unknown"))
    trained = extra.get("steps_trained", train.get("max_steps"))
    loss_text = LOSS_NAMES.get(loss, str(loss))
    if loss == "codi" and train.get("regression_weight") == 0:
        loss_text = "CoDi consistency only (no regression term)"
    facts = [("loss", loss_text),
             ("optimizer steps", str(trained) if trained is not None else "unknown"),
             ("N (skip grid)", str(config["num_grid"]))]
    if loss in ("codi+dmd", "dmd") and "dmd_weight" in train:
        facts.append(("distribution matching", f"weight {train['dmd_weight']:g}, real-score CFG "
                      f"{train['dmd_guidance']:g}, fake score "
                      f"{'a full copy of the teacher UNet' if train['dmd_fake_rank'] == 0 else 'LoRA rank %d' % train['dmd_fake_rank']}, "
                      f"{train['dmd_fake_updates']} fake-score update(s) per step, GAN weight {train['gan_weight']:g}"
                      + (f", one-step outputs from {_start_description(condition)} noised to "
                         f"t={train['dmd_start_timestep']}" if train.get("dmd_start_timestep") else "")
                      + (f", on the student's own {train['dmd_backward_steps']}-step outputs (backward simulation)"
                         if train.get("dmd_backward_steps") else "")))
    if "regression_weight" in train:
        facts.append(("lambda (regression weight)", f"{train['regression_weight']:g}"))
    if "distance" in train:
        facts.append(("consistency distance", str(train["distance"])))
    facts.append(("sampler", sampler))
    if "data" in train:
        facts.append(("data source", f"`{train['data']}`"))
    if trained is not None and "batch_size" in train:
        accum = int(train.get("gradient_accumulation_steps", 1))
        seen = int(trained) * int(train["batch_size"]) * accum * int(num_processes)
        facts.append(("images seen", f"{seen:,} = {trained} steps x batch {train['batch_size']} x accumulation "
                                     f"{accum} x {num_processes} process{'es' if num_processes != 1 else ''}"))
    if "learning_rate" in train:
        facts.append(("learning rate", f"{train['learning_rate']:g}"))
    facts.append(("condistill", str(config.get("condistill_version", "unknown"))))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]

    lines += ["## Sampling", "", f"Recommended: **{steps} steps**, guidance **{guidance:g}** (stored in "
              "`condistill_config.json` and `scheduler/`; `pipe.condistill_defaults` holds them).", "",
              one_step_text(config), "",
              usage_text(config, source), "", other_tools_text(config), ""]
    if samples:
        lines += ["## Samples", "", f"![validation samples]({SAMPLES_NAME})", "",
                  "The last validation grid of the training run (held-out conditions; rows: 1, 2 and 4 steps).", ""]
    lines += ["## Results", "", RESULTS_START, results.strip() if results else NO_RESULTS, RESULTS_END, ""]
    return "\n".join(lines)


def _last_grid(run: Path, steps: Any) -> Path | None:
    exact = run / "validation" / f"step-{int(steps):07d}.png" if isinstance(steps, int) else None
    if exact is not None and exact.is_file():
        return exact
    grids = sorted((run / "validation").glob("step-*.png"))
    return grids[-1] if grids else None


def _results_block(text: str) -> str | None:
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        return None
    block = text[start + len(RESULTS_START):end].strip()
    return None if block == NO_RESULTS else block


def write_model_card(folder: str | os.PathLike, *, run: str | os.PathLike | None = None,
                     source: str | os.PathLike | None = None, num_processes: int = 1, keep_results: bool = False) -> Path:
    """Write ``FOLDER/README.md`` (and ``FOLDER/samples.png`` from the last validation grid); return the card path.

    Args:
        folder: an export folder (``condistill_config.json`` at its root), or a run folder (its export).
        run: the training run folder that holds ``config.json`` and ``validation/``; default ``folder``
            (runs written before exports moved to ``RUN/adapter/``), or its parent when ``folder`` is
            a run's ``adapter/``.
        source: the folder the card's snippets load from (default ``folder``; a run writes its card
            into a staging folder that becomes ``RUN/adapter``, and passes that).
        num_processes: training processes, for the images-seen count.
        keep_results: keep the results section of an existing card (training starts a fresh one:
            new weights make an old measurement stale).
    """
    from condistill.adapters.save_load import CONFIG_NAME

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():  # a run folder: its export
        from condistill.adapters.save_load import find_adapter_dir

        folder = find_adapter_dir(folder)
    if run is None:
        run = folder.parent if folder.name == EXPORT_SUBFOLDER and (folder.parent / "config.json").is_file() else folder
    run = Path(run)
    config = json.loads((folder / CONFIG_NAME).read_text())
    train_path = run / "config.json"
    train = json.loads(train_path.read_text()) if train_path.is_file() else None
    grid = _last_grid(run, (config.get("extra") or {}).get("steps_trained"))
    if grid is not None:
        replace_file(folder / SAMPLES_NAME, lambda tmp: shutil.copyfile(grid, tmp))
    scheduler = folder / str(config.get("scheduler") or "scheduler/scheduler_config.json")
    stochastic = json.loads(scheduler.read_text()).get("stochastic") if scheduler.is_file() else None
    results = None
    card = folder / CARD_NAME
    if keep_results and card.is_file():
        results = _results_block(card.read_text(encoding="utf-8"))
    text = render_card(config, train, num_processes=num_processes, samples=(folder / SAMPLES_NAME).is_file(),
                       results=results, source=str(source or folder), stochastic=stochastic)
    write_text(card, text)
    return card


def update_results(run: str | os.PathLike, table: str, command: str) -> Path:
    """Replace the results section of ``RUN/README.md`` with ``table`` and the command that measured it.

    A run without a card gets one first; only the text between the results markers changes.
    """
    from condistill.adapters.save_load import find_adapter_dir

    folder = find_adapter_dir(run)
    card = folder / CARD_NAME
    if not card.is_file() or RESULTS_START not in card.read_text(encoding="utf-8"):
        write_model_card(folder)
    text = card.read_text(encoding="utf-8")
    start, end = text.index(RESULTS_START) + len(RESULTS_START), text.index(RESULTS_END)
    block = f"Measured with `{command}`:\n\n{table.strip()}"
    write_text(card, text[:start] + "\n" + block + "\n" + text[end:])
    return card


def _eval_command(options: Mapping[str, Any]) -> str:
    import shlex

    words = ["condistill", "eval"]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            words += [flag] if item is True else [flag, str(item)]
    return shlex.join(words)


def export_identity(student: str | os.PathLike) -> str | None:
    """A digest of a local export's ``condistill_config.json`` (it changes with every new export, its
    checksums and steps included), or ``None`` for a hub id or a folder that is not an export."""
    from condistill.adapters.save_load import CONFIG_NAME, find_adapter_dir
    from condistill.files import sha256_file

    try:
        return sha256_file(find_adapter_dir(Path(student).expanduser()) / CONFIG_NAME)
    except OSError:
        return None


def record_eval(student: str, table: str, options: Mapping[str, Any],
                log: Callable[[str], None] | None = None, measured: str | None = None) -> Path | None:
    """After ``condistill eval --student RUN``: record ``table`` in RUN's card (a local export only).

    ``options`` are the eval command's parsed options (they become the recorded command).
    ``measured``: :func:`export_identity` of the export when the evaluation loaded it; when the export
    has been replaced since (a continuing run wrote a new one), the table is not recorded (``log``
    says so): it measured the old weights. A hub id or a folder that is not an export is left
    alone; returns the card path or None.
    """
    now = export_identity(student)
    if now is None:
        return None
    if measured is not None and now != measured:
        if log is not None:
            log(f"not recording the results in the card of {student}: its export was replaced while the evaluation "
                "ran (they measured the previous one); evaluate it again")
        return None
    card = update_results(student, table, _eval_command(options))
    if log is not None:
        log(f"recorded the results in {card}")
    return card


def set_card_source(text: str, source: str) -> str:
    """The card with its usage snippets pointing at ``source`` (a hub repo id) instead of the run folder."""
    return _SOURCE_LINE.sub(lambda _: f'ADAPTER = "{source}"', text)
