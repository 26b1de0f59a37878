"""Exports other tools read: ``condistill export RUN --format FORMAT --out FILE``.

* ``kohya`` (kind ``lora``): the UNet LoRA as one kohya/webui ``.safetensors`` file, the format
  A1111's and ComfyUI's LoRA loaders take and diffusers' ``load_lora_weights`` converts on
  load. Keys ``lora_unet_<diffusers module path, dots as underscores>.lora_down.weight``
  (= peft ``lora_A``), ``.lora_up.weight`` (= ``lora_B``) and ``.alpha`` (a scalar tensor:
  the update is scaled by ``alpha / rank`` as in peft), plus kohya's ``ss_*`` metadata. The
  condition adapter is copied beside it as a stock diffusers ``T2IAdapter`` folder, which also holds
  it as one original-layout file, ``OUT_t2i_adapter.safetensors`` (:func:`t2i_single_file_name`), for the
  webui adapter loaders.
* ``single-file`` (kinds ``controlnet`` and ``t2i_adapter``): a ControlNet as one ``.safetensors``
  file in the original (CompVis/ldm ``cldm``) key layout of the A1111/ComfyUI ControlNet loaders
  and of diffusers' ``ControlNetModel.from_single_file``
  (:mod:`condistill.publish.controlnet_layout`); a T2I-Adapter in the original (TencentARC) layout
  of the A1111/ComfyUI adapter loaders (:mod:`condistill.publish.t2i_layout`).

Every file holds the tensors of the run's exported adapter renamed, in the chosen ``dtype``:
float16 by default (what those tools' users download, half the size), bfloat16, or float32, which
keeps them unchanged. The diffusers folder of a kohya export is copied as it is.

Every output is written whole under a temporary name beside its place and renamed into place
(:mod:`condistill.files`), with the usual file modes (``0644`` under ``umask 022``), so a reader
never sees half a file. A kohya export's two outputs are both staged and renamed at the end, the
condition-adapter folder first and the LoRA file last: the LoRA file exists only beside its adapter.
A kill between the two renames leaves the adapter folder alone; it records the LoRA file it goes
with and the SHA-256 of the run's LoRA weights (:data:`EXPORT_RECORD`, the LoRA file's metadata
the same), so the next export of the same run recognises it as its own unfinished output and
replaces it without ``--overwrite``, while a complete export or another run's output is kept.
Staging leftovers of interrupted exports (``.tmp-*`` of processes no longer running) are removed
at the next export to the same place.

The printed instructions are code that works for the run at hand: the base is written as
diffusers finds it (an embedded base through ``condistill.hub.resolve_pretrained_dir``, see
:func:`condistill.publish.card.base_code`). Those loaders read SD's hint block only (conv_out at
``input_hint_block.14``, VAE factor 8), so a ControlNet of another base (the embedded teacher's
factor is 4) gets a note and the code that loads the run's diffusers folder instead of
``from_single_file``, and no A1111/ComfyUI line; neither tool knows the embedded teacher.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from condistill.files import TMP_PREFIX, recover_folder, replace_file, sha256_file, staged_folder
from condistill.publish.card import BASE_MARK
from condistill.publish.comfyui import write_workflow
from condistill.publish.instructions import (CONTROL_TEXT, call_line, embedded_base, one_step_lines, with_base_indented,
                                             workflow_lines)
from condistill.publish.kohya_layout import check_diffusers_maps_back, kohya_lora_state_dict, lora_alpha
from condistill.publish.controlnet_layout import SD_HINT_BLOCK_WIDTHS, SD_HINT_WIDTHS, controlnet_ldm_state_dict
from condistill.publish.t2i_layout import loader_problem, t2i_original_state_dict

__all__ = ["FORMATS", "DTYPES", "DTYPE_ALIASES", "DEFAULT_DTYPE", "EXPORT_RECORD", "ExportResult", "t2i_single_file_name",
           "export", "default_adapter_out", "export_dtype", "kohya_lora_state_dict", "controlnet_ldm_state_dict",
           "t2i_original_state_dict"]

#: format name -> (adapter kinds it applies to, what it writes)
FORMATS = {
    "kohya": (("lora",), "the UNet LoRA as a kohya/webui .safetensors file + the condition adapter as a "
                         "T2I-Adapter folder (diffusers, and one original-layout file)"),
    "single-file": (("controlnet", "t2i_adapter"), "the ControlNet (ldm layout; SDXL: diffusers layout) or the "
                                                   "T2I-Adapter (original layout) as one .safetensors file"),
}
#: export dtypes by name (the spellings of ``condistill cache --dtype``) and their short aliases
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DEFAULT_DTYPE = "float16"


def t2i_single_file_name(out: str | os.PathLike) -> str:
    """The name of a kohya export's condition adapter in the original layout (inside its adapter folder, and the
    name its ComfyUI workflow loads): ``OUT_t2i_adapter.safetensors``, unique per export."""
    return f"{Path(out).stem}_t2i_adapter.safetensors"
#: in a kohya export's condition-adapter folder: the LoRA file it goes with and the SHA-256 of the run's LoRA weights
EXPORT_RECORD = "condistill_export.json"
#: the LoRA file's metadata key of that SHA-256
SOURCE_KEY = "condistill_source_sha256"


@dataclass
class ExportResult:
    """What :func:`export` wrote and how to load it."""

    format: str
    files: list[Path]
    instructions: str
    notes: list[str] = field(default_factory=list)


def _supported_text() -> str:
    return "; ".join(f"--format {name} for kind {' or '.join(map(repr, kinds))} ({what})"
                     for name, (kinds, what) in FORMATS.items())


def export_dtype(name: str) -> torch.dtype:
    """The torch dtype of an export ``--dtype`` name (``float16``/``fp16``, ``bfloat16``/``bf16``,
    ``float32``/``fp32``)."""
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        names = sorted(set(DTYPES) | set(DTYPE_ALIASES))
        raise ValueError(f"unknown export dtype {name!r}; choose one of {names}.")
    return DTYPES[key]


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype`` (contiguous, as safetensors writes them); others as they are.

    Raises:
        ValueError: a finite value becomes infinite in ``dtype`` (beyond float16's range).
    """
    out = {}
    for key, tensor in state.items():
        cast = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
        if cast.is_floating_point() and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
            largest = tensor.abs().max().item()
            raise ValueError(f"{key} holds values up to {largest:.3g}, beyond {dtype}'s range; export with "
                             "--dtype bfloat16 or --dtype float32.")
        out[key] = cast
    return out


