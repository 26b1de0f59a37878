"""Every ```python and ```bash block of README.md and docs/ runs here, or is listed below with the reason it does not.

How a block is treated:

* **Python blocks** run as written (``exec``), the blocks of one document in order in one namespace, in a
  prepared working folder (below). The README's "Using a distilled adapter" blocks run in
  ``tests/test_readme.py`` (on a run trained with the ``sd15-gpu`` edge thresholds), the section list it
  exports. API overviews that take a few names as given (a record, a batch of images) get them from
  ``GIVEN``, stated per document.
* **Shell blocks** are split into commands (backslash continuations joined, comments dropped), and every
  command matches exactly one entry of ``COMMANDS``:

  - ``run``: run in this process through the entry point the command names (``condistill`` is
    ``condistill.cli.main``; ``python script.py`` runs the script as ``__main__`` with its folder first on
    ``sys.path``, as python does; ``accelerate launch`` of one process starts the script just so). A new
    process would spend most of its time importing torch and diffusers again (about 8 s each on 2 busy
    cores); the accelerate state is reset around each such run, as a new process starts without one;
  - ``subprocess``: run as a command, launcher included (the README's GPU quickstart through
    ``accelerate launch``, which works offline on CPU, and the two-process ``torchrun``);
  - ``parse``: too long to run here (hundreds of steps, 64-image evaluations, several GPUs); the command
    line is read by condistill's own parser instead (``config_from_args`` for a training, which validates
    every option and value, the eval parser and ``parse_rows`` for an evaluation) and the files it names
    in the checkout must exist: a renamed or misspelt option still fails;
  - ``skip``: with the reason.

  A command that no entry matches, or two do, fails ``test_every_block_is_run_or_listed``; so does an
  entry that matches no command, and an untagged fence whose first line looks like a command.
* **Substitutions**, stated here and in each entry's ``replace``/``append``: ``.venv/bin/NAME`` is the
  ``NAME`` beside this test's Python. The hub ids of the presets' bases (SD 1.5 and SDXL base 1.0) are
  tiny random bases of those families (``helpers.make_tiny_base``: 16 px, ``make_tiny_sdxl_base``: 64 px)
  in a hub cache made for the test, read with ``HF_HUB_OFFLINE=1``; ``/path/to/images...`` is ``images/``,
  8 synthetic scenes with caption files; training commands run 1-2 steps without checkpoints or validation
  grids. Subprocesses get ``OMP_NUM_THREADS=1`` and the hub variables.
* **The working folder** (one per module): symlinks to the checkout's ``recipes/``, ``tools/``,
  ``benchmarks/``, ``tests/``, ``scripts/``, ``examples/``, ``condistill/`` and ``docs/results/`` (the
  commands name them relative to a checkout; only reading commands run on them), an own ``docs/images/``
  (docs/teacher.md's evaluation writes there), ``scene.png``, ``images/`` and, when a document needs them,
  two-step runs under the names it uses (``NEEDS``).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from test_readme import SECTIONS as README_SECTIONS_RUN_ELSEWHERE, section_of

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
SD15, SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
LINKED = ("recipes", "tools", "benchmarks", "tests", "scripts", "examples", "condistill", "docs/results", "data")
#: the first words of a fence's first line that make an untagged fence a command that should be tagged
COMMAND_WORDS = (".venv/", "python", "bash ", "condistill ", "accelerate ", "torchrun ", "pip ", "hf ")
SUBPROCESS_TIMEOUT = 300

# ---- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """How the commands of ``doc`` that ``match`` (a regex searched in the command) are treated."""

    doc: str
    match: str
    how: str  # "run" | "subprocess" | "parse" | "skip"
    why: str
    replace: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied to the command in order, each must match
    append: str = ""  # arguments added at the end
    check: Callable[[Path, str], None] | None = None  # (working folder, output) after a run


#: the substitution every data path of the docs gets
DATA = ((r"/path/to/images[\w-]*", "images"),)
#: a training run reduced to what shows that it runs to an export
TINY_TRAIN = "--max-steps 1 --batch-size 2 --checkpoint-every 0 --validate-every 0"


def _exported(run: str, **expected) -> Callable[[Path, str], None]:
    """A check: ``run`` holds an export, and its config.json records ``expected``."""
    def check(work: Path, output: str) -> None:
        import json

        assert (work / run / "adapter" / "condistill_config.json").is_file(), f"{run} has no export:\n{output[-3000:]}"
        recorded = json.loads((work / run / "config.json").read_text())
        assert {k: recorded[k] for k in expected} == expected
    return check


def _wrote(*paths: str) -> Callable[[Path, str], None]:
    def check(work: Path, output: str) -> None:
        missing = [p for p in paths if not (work / p).exists()]
        assert not missing, f"not written: {missing}\n{output[-3000:]}"
    return check


SD15_GPU_RAN = dict(mixed_precision="bf16", gradient_checkpointing=True, guidance_min=1.0, guidance_max=4.0,
                    condition_options={"low_threshold": 100, "high_threshold": 200})

DEMO_SERVES = "serves until stopped; tests/demo/test_browser.py serves the page and drives it in Chromium"

COMMANDS: list[Entry] = [
    # ---- README.md
    Entry("README.md", r"^bash scripts/demo\.sh$", "skip",
          "scripts/setup.sh installs into .venv, then 700 steps take 9 minutes; the same recipe runs below"),
    Entry("README.md", r"^bash scripts/test\.sh$", "skip", "the test suite itself (this file is part of it)"),
    Entry("README.md", r"^bash scripts/setup\.sh$", "skip", "creates .venv and installs packages from the network"),
    Entry("README.md", r"hf auth login", "skip", "interactive, and needs the network and a hub account"),
    Entry("README.md", r"^condistill train paired --data data/paired ", "run",
          "two steps of the paired condition on data/paired, the control images taken as they are",
          append="--max-steps 2 --batch-size 2 --checkpoint-every 0 --validate-every 0",
          check=_exported("runs/paired", condition="paired", condition_options={"control_type": "canny edges"})),
    Entry("README.md", r"^condistill train edge --preset sd15-gpu .*pretrained_controlnet", "parse",
          "SD 1.5 and a ControlNet from the hub: needs a GPU and the network"),
    Entry("docs/lcm-lora.md", r"^condistill train none --output-dir runs/lcm-lora$", "run",
          "two steps of the LCM-LoRA recipe", append="--max-steps 2 --batch-size 2 --checkpoint-every 0 --validate-every 0",
          check=_exported("runs/lcm-lora", adapter="lcm_lora", regression_weight=0.0, ode_source="teacher")),
    Entry("docs/lcm-lora.md", r"^condistill eval --condition edge --student runs/edge --baseline runs/edge-baseline "
          r"--lcm-lora runs/lcm-lora", "run", "2 scenes instead of 64, on the two-step runs of this document",
          replace=((r"--num-images 64", "--num-images 2 --batch-size 2"),),
          check=lambda work, out: _assert_in("| lcm-lora+baseline-4-g1.5 |", out)),
    Entry("docs/lcm-lora.md", r"^condistill eval --condition edge --student runs/edge-sd15 ", "parse",
          "SD 1.5, a hub ControlNet and LCM-LoRA, a GPU"),
    Entry("docs/existing-adapters.md", r"^condistill train edge --preset sd15-gpu .*pretrained_controlnet", "parse",
          "SD 1.5 and a ControlNet from the hub: needs a GPU and the network"),
    Entry("docs/existing-adapters.md", r"^condistill train edge --data data/images .*runs/edge-baseline", "run",
          "two steps from a run's ControlNet (a two-step run stands in for the conventional baseline)",
          append="--max-steps 2 --batch-size 2 --checkpoint-every 0 --validate-every 0",
          check=_exported("runs/edge-from-baseline",
                          adapter_options={"pretrained_controlnet": "runs/edge-baseline"})),
    Entry("README.md", r"condistill push ", "skip",
          "uploads to the hub; tests/publish/test_push.py runs push against a fake hub"),
    Entry("README.md", r"^\.venv/bin/accelerate launch recipes/edge\.py --preset sd15-gpu .*--data /path", "subprocess",
          "the GPU quickstart as written, launcher included, with bf16 for the preset's fp16 (refused off CUDA) and "
          "the tiny SD base's 16 px: one step of the preset's gradient checkpointing and guidance in bf16 on CPU",
          replace=DATA, append=f"--mixed-precision bf16 --resolution 16 {TINY_TRAIN}",
          check=_exported("runs/edge-sd15", **SD15_GPU_RAN)),
    Entry("README.md", r"condistill cache --condition edge", "run", "the latent cache of the tiny SD base at its 16 px",
          replace=(*DATA, ("--resolution 512", "--resolution 16"), ("--device cuda", "--device cpu")),
          check=_wrote("cache/edge-sd15")),
    Entry("README.md", r"^\.venv/bin/accelerate launch recipes/edge\.py .*--data cache/edge-sd15", "run",
          "trains on the cache just written (a cache made with other condition options is refused); into "
          "runs/edge-sd15-cache, since the quickstart above finished runs/edge-sd15",
          replace=(("runs/edge-sd15", "runs/edge-sd15-cache"),),
          append=f"--mixed-precision bf16 --resolution 16 {TINY_TRAIN}",
          check=_exported("runs/edge-sd15-cache", **SD15_GPU_RAN)),
    # ---- docs/comfyui.md
    Entry("docs/comfyui.md", r"^condistill export runs/edge --format single-file", "run",
          "exports the two-step embedded-teacher run: the file is written, and the export says why ComfyUI gets no "
          "workflow for it", check=lambda work, out: (_wrote("edge.safetensors")(work, out),
                                                     _assert_in("ControlNet (original single-file layout)", out))),
    Entry("docs/comfyui.md", r"^python tools/comfyui_fixtures\.py --comfyui", "skip",
          "needs a ComfyUI checkout and its Python dependencies, which are not condistill's; "
          "tests/publish/test_comfyui.py checks the fixtures it wrote"),
    # ---- README.md and docs/demo.md: condistill demo
    *[Entry(doc, r"^condistill demo ", "parse", DEMO_SERVES) for doc in ("README.md", "docs/demo.md")],
    Entry("docs/demo.md", r"^pip install .condistill\[demo\].$", "skip", "installs from the package index"),
    Entry("docs/demo.md", r"demo_latency\.py --threads 1 --updates 50 --out", "run",
          "the sampling figures of a one-step-trained student, one update each, without the browser part (the "
          "browser tests drive the same page)",
          replace=(("--updates 50", "--updates 1 --warmup 0 --train-steps 1 --no-browser"),),
          check=_wrote("docs/benchmarks/demo_latency_cpu.json")),
    Entry("docs/demo.md", r"demo_latency\.py .*--decoder", "skip",
          "the command above with the tiny decoder: 50 updates per step count and a minute of drawing in Chromium"),
    # ---- docs/distributed.md
    Entry("docs/distributed.md", r"--multi_gpu|--config_file examples/accelerate/ddp\.yaml|--nproc_per_node 4", "parse",
          "4 processes of SD 1.5, one per GPU"),
    Entry("docs/distributed.md", r"^ACCELERATE_USE_CPU=true \.venv/bin/torchrun --standalone --nproc_per_node 2", "subprocess",
          "two CPU processes over gloo, as written, for 2 steps of batch 2",
          replace=(("--max-steps 6", "--max-steps 2"), ("--batch-size 4", "--batch-size 2")),
          append="--checkpoint-every 0 --validate-every 0",
          check=lambda work, out: (_exported("runs/edge-2cpu")(work, out), _assert_in("processes: 2", out))),
    # ---- docs/fast-decoder.md
    Entry("docs/fast-decoder.md", r"train_tiny_decoder\.py --threads 2", "skip",
          "20 minutes, and it rewrites the packaged decoder; its smoke mode runs in tests/test_decoders.py"),
    Entry("docs/fast-decoder.md", r"train_tiny_decoder\.py --eval-only", "skip",
          "scores 512 held-out scenes and the student's samples (minutes); the smoke run in tests/test_decoders.py "
          "measures too"),
    Entry("docs/fast-decoder.md", r"benchmarks/sampling_latency\.py --adapter runs/fastdec-edge200", "run",
          "the latency rows on a two-step run under that name, one image, timed once",
          replace=(("--batch-size 8 --repeats 5", "--batch-size 1 --repeats 1"),)),
    # ---- docs/judge.md
    Entry("docs/judge.md", r"tools/train_judge\.py$", "skip", "17 minutes, and it rewrites the packaged judge"),
    Entry("docs/judge.md", r"tools/train_judge\.py --help$", "run", "prints the options"),
    Entry("docs/judge.md", r"tools/train_judge\.py --smoke", "run", "seconds, as the doc says",
          check=_wrote("runs/judge-smoke")),
    Entry("docs/judge.md", r"tools/train_depth_judge\.py$", "skip",
          "19 minutes, and it rewrites the packaged depth estimator; its smoke mode runs in tests/world/test_judge.py"),
    Entry("docs/judge.md", r"tools/train_judge\.py --eval-only", "skip",
          "rewrites the packaged judge's metrics.json (1,000 scenes, a minute)"),
    # ---- docs/results.md
    Entry("docs/results.md", r"reproduce_results\.sh", "skip", "trains 24 runs and scores 12 pairs: hours"),
    Entry("docs/results.md", r"existing_adapter_curve\.sh", "skip",
          "trains 2,100 steps (a conventional ControlNet and two students) and scores ten rows: about an hour"),
    Entry("docs/results.md", r"scripts/summarize_results\.py", "run", "reads the committed docs/results"),
    Entry("docs/results.md", r"recipes/|condistill(\.cli)? eval ", "parse",
          "reproductions: 300-4,200-step runs and 64-image evaluations of them"),
    # ---- docs/sdxl.md
    Entry("docs/sdxl.md", r"^\.venv/bin/accelerate launch recipes/edge\.py --preset sdxl-gpu", "run",
          "the sdxl-gpu preset on the tiny SDXL (its bf16, gradient checkpointing and guidance) for one step at "
          "its 64 px; accelerate launch of one process runs the script as python does, and the README's "
          "quickstart runs the launcher itself",
          replace=DATA, append=f"--resolution 64 {TINY_TRAIN}",
          check=_exported("runs/edge-sdxl", mixed_precision="bf16", gradient_checkpointing=True, guidance_max=4.0)),
    Entry("docs/sdxl.md", r"make_tiny_sdxl_base", "run", "builds the tiny SDXL the benchmark times",
          check=_wrote("runs/tiny-sdxl/model_index.json")),
    Entry("docs/sdxl.md", r"benchmarks/train_step\.py --base runs/tiny-sdxl", "run",
          "one CoDi step of batch 2 in this process (without --only the benchmark starts a process per kind of "
          "step and times ten)",
          replace=(("--batch-size 8 --steps 10", "--batch-size 2 --steps 1 --warmup 0 --only codi"),)),
    # ---- docs/teacher.md
    Entry("docs/teacher.md", r"tools/evaluate_teacher\.py", "run",
          "4 prompts instead of 256 (71 s on 2 threads); writes docs/teacher_eval.json and its grid into the "
          "working folder",
          replace=(("--num-prompts 256", "--num-prompts 4"), ("--threads 2", "--threads 1"),
                   ("--batch-size 64", "--batch-size 4")),
          check=_wrote("docs/teacher_eval.json")),
    # ---- docs/benchmarks/sd15.md
    Entry("docs/benchmarks/sd15.md", r"benchmarks/(sd_components|train_step|sampling_latency)\.py", "skip",
          "SD-1.5-size random components (about a billion parameters) timed at 512 px: minutes per command; the "
          "scripts themselves run on tiny bases in tests/test_benchmarks.py and above"),
    # ---- docs/mixed-precision.md
    Entry("docs/mixed-precision.md", r"benchmarks/bf16_vs_fp32\.py", "skip",
          "18 loss pairs and 6 timed samplings, minutes; its loss comparison (loss_pair) runs on the tiny test bases "
          "in tests/training/test_mixed_precision.py"),
    # ---- docs/benchmarks/gpu.md
    Entry("docs/benchmarks/gpu.md", r"gpu_check\.py --out docs/benchmarks/gpu ", "skip",
          "needs a CUDA GPU (full-size SD 1.5 and SDXL components, up to 8 minutes)"),
    Entry("docs/benchmarks/gpu.md", r"gpu_check\.py --tiny", "skip",
          "tests/test_gpu_check.py runs this tiny CPU run of every case"),
]

#: names a document's python blocks take as given (API overviews), built in the working folder
GIVEN: dict[str, Callable[[], dict]] = {}


def _given_conditions() -> dict:
    from condistill.world.scenes import generate_scene

    record = generate_scene(0, "heldout")
    return {"record": record, "pil_image": record.image}


def _given_judge() -> dict:
    import numpy as np

    from condistill.world.scenes import generate_scene

    held_out = [generate_scene(i, "heldout") for i in range(4)]
    return {"images": [r.image for r in held_out], "prompts": [r.caption for r in held_out],
            "real_images": [generate_scene(i, "train").image for i in range(4)],
            "input_depth": np.stack([r.depth for r in held_out])}


GIVEN.update({"docs/conditions.md": _given_conditions, "docs/judge.md": _given_judge})

#: prepared two-step runs a document's blocks use, by the names they use
NEEDS = {"docs/fast-decoder.md": ("runs/edge", "runs/fastdec-edge200"), "docs/comfyui.md": ("runs/edge",),
         "docs/existing-adapters.md": ("runs/edge", "runs/edge-baseline"),
         "docs/lcm-lora.md": ("runs/edge", "runs/edge-baseline")}
#: the one run trained for NEEDS (two steps on the embedded teacher); other names are copies of it
NEEDS_SOURCE = "runs/edge"


def _assert_in(text: str, output: str) -> None:
    assert text in output, output[-3000:]


# ---- reading the docs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    text: str
    section: str


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # continuations joined, comments dropped, words re-quoted


def blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", text, flags=re.S | re.M):
        found.append(Block(doc, text[:m.start()].count("\n") + 1, m.group(2), m.group(3), section_of(text, m.start())))
    return found


def commands(block: Block) -> list[Command]:
    out, pending, start = [], "", block.line + 1
    for i, line in enumerate(block.text.splitlines()):
        if not pending:
            start = block.line + 1 + i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            out.append(Command(block.doc, start, shlex.join(words)))
    return out


def all_commands() -> list[Command]:
    return [c for doc in DOCS for b in blocks(doc) if b.lang == "bash" for c in commands(b)]


def entry_of(command: Command) -> Entry:
    matches = [e for e in COMMANDS if e.doc == command.doc and re.search(e.match, command.text)]
    assert len(matches) == 1, (f"{command.doc}:{command.line}: `{command.text}` matches "
                               f"{len(matches)} entries of COMMANDS in tests/test_docs.py; give it exactly one "
                               f"(run, subprocess, parse or skip with the reason)")
    return matches[0]


def substituted(command: Command, entry: Entry) -> str:
    text = command.text
    for old, new in entry.replace:
        assert re.search(old, text), f"{command.doc}:{command.line}: the substitution {old!r} no longer applies to `{text}`"
        text = re.sub(old, new, text)
    return f"{text} {entry.append}".strip()


# ---- the fast checks: coverage and the parsed commands -------------------------------------


def test_every_block_is_run_or_listed():
    used = set()
    for doc in DOCS:
        for block in blocks(doc):
            first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
            if block.lang == "" and first.startswith(COMMAND_WORDS):
                pytest.fail(f"{doc}:{block.line}: an untagged fence holds a command; tag it ```bash (or ```text "
                            "for output)")
            if block.lang == "bash":
                for command in commands(block):
                    used.add(COMMANDS.index(entry_of(command)))
                    # entries' substitutions must apply
                    substituted(command, entry_of(command))
    stale = [f"{e.doc}: {e.match}" for i, e in enumerate(COMMANDS) if i not in used]
    assert not stale, f"entries of COMMANDS that match no documented command: {stale}"
    assert all(e.why for e in COMMANDS) and all(e.how in ("run", "subprocess", "parse", "skip") for e in COMMANDS)


def _script_and_args(words: list[str]) -> tuple[str, list[str]]:
    """``(script or subcommand, its arguments)`` of a command, launcher and environment stripped."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]
    prog = Path(words[0]).name
    if prog in ("accelerate", "torchrun", "python"):
        if prog == "python" and words[1:3] in (["-m", "condistill"], ["-m", "condistill.cli"]):
            return "condistill", words[3:]
        launcher = words[1:]
        for flag in ("--config_file",):  # files the launcher reads must exist
            if flag in launcher:
                assert (ROOT / launcher[launcher.index(flag) + 1]).is_file(), launcher
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[script], words[script + 1:]
    return prog, words[1:]


