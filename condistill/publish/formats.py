"""Exports other tools read: ``condistill export RUN --format FORMAT --out FILE``.

* ``kohya`` (kind ``lora``): the UNet LoRA as one kohya/webui ``.safetensors`` file, the format
  A1111's and ComfyUI's LoRA loaders take and diffusers' ``load_lora_weights`` converts on
  load. Keys ``lora_unet_<diffusers module path, dots as underscores>.lora_down.weight``
  (= peft ``lora_A``), ``.lora_up.weight`` (= ``lora_B``) and ``.alpha`` (a scalar tensor:
  the update is scaled by ``alpha / rank`` as in peft), plus kohya's ``ss_*`` metadata. The
  condition adapter is copied beside it as a stock diffusers ``T2IAdapter`` folder, which also holds
  it as one original-layout file, :data:`T2I_SINGLE_FILE`, for the webui adapter loaders.
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
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from condistill.files import TMP_PREFIX, recover_folder, replace_file, sha256_file, staged_folder
from condistill.publish.card import BASE_MARK
from condistill.publish.comfyui import write_workflow
from condistill.publish.instructions import CONTROL_TEXT, call_line, embedded_base, with_base_indented, workflow_lines
from condistill.publish.controlnet_layout import SD_HINT_BLOCK_WIDTHS, controlnet_ldm_state_dict
from condistill.publish.t2i_layout import loader_problem, t2i_original_state_dict

__all__ = ["FORMATS", "DTYPES", "DTYPE_ALIASES", "DEFAULT_DTYPE", "EXPORT_RECORD", "T2I_SINGLE_FILE", "ExportResult",
           "export", "default_adapter_out", "export_dtype", "kohya_lora_state_dict", "controlnet_ldm_state_dict",
           "t2i_original_state_dict"]

#: format name -> (adapter kinds it applies to, what it writes)
FORMATS = {
    "kohya": (("lora",), "the UNet LoRA as a kohya/webui .safetensors file + the condition adapter as a "
                         "T2I-Adapter folder (diffusers, and one original-layout file)"),
    "single-file": (("controlnet", "t2i_adapter"), "the ControlNet or T2I-Adapter as one original-layout "
                                                   "(ldm/cldm, TencentARC) .safetensors file"),
}
#: export dtypes by name (the spellings of ``condistill cache --dtype``) and their short aliases
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DEFAULT_DTYPE = "float16"
#: in a kohya export's condition-adapter folder: the adapter in the original single-file layout
T2I_SINGLE_FILE = "t2i_adapter.safetensors"
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
    """Floating tensors in ``dtype`` (contiguous, as safetensors writes them); others as they are."""
    return {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in state.items()}


# ---- kohya LoRA ---------------------------------------------------------------------------
_PEFT_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def kohya_lora_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA keys ``unet.<module>.lora_A/B.weight`` -> kohya keys (+ one ``.alpha`` each)."""
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, set[str]] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(
                f"LoRA key {key!r} is not a UNet lora_A/lora_B weight; the kohya export supports plain UNet LoRAs only."
            )
        module, ab = match["module"], match["ab"]
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = tensor.contiguous()
        pairs.setdefault(name, set()).add(ab)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
    unpaired = sorted(n for n, abs_ in pairs.items() if abs_ != {"A", "B"})
    if unpaired:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {unpaired[:5]}")
    return out