# ---- kohya LoRA ---------------------------------------------------------------------------
def default_adapter_out(out: str | os.PathLike) -> Path:
    """Where a kohya export puts the condition adapter without ``--adapter-out``: ``OUT_condition_adapter``."""
    out = Path(out)
    return out.with_name(out.stem + "_condition_adapter")


def _export_kohya(folder: Path, config: dict, out: Path, adapter_out: Path | None, overwrite: bool,
                  dtype: torch.dtype, log: Callable[[str], None]) -> ExportResult:
    from safetensors.torch import load_file, save_file

    lora_file = folder / config["weight_files"]["lora"]
    adapter_src = (folder / config["weight_files"]["t2i_adapter"]).parent
    adapter_out = adapter_out or default_adapter_out(out)
    source = sha256_file(lora_file)
    _check_kohya_outputs(out, adapter_out, source, overwrite, log)
    peft_state = load_file(str(lora_file))
    alpha = lora_alpha(lora_file, config)
    kohya = kohya_lora_state_dict(peft_state, alpha)
    check_diffusers_maps_back(kohya, peft_state)
    kohya = _cast(kohya, dtype)
    adapter_file = folder / config["weight_files"]["t2i_adapter"]
    adapter_config = json.loads((adapter_src / "config.json").read_text())
    original = _cast(t2i_original_state_dict(load_file(str(adapter_file)), adapter_config), dtype)
    problem = loader_problem(adapter_config)
    adapter_name = t2i_single_file_name(out)
    ranks = {int(t.shape[0]) for k, t in kohya.items() if k.endswith("lora_down.weight")}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": repr(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if config.get("base_fingerprint", {}).get("family") == "sdxl" else "sd_v1",
        "ss_training_comment": f"condistill {config['kind']} student of {config['base_name_or_path']} "
                               f"(condition {config['condition_name']}); exported by condistill export",
        "condistill_condition_adapter": f"diffusers T2IAdapter folder beside this file, with {adapter_name}",
        SOURCE_KEY: source,
    }

    def write(tmp: Path) -> None:  # the LoRA file is staged, the adapter folder swapped in, then the LoRA renamed
        save_file(kohya, str(tmp), metadata=metadata)
        with staged_folder(adapter_out, log) as stage:
            shutil.copytree(adapter_src, stage, dirs_exist_ok=True)
            save_file(original, str(stage / adapter_name), metadata={"format": "pt"})
            (stage / EXPORT_RECORD).write_text(json.dumps({"format": "kohya", "lora_file": out.name,
                                                           "source_sha256": source}, indent=2) + "\n")

    flows, notes, webui = ([], [f"A1111/ComfyUI cannot use {adapter_name}: {problem}."], []) if problem else \
        _webui_part(folder, config, out, {"lora": out.name, "controlnet": adapter_name}, overwrite)
    _write_file(out, write, log)
    text_class, adapter_class = _pipelines(config)["text"], _pipelines(config)["adapter"]
    code = with_base_indented([
        f"from diffusers import {adapter_class}, {text_class}, T2IAdapter",
        "from condistill import CoDiScheduler",
        "",
        f'sd = {text_class}.from_pretrained("{BASE_MARK}")',
        f"sd.load_lora_weights({str(out)!r})",
        'parts = {k: v for k, v in sd.components.items() if k not in ("image_encoder", "scheduler")}',
        f"pipe = {adapter_class}(**parts, adapter=T2IAdapter.from_pretrained({str(adapter_out)!r}),",
        f"    scheduler=CoDiScheduler.from_pretrained({str(folder)!r}, subfolder=\"scheduler\"))",
        call_line(config),
    ], config)
    lines = [f"LoRA (kohya/webui format): {out}",
             f"condition adapter (diffusers T2I-Adapter folder): {adapter_out}",
             f"condition adapter (original single-file layout): {adapter_out / adapter_name}",
             *webui,
             "Load both in diffusers (the LoRA alone is not the distilled model: it was trained together with the adapter;",
             f"control: the condition image, {CONTROL_TEXT}):",
             *code]
    return ExportResult("kohya", [out, adapter_out, *flows], "\n".join(lines + one_step_lines(config, folder)), notes)