def _parse(text: str) -> None:
    from condistill.cli import _adapter_option_problem, config_from_args
    from condistill.evaluation.command import eval_parser as _eval_parser
    from condistill.evaluation.evaluate import parse_rows
    from condistill.presets import condition_names

    script, args = _script_and_args(shlex.split(text))
    if script == "condistill":
        command, args = args[0], args[1:]
        if command == "train":  # any registered condition, with or without a recipes/ script
            assert args[0] in condition_names(), f"no condition {args[0]}"
            cfg = config_from_args(args[0], args[1:])
            assert _adapter_option_problem(cfg) is None
            return
        elif command == "demo":
            from condistill.demo import parser

            parser().parse_args(args)
            return
        else:
            assert command == "eval", f"parse covers train, eval and demo commands, not `{text}`"
            ev = _eval_parser().parse_args(args)
            if ev.row:  # parse_rows wants the folders it names: empty stand-ins (the syntax is checked, not the runs)
                for row in ev.row:
                    model = row.split("=", 1)[1].split(":")[0]
                    if model not in ("teacher", "bicubic"):
                        Path(model).mkdir(parents=True, exist_ok=True)
                parse_rows(ev.row)
            return
    assert script.startswith("recipes/") and (ROOT / script).is_file(), f"no recipe {script}"
    cfg = config_from_args(Path(script).stem, args)
    assert _adapter_option_problem(cfg) is None