def _check_diffusers_maps_back(kohya: dict[str, torch.Tensor], peft_state: dict[str, torch.Tensor]) -> None:
    """The installed diffusers' kohya reader must map every key back to its own module (when importable)."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # another diffusers layout: the loader itself is the check
        return
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    back = set(convert_unet_state_dict_to_peft(converted))
    wrong = sorted(set(peft_state) - back)
    if wrong:
        raise ValueError(
            f"diffusers would read {len(wrong)} kohya key(s) back as other modules (module names with underscores "
            f"it cannot tell from path separators), e.g. {wrong[:3]}; this LoRA's targets cannot be exported to kohya."
        )


def _lora_alpha(file: Path, adapter_config: dict) -> float:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    for flag in ("use_rslora", "use_dora"):
        if meta.get(f"unet.{flag}"):
            raise ValueError(f"{file}: {flag} LoRAs have no kohya equivalent here.")
    if meta.get("unet.alpha_pattern") or meta.get("unet.rank_pattern"):
        raise ValueError(f"{file}: per-module alpha/rank patterns are not supported by the kohya export.")
    alpha = meta.get("unet.lora_alpha", adapter_config.get("adapter_options", {}).get("lora_alpha"))
    if alpha is None:
        raise ValueError(f"{file} records no lora_alpha (neither in its metadata nor in condistill_config.json).")
    return float(alpha)


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
    alpha = _lora_alpha(lora_file, config)
    kohya = kohya_lora_state_dict(peft_state, alpha)
    _check_diffusers_maps_back(kohya, peft_state)
    kohya = _cast(kohya, dtype)
    adapter_file = folder / config["weight_files"]["t2i_adapter"]
    adapter_config = json.loads((adapter_src / "config.json").read_text())
    original = _cast(t2i_original_state_dict(load_file(str(adapter_file)), adapter_config), dtype)
    problem = loader_problem(adapter_config)
    ranks = {int(t.shape[0]) for k, t in kohya.items() if k.endswith("lora_down.weight")}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": repr(alpha),
        "ss_base_model_version": "sdxl_base_v1-0" if config.get("base_fingerprint", {}).get("family") == "sdxl" else "sd_v1",
        "ss_training_comment": f"condistill {config['kind']} student of {config['base_name_or_path']} "
                               f"(condition {config['condition_name']}); exported by condistill export",
        "condistill_condition_adapter": f"diffusers T2IAdapter folder beside this file, with {T2I_SINGLE_FILE}",
        SOURCE_KEY: source,
    }

    def write(tmp: Path) -> None:  # the LoRA file is staged, the adapter folder swapped in, then the LoRA renamed
        save_file(kohya, str(tmp), metadata=metadata)
        with staged_folder(adapter_out, log) as stage:
            shutil.copytree(adapter_src, stage, dirs_exist_ok=True)
            save_file(original, str(stage / T2I_SINGLE_FILE), metadata={"format": "pt"})
            (stage / EXPORT_RECORD).write_text(json.dumps({"format": "kohya", "lora_file": out.name,
                                                           "source_sha256": source}, indent=2) + "\n")

    _write_file(out, write, log)
    from condistill.frozen import FAMILIES

    family = FAMILIES[config.get("base_fingerprint", {}).get("family", "sd")]
    text_class, adapter_class = family.pipelines["text"], family.pipelines["adapter"]
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
             f"condition adapter (original single-file layout): {adapter_out / T2I_SINGLE_FILE}",
             "Load both in diffusers (the LoRA alone is not the distilled model: it was trained together with the adapter;",
             f"control: the condition image, {CONTROL_TEXT}):",
             *code]
    notes = [] if problem is None else [f"A1111/ComfyUI cannot use {T2I_SINGLE_FILE}: {problem}."]
    files = [out, adapter_out]
    if problem is None:
        adapter_name = f"{out.stem}_{T2I_SINGLE_FILE}"
        flow, note = write_workflow(folder, config, out, {"lora": out.name, "controlnet": adapter_name},
                                    overwrite=overwrite)
        notes += [note] if note else []
        files += [flow] if flow else []
        if not embedded_base(config):  # the embedded teacher lives only inside condistill
            lines += [f"A1111/ComfyUI: put {out.name} in models/loras and {T2I_SINGLE_FILE} in models/controlnet "
                      f"as {adapter_name}; load both: the LoRA alone is not the distilled model."]
            lines += workflow_lines(flow, config)
    instructions = "\n".join(lines)
    return ExportResult("kohya", files, instructions, notes)


# ---- single files ---------------------------------------------------------------------
def _export_t2i_single_file(folder: Path, config: dict, out: Path, dtype: torch.dtype, overwrite: bool,
                            log: Callable[[str], None]) -> ExportResult:
    from safetensors.torch import load_file, save_file

    weights = folder / config["weight_files"]["t2i_adapter"]
    adapter_config = json.loads((weights.parent / "config.json").read_text())
    state = _cast(t2i_original_state_dict(load_file(str(weights)), adapter_config), dtype)
    metadata = {"format": "pt", "condistill": f"t2i_adapter student of {config['base_name_or_path']}"}
    _write_file(out, lambda tmp: save_file(state, str(tmp), metadata=metadata), log)
    problem = loader_problem(adapter_config)
    notes = [] if problem is None else [f"A1111/ComfyUI will not load it: {problem}."]
    lines, files = [f"T2I-Adapter (original single-file layout): {out}"], [out]
    if problem is None:
        flow, note = write_workflow(folder, config, out, {"controlnet": out.name}, overwrite=overwrite)
        notes += [note] if note else []
        files += [flow] if flow else []
        if not embedded_base(config):
            lines += [f"A1111/ComfyUI: put {out.name} in models/controlnet (their T2I-Adapter loaders read it)."]
            lines += workflow_lines(flow, config)
    from condistill.frozen import FAMILIES

    pipeline = FAMILIES[config.get("base_fingerprint", {}).get("family", "sd")].pipelines["adapter"]
    sub = weights.parent.relative_to(folder).as_posix()
    lines.append(f"diffusers reads the run's diffusers folder, the same tensors (control: the condition image, "
                 f"{CONTROL_TEXT}):")
    lines += with_base_indented([
        f"from diffusers import T2IAdapter, {pipeline}",
        "from condistill import CoDiScheduler",
        "",
        f"adapter = T2IAdapter.from_pretrained({str(folder)!r}, subfolder={sub!r})",
        f'pipe = {pipeline}.from_pretrained("{BASE_MARK}", adapter=adapter, safety_checker=None)',
        f"pipe.scheduler = CoDiScheduler.from_pretrained({str(folder)!r}, subfolder=\"scheduler\")",
        call_line(config),
    ], config)
    return ExportResult("single-file", files, "\n".join(lines), notes)


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
    _write_file(out, lambda tmp: save_file(state, str(tmp), metadata=metadata), log)
    notes = []
    widths = cn_config["conditioning_embedding_out_channels"]
    if len(widths) != SD_HINT_BLOCK_WIDTHS:
        notes.append(
            f"this ControlNet's condition embedding has {len(widths)} widths {widths} (SD ControlNets have "
            f"{SD_HINT_BLOCK_WIDTHS}, VAE factor 8): its hint block ends at input_hint_block."
            f"{4 * len(widths) - 2}, not 14, so A1111/ComfyUI and diffusers' from_single_file, which assume SD's, "
            "will not load it."
        )
    from condistill.frozen import FAMILIES

    pipeline = FAMILIES[config.get("base_fingerprint", {}).get("family", "sd")].pipelines["controlnet"]
    sub = weights.parent.relative_to(folder).as_posix()
    readable = not notes  # the hint block diffusers' single-file reader and the webui loaders assume
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
    lines, files = [f"ControlNet ({layout}): {out}"], [out]
    if readable:
        flow, note = write_workflow(folder, config, out, {"controlnet": out.name}, overwrite=overwrite)
        notes += [note] if note else []
        files += [flow] if flow else []
        if not embedded_base(config):
            lines += [f"A1111/ComfyUI: put {out.name} in models/controlnet."] + workflow_lines(flow, config)
    lines.append(f"diffusers (control: the condition image, {CONTROL_TEXT}):" if readable and not sdxl else
                 f"diffusers{' cannot read this file (see the note above);' if not readable else ':'} the same "
                 f"ControlNet from the run's diffusers folder (control: the condition image, {CONTROL_TEXT}):")
    instructions = "\n".join(lines + code)
    return ExportResult("single-file", files, instructions, notes)


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


def _check_kohya_outputs(out: Path, adapter_out: Path, source: str, overwrite: bool,
                         log: Callable[[str], None]) -> None:
    """Refuse existing kohya outputs without ``overwrite``, except the half of an interrupted export of this run
    (an adapter folder a kill left at ``.old-NAME`` is put back first)."""
    recover_folder(adapter_out, log)
    _remove_leftovers(adapter_out, log)
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
        ValueError: an unknown format or dtype, or a format that does not apply to the run's adapter kind.
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
    if format == "kohya":
        return _export_kohya(folder, config, out, Path(adapter_out) if adapter_out else None, overwrite, torch_dtype,
                             log)
    if adapter_out:
        raise ValueError("--adapter-out applies to --format kohya only.")
    _refuse_existing(out, overwrite, "--out")
    return _export_single_file(folder, config, out, torch_dtype, overwrite, log)