def _pipelines(config: dict) -> dict[str, str]:
    """The stock pipeline class names of the export's base family (``text``, ``adapter``, ``controlnet``)."""
    from condistill.frozen import FAMILIES

    return FAMILIES[config.get("base_fingerprint", {}).get("family", "sd")].pipelines


# ---- single files ---------------------------------------------------------------------
def _webui_part(folder: Path, config: dict, out: Path, files: dict[str, str], overwrite: bool) -> tuple:
    """The ComfyUI workflow (written first, so the model file, renamed last, marks a complete export), the notes and
    the lines that say where the files go: ``(written paths, notes, lines)``."""
    flow, note = write_workflow(folder, config, out, files, overwrite=overwrite)
    lines = []
    if not embedded_base(config):
        where = "; ".join(f"{name} in models/{'loras' if key == 'lora' else 'controlnet'}" for key, name in files.items())
        lines = [f"A1111/ComfyUI: put {where}."] + workflow_lines(flow, config)
    return [flow] if flow else [], [note] if note else [], lines


def _export_t2i_single_file(folder: Path, config: dict, out: Path, dtype: torch.dtype, overwrite: bool,
                            log: Callable[[str], None]) -> ExportResult:
    from safetensors.torch import load_file, save_file

    weights = folder / config["weight_files"]["t2i_adapter"]
    adapter_config = json.loads((weights.parent / "config.json").read_text())
    state = _cast(t2i_original_state_dict(load_file(str(weights)), adapter_config), dtype)
    metadata = {"format": "pt", "condistill": f"t2i_adapter student of {config['base_name_or_path']}"}
    problem = loader_problem(adapter_config)
    flows, notes, lines = ([], [f"A1111/ComfyUI will not load it: {problem}."], []) if problem else \
        _webui_part(folder, config, out, {"controlnet": out.name}, overwrite)
    _write_file(out, lambda tmp: save_file(state, str(tmp), metadata=metadata), log)
    pipeline = _pipelines(config)["adapter"]
    sub = weights.parent.relative_to(folder).as_posix()
    lines = [f"T2I-Adapter (original single-file layout): {out}", *lines,
             f"diffusers reads the run's diffusers folder, the same tensors (control: the condition image, "
             f"{CONTROL_TEXT}):"]
    lines += with_base_indented([
        f"from diffusers import T2IAdapter, {pipeline}",
        "from condistill import CoDiScheduler",
        "",
        f"adapter = T2IAdapter.from_pretrained({str(folder)!r}, subfolder={sub!r})",
        f'pipe = {pipeline}.from_pretrained("{BASE_MARK}", adapter=adapter, safety_checker=None)',
        f"pipe.scheduler = CoDiScheduler.from_pretrained({str(folder)!r}, subfolder=\"scheduler\")",
        call_line(config),
    ], config)
    return ExportResult("single-file", [out, *flows], "\n".join(lines + one_step_lines(config, folder)), notes)