def test_parsed_commands_are_valid(tmp_path, monkeypatch, capsys):
    """Every ``parse`` command's options exist and its values are valid (condistill's own parsers)."""
    monkeypatch.chdir(tmp_path)
    parsed = 0
    for command in all_commands():
        if entry_of(command).how != "parse":
            continue
        try:
            _parse(command.text)
        except SystemExit as stop:
            pytest.fail(f"{command.doc}:{command.line}: `{command.text}` is refused: {capsys.readouterr().err.strip()} "
                        f"(exit {stop.code})")
        parsed += 1
    assert parsed >= 10


# ---- running ---------------------------------------------------------------------------------


def _run_script(script: str, args: list[str]) -> int:
    """``python SCRIPT ARGS`` in this process: the script as ``__main__``, its folder first on sys.path."""
    import torch

    saved = sys.argv, list(sys.path), torch.get_num_threads()
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        torch.set_num_threads(saved[2])


def _fresh_accelerate_state() -> None:
    """Forget this process's accelerate state: a run in another precision refuses an initialised one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run_in_process(text: str, monkeypatch) -> int:
    import torch

    from condistill.cli import main

    words = shlex.split(text)
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    prog, args = Path(words[0]).name, words[1:]
    if prog == "python" and args[0] == "-c":
        saved = list(sys.path)
        try:
            exec(compile(args[1], "python -c", "exec"), {})  # noqa: S102
        finally:
            sys.path[:] = saved
        return 0
    if prog == "accelerate":
        assert args[0] == "launch" and not {"--multi_gpu", "--num_processes", "--config_file"} & set(args), \
            "only a one-process launch runs in this process"
    script, args = _script_and_args(words)
    if script == "condistill":
        threads = torch.get_num_threads()
        try:
            return main(args)
        finally:
            torch.set_num_threads(threads)
    return _run_script(script, args)


def _subprocess(text: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    words = shlex.split(text)
    extra = {}
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        extra[name] = value
    if words[0].startswith(".venv/bin/"):
        words[0] = str(Path(sys.executable).parent / words[0][len(".venv/bin/"):])
    return subprocess.run(words, cwd=work, env={**env, **extra, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The prepared working folder and the hub variables (see the module docstring)."""
    from helpers import make_fake_hub_cache, make_tiny_base, make_tiny_sdxl_base
    from condistill.world.scenes import generate_scene

    work = tmp_path_factory.mktemp("docs")
    bases = tmp_path_factory.mktemp("bases")
    cache = bases / "hub"
    make_fake_hub_cache(cache, SD15, make_tiny_base(bases))
    make_fake_hub_cache(cache, SDXL, make_tiny_sdxl_base(bases))
    for name in LINKED:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).symlink_to(ROOT / name)
    (work / "docs" / "images").mkdir(parents=True)
    (work / "images").mkdir()
    for i in range(8):
        scene = generate_scene(i, "train")
        scene.image.save(work / "images" / f"{i}.png")
        (work / "images" / f"{i}.txt").write_text(scene.caption)
    generate_scene(0, "heldout").image.save(work / "scene.png")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return work, env