def _export_single_file(folder: Path, config: dict, out: Path, dtype: torch.dtype, overwrite: bool,
                        log: Callable[[str], None]) -> ExportResult:
    from safetensors.torch import load_file, save_file

    if config["kind"] == "t2i_adapter":
        return _export_t2i_single_file(folder, config, out, dtype, overwrite, log)
    weights = folder / config["weight_files"]["controlnet"]
    cn_config = json.loads((weights.parent / "config.json").read_text())
    sdxl = config.get("base_fingerprint", {}).get("family") == "sdxl"
    if sdxl:  # SDXL ControlNets are published, and read by ComfyUI and A1111, in diffusers' own key layout
        state, layout = _cast(load_file(str(weights)), dtype), "diffusers layout, as SDXL ControlNets are published"
    else:
        state = _cast(controlnet_ldm_state_dict(load_file(str(weights)), cn_config), dtype)
        layout = "original single-file layout"
    metadata = {"format": "pt", "condistill": f"controlnet student of {config['base_name_or_path']}"}
    widths = list(cn_config["conditioning_embedding_out_channels"])
    notes = []
    # diffusers' single-file reader takes the widths from the config but assumes SD's four of them; the webui
    # loaders build SD's hint block itself, widths included
    readable = len(widths) == SD_HINT_BLOCK_WIDTHS
    if widths != SD_HINT_WIDTHS:
        notes.append(
            f"this ControlNet's condition embedding has widths {widths}, not SD's {SD_HINT_WIDTHS} (VAE factor 8), so "
            "A1111/ComfyUI, which build SD's, will not load it"
            + ("." if readable else f"; its hint block ends at input_hint_block.{4 * len(widths) - 2}, not 14, so "
                                    "diffusers' from_single_file will not load it either."))
    flows, more, lines = ([], [], []) if notes else \
        _webui_part(folder, config, out, {"controlnet": out.name}, overwrite)
    _write_file(out, lambda tmp: save_file(state, str(tmp), metadata=metadata), log)
    pipeline = _pipelines(config)["controlnet"]
    sub = weights.parent.relative_to(folder).as_posix()
    load = (f"controlnet = ControlNetModel.from_single_file({str(out)!r}, config={str(weights.parent)!r})"
            if readable and not sdxl else
            f"controlnet = ControlNetModel.from_pretrained({str(folder)!r}, subfolder={sub!r})")
    code = with_base_indented([
        f"from diffusers import ControlNetModel, {pipeline}",
        "from condistill import CoDiScheduler",
        "",
        load,
        f'pipe = {pipeline}.from_pretrained("{BASE_MARK}", controlnet=controlnet, safety_checker=None)',
        f"pipe.scheduler = CoDiScheduler.from_pretrained({str(folder)!r}, subfolder=\"scheduler\")",
        call_line(config),
    ], config)
    lines = [f"ControlNet ({layout}): {out}", *lines]
    lines.append(f"diffusers (control: the condition image, {CONTROL_TEXT}):" if readable and not sdxl else
                 f"diffusers{' cannot read this file (see the note above);' if not readable else ':'} the same "
                 f"ControlNet from the run's diffusers folder (control: the condition image, {CONTROL_TEXT}):")
    return ExportResult("single-file", [out, *flows], "\n".join(lines + code + one_step_lines(config, folder)),
                        notes + more)