def _prepare(work: Path, names: tuple[str, ...]) -> None:
    import torch

    from condistill.training.loop import distill
    from helpers import tiny_run_config

    for name in names:
        if (work / name / "adapter" / "condistill_config.json").is_file():
            continue
        first = work / NEEDS_SOURCE
        if not (first / "adapter" / "condistill_config.json").is_file():
            threads = torch.get_num_threads()
            _fresh_accelerate_state()
            try:
                torch.set_num_threads(1)
                distill(tiny_run_config("embedded:tiny-teacher", first, batch_size=2))
            finally:
                torch.set_num_threads(threads)
                _fresh_accelerate_state()
        if work / name != first:
            shutil.copytree(first, work / name)


def _runnable(doc: str) -> bool:
    """Whether ``doc`` has a python block or a command to run here (an unlisted command counts: its test
    then fails naming it, as the coverage test does)."""
    for block in blocks(doc):
        if block.lang == "python" and not (doc == "README.md" and block.section in README_SECTIONS_RUN_ELSEWHERE):
            return True
        for command in commands(block) if block.lang == "bash" else ():
            matches = [e for e in COMMANDS if e.doc == doc and re.search(e.match, command.text)]
            if len(matches) != 1 or matches[0].how in ("run", "subprocess"):
                return True
    return False