# ---- files --------------------------------------------------------------------------------
def _refuse_existing(path: Path, overwrite: bool, flag: str) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} already exists; pass --overwrite to replace it.")


def _recorded_sources(out: Path, adapter_out: Path) -> tuple[str | None, str | None]:
    """The run's LoRA digest that an existing kohya LoRA file and condition-adapter folder record (``None``: not
    recorded, not ours, or not there); the folder's counts only when it names this LoRA file."""
    lora = adapter = None
    if out.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(out), framework="pt") as f:
                lora = (f.metadata() or {}).get(SOURCE_KEY)
        except Exception:  # noqa: BLE001 - not a safetensors file: not one of ours
            lora = None
    try:
        record = json.loads((adapter_out / EXPORT_RECORD).read_text())
        adapter = record.get("source_sha256") if record.get("lora_file") == out.name else None
    except (OSError, ValueError, AttributeError):
        adapter = None
    return lora, adapter


def _check_places(run: Path, folder: Path, out: Path, adapter_out: Path | None) -> None:
    """Refuse outputs inside the run or its export (they would replace its own files), an ``--adapter-out`` that
    holds the run, and an ``--out`` inside ``--adapter-out`` (which is replaced whole)."""
    inside = {run.resolve(), folder.resolve()}
    for flag, path in (("--out", out), ("--adapter-out", adapter_out)):
        if path is None:
            continue
        resolved = path.resolve()
        if inside & ({resolved} | set(resolved.parents)):
            raise ValueError(f"{flag} {path} is inside the run {run}; write exports outside it (the run's own files "
                             "would be replaced).")
        if flag == "--adapter-out" and resolved in folder.resolve().parents:
            raise ValueError(f"--adapter-out {path} holds the run {run}; the export replaces that folder whole.")
    if adapter_out is not None and adapter_out.resolve() in {out.resolve(), *out.resolve().parents}:
        raise ValueError(f"--out {out} is inside --adapter-out {adapter_out}, which the export replaces whole; "
                         "write them side by side.")


def _check_kohya_outputs(out: Path, adapter_out: Path, source: str, overwrite: bool,
                         log: Callable[[str], None]) -> None:
    """Refuse existing kohya outputs without ``overwrite``, except the half of an interrupted export of this run
    (an adapter folder a kill left at ``.old-NAME`` is put back first)."""
    recover_folder(adapter_out, log)
    _remove_leftovers(adapter_out, log)
    if adapter_out.exists() and not adapter_out.is_dir():
        raise NotADirectoryError(f"--adapter-out {adapter_out} is a file; give a folder for the condition adapter.")
    foreign = sorted(p.name for p in adapter_out.iterdir()) if adapter_out.is_dir() else []
    if foreign and not (adapter_out / EXPORT_RECORD).is_file():  # --overwrite replaces the folder whole
        raise FileExistsError(
            f"--adapter-out {adapter_out} holds files condistill did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); the export replaces that folder whole, so give a new folder "
            "(--overwrite replaces only an earlier kohya export's adapter folder).")
    if overwrite:
        return
    recorded = dict(zip(("--out", "--adapter-out"), _recorded_sources(out, adapter_out)))
    existing = {flag: path for flag, path in (("--out", out), ("--adapter-out", adapter_out)) if path.exists()}
    if len(existing) == 1:
        (flag, path), = existing.items()
        if recorded[flag] == source:  # its other half is missing: an export of this run was interrupted
            log(f"replacing {path}, left by an interrupted export of this run (its other output is missing)")
            return
    for flag, path in existing.items():
        _refuse_existing(path, overwrite, flag)


def _gone(pid: str) -> bool:
    """Whether the process ``pid`` that staged a file no longer runs (this process counts as gone: it restarts)."""
    from condistill.files import writer_alive

    return pid.isdigit() and not writer_alive(pid)


def _remove_leftovers(out: Path, log: Callable[[str], None]) -> None:
    """Staged copies of ``out`` that interrupted writes left: ``.tmp-NAME-PID`` files of processes no longer
    running (folders: :func:`condistill.files.recover_folder`), and ``.tmp-NAME`` (earlier releases staged
    files and folders without the process id)."""
    if not out.parent.is_dir():
        return
    prefix = f"{TMP_PREFIX}{out.name}"
    for path in out.parent.iterdir():
        pid = path.name[len(prefix) + 1:]
        if path.name == prefix or (path.is_file() and path.name.startswith(prefix + "-") and _gone(pid)):
            log(f"removing {path}, left by an interrupted export")
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _write_file(out: Path, write: Callable[[Path], None], log: Callable[[str], None]) -> None:
    """``write(tmp)`` then ``tmp`` renamed to ``out`` (:func:`condistill.files.replace_file`, mode 0644 under
    umask 022); leftovers of interrupted writes are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out, log)
    replace_file(out, write)


def export(run, format: str, out, *, adapter_out=None, overwrite: bool = False,  # noqa: A002
           dtype: str = DEFAULT_DTYPE, log: Callable[[str], None] | None = None) -> ExportResult:
    """Write the adapter of ``run`` (a run folder or adapter folder) in ``format`` to ``out``.

    Every output is written atomically (module docstring); ``log`` receives a line for each leftover of an
    interrupted export that is removed or replaced.

    Raises:
        FileNotFoundError: ``run`` holds no exported adapter.
        FileExistsError: ``out`` (or the condition-adapter folder) exists and ``overwrite`` is false (the
            half of an interrupted kohya export of the same run is replaced without it).
        IsADirectoryError: ``out`` is a folder.
        ValueError: an unknown format or dtype, a format that does not apply to the run's adapter kind, an output
            inside the run, or overlapping outputs.
    """
    from condistill.adapters.save_load import read_adapter_config

    log = log or (lambda message: None)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; supported: {_supported_text()}.")
    torch_dtype = export_dtype(dtype)
    run, out = Path(run), Path(out)
    if not run.exists():
        raise FileNotFoundError(f"no run or adapter folder {run}.")
    config = read_adapter_config(run)
    from condistill.adapters.config_checks import verify_checksums

    verify_checksums(config, config["_folder"], stacklevel=2)  # a damaged or edited file is never converted
    kind, wanted = config["kind"], FORMATS[format][0]
    if kind not in wanted:
        raise ValueError(f"{run} holds a {kind!r} adapter; --format {format} exports {' and '.join(map(repr, wanted))} "
                         f"adapters only. Supported: {_supported_text()}.")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must be a .safetensors file.")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the path of the .safetensors file to write.")
    folder = Path(config["_folder"])
    _check_places(run, folder, out, Path(adapter_out) if adapter_out else None)
    if format == "kohya":
        return _export_kohya(folder, config, out, Path(adapter_out) if adapter_out else None, overwrite, torch_dtype,
                             log)
    if adapter_out:
        raise ValueError("--adapter-out applies to --format kohya only.")
    _refuse_existing(out, overwrite, "--out")
    return _export_single_file(folder, config, out, torch_dtype, overwrite, log)