@pytest.mark.parametrize("doc", [pytest.param(d, marks=pytest.mark.slow) for d in DOCS if _runnable(d)])
def test_documented_blocks_run(doc, workdir, monkeypatch):
    """The document's python blocks and run commands, in document order, in the working folder."""
    work, env = workdir
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(work)
    _prepare(work, NEEDS.get(doc, ()))
    namespace = GIVEN[doc]() if doc in GIVEN else {}
    ran = 0
    for block in blocks(doc):
        if block.lang == "python":
            if doc == "README.md" and block.section in README_SECTIONS_RUN_ELSEWHERE:
                continue  # tests/test_readme.py
            exec(compile(block.text, f"{doc}:{block.line}", "exec"), namespace)  # noqa: S102
            ran += 1
        if block.lang != "bash":
            continue
        for command in commands(block):
            entry = entry_of(command)
            if entry.how not in ("run", "subprocess"):
                continue
            text = substituted(command, entry)
            where = f"{doc}:{command.line}: `{text}`"
            if entry.how == "subprocess":
                proc = _subprocess(text, work, {**os.environ, **env})
                output = proc.stdout + proc.stderr
                assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{output[-4000:]}"
            else:
                out, err = io.StringIO(), io.StringIO()
                _fresh_accelerate_state()
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        code = _run_in_process(text, monkeypatch)
                finally:
                    _fresh_accelerate_state()
                output = out.getvalue() + err.getvalue()
                assert code == 0, f"{where} exited {code}:\n{output[-4000:]}"
            if entry.check is not None:
                entry.check(work, output)
            ran += 1
    assert ran, f"{doc}: nothing ran"
