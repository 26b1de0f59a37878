"""condistill export: kohya LoRA and single-file ControlNet files that other tools (and diffusers) read back."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file

from helpers import perturb_, torch_single_thread  # noqa: F401

from condistill.adapters import build_student
from condistill.adapters.lora import LORA_WEIGHT_NAME
from condistill.adapters.save_load import read_adapter_config, save_adapter
from condistill.cli import main
from condistill.frozen import load_base
from condistill.publish.formats import export, t2i_single_file_name


def _save(student, base, out, **changes):
    options = dict(condition_name="edge", condition_config={}, recommended_steps=4)
    options.update(changes)
    return save_adapter(
        student, out, base_name_or_path=str(base.name_or_path), base_fingerprint=base.fingerprint(),
        num_grid=50, prediction_type=base.prediction_type, resolution=base.resolution,
        noise_schedule=base.noise_schedule_config(), **options,
    )


@pytest.fixture(scope="module")
def lora_run(base_path, tmp_path_factory):
    base = load_base(base_path)
    student = build_student("lora", base, 3, rank=2, lora_alpha=3, targets="all")
    perturb_(student, seed=3, scale=0.2)
    run = tmp_path_factory.mktemp("lora_run")
    _save(student, base, run / "adapter")
    return run


@pytest.fixture(scope="module")
def controlnet_run(base_path, tmp_path_factory):
    base = load_base(base_path)
    # SD's condition embedding (4 widths, VAE factor 8): the layout A1111/ComfyUI/diffusers assume
    student = build_student("controlnet", base.unet, 3, vae_scale_factor=8)
    perturb_(student, seed=5)
    run = tmp_path_factory.mktemp("cn_run")
    _save(student, base, run / "adapter")
    return run


def _unet_delta(base_path, load):
    """UNet output with the LoRA loaded by ``load(pipe)`` minus the plain UNet's, on a fixed input."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 16, 32, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        off = pipe.unet(z, t, ehs).sample
        load(pipe)
        on = pipe.unet(z, t, ehs).sample
    return on - off


def test_kohya_lora_matches_diffusers_format(lora_run, base_path, tmp_path):
    out = tmp_path / "student.safetensors"
    result = export(lora_run, "kohya", out, dtype="float32")
    keys = set(load_file(str(out)))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert "lora_unet_mid_block_resnets_0_conv_shortcut.lora_down.weight" not in keys  # no shortcut there
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in keys)
    assert all(k.startswith("lora_unet_") for k in keys)
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor(f"{name}.alpha").item() == 3.0
        assert f.metadata()["ss_network_dim"] == "2"
        assert "lora_adapter_metadata" not in f.metadata()

    ours = _unet_delta(base_path, lambda p: p.load_lora_weights(lora_run / "adapter", weight_name=LORA_WEIGHT_NAME))
    kohya = _unet_delta(base_path, lambda p: p.load_lora_weights(str(out)))
    rel = ((kohya - ours).norm() / ours.norm()).item()
    print(f"kohya vs diffusers-format LoRA: relative difference {rel:.2e}, |delta| {ours.norm():.3f}")
    assert ours.abs().max() > 1e-2  # the LoRA changes the output
    assert rel < 1e-3

    from diffusers import T2IAdapter

    adapter_dir = tmp_path / "student_condition_adapter"
    assert result.files == [out, adapter_dir]
    adapter = T2IAdapter.from_pretrained(adapter_dir)
    saved = load_file(str(lora_run / "adapter" / "t2i_adapter" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in adapter.state_dict().items())
    assert "load_lora_weights" in result.instructions and str(adapter_dir) in result.instructions
    original = load_file(str(adapter_dir / t2i_single_file_name(out)))  # the same adapter in the webui loaders' layout
    assert len(original) == len(saved) and all(not k.startswith("adapter.") for k in original)
    assert sorted(t.sum().item() for t in original.values()) == sorted(t.sum().item() for t in saved.values())
    assert "A1111/ComfyUI cannot use" in result.notes[0]  # the tiny base's VAE factor is not SD's 8


def test_exported_files_are_float16_by_default(lora_run, controlnet_run, tmp_path, capsys):
    """fp16 by default, as A1111/ComfyUI users download these files; bf16 and fp32 by name or short alias."""
    export(lora_run, "kohya", tmp_path / "l.safetensors")
    export(lora_run, "kohya", tmp_path / "l32.safetensors", adapter_out=tmp_path / "a32", dtype="fp32")
    lora16, lora32 = load_file(str(tmp_path / "l.safetensors")), load_file(str(tmp_path / "l32.safetensors"))
    assert {t.dtype for t in lora16.values()} == {torch.float16} and set(lora16) == set(lora32)
    assert {t.dtype for t in lora32.values()} == {torch.float32}
    assert all(torch.equal(lora16[k], lora32[k].half()) for k in lora32)
    adapter16 = load_file(str(tmp_path / "l_condition_adapter" / "l_t2i_adapter.safetensors"))
    assert {t.dtype for t in adapter16.values()} == {torch.float16}
    saved = load_file(str(tmp_path / "l_condition_adapter" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the diffusers folder is copied as it is
    assert main(["export", str(controlnet_run), "--format", "single-file", "--out", str(tmp_path / "c.safetensors"),
                 "--dtype", "BF16"]) == 0  # any case, as the Python API takes it
    assert {t.dtype for t in load_file(str(tmp_path / "c.safetensors")).values()} == {torch.bfloat16}
    with pytest.raises(SystemExit):
        main(["export", str(controlnet_run), "--format", "single-file", "--out", str(tmp_path / "d.safetensors"),
              "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown export dtype 'half'; choose one of \['bf16', 'bfloat16'"):
        export(controlnet_run, "single-file", tmp_path / "e.safetensors", dtype="half")
    assert not (tmp_path / "e.safetensors").exists()


def test_single_file_controlnet_round_trip(controlnet_run, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "cn.safetensors"
    result = export(controlnet_run, "single-file", out, dtype="float32")
    assert not result.notes
    keys = set(load_file(str(out)))
    assert all(k.startswith("control_model.") for k in keys)
    for part in ("input_blocks.", "zero_convs.", "input_hint_block.14.", "middle_block.1.", "middle_block_out.0."):
        assert any(k.startswith("control_model." + part) for k in keys), part

    folder = controlnet_run / "adapter" / "controlnet"
    saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    loaded = ControlNetModel.from_single_file(str(out), config=str(folder), local_files_only=True).state_dict()
    assert set(loaded) == set(saved) and len(keys) == len(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_non_sd_embedding_is_noted(base_path, tmp_path):
    base = load_base(base_path)
    _save(build_student("controlnet", base, 3), base, tmp_path / "run")
    result = export(tmp_path / "run", "single-file", tmp_path / "cn.safetensors")
    assert "input_hint_block.6" in result.notes[0]


def test_errors(lora_run, controlnet_run, tmp_path):
    with pytest.raises(ValueError, match=r"exports 'controlnet' and 't2i_adapter' adapters only.*--format kohya for "
                                         r"kind 'lora'"):
        export(lora_run, "single-file", tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="holds a 'controlnet' adapter; --format kohya"):
        export(controlnet_run, "kohya", tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="unknown format 'ckpt'; supported: --format kohya"):
        export(lora_run, "ckpt", tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError, match="no run or adapter folder"):
        export(tmp_path / "nope", "kohya", tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError, match="No condistill_config.json"):
        export(tmp_path, "kohya", tmp_path / "a.safetensors")
    (tmp_path / "taken.safetensors").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(controlnet_run, "single-file", tmp_path / "taken.safetensors")
    export(controlnet_run, "single-file", tmp_path / "taken.safetensors", overwrite=True)
    assert len(load_file(str(tmp_path / "taken.safetensors"))) > 10
    (tmp_path / "x_condition_adapter").mkdir()
    with pytest.raises(FileExistsError, match="--adapter-out"):
        export(lora_run, "kohya", tmp_path / "x.safetensors")


def test_cli(lora_run, tmp_path, capsys):
    out, adapter_out = tmp_path / "l.safetensors", tmp_path / "ad"
    argv = ["export", str(lora_run), "--format", "kohya", "--out", str(out), "--adapter-out", str(adapter_out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "load_lora_weights" in printed.out and (adapter_out / "config.json").is_file()
    assert main(argv) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["export", str(tmp_path / "missing"), "--format", "kohya", "--out", str(out)]) == 1
    assert "condistill export: error: no run or adapter folder" in capsys.readouterr().err


def _printed_code(printed: str) -> str:
    """The code in export's printed instructions: its lines indented by 4, unindented (blank lines kept)."""
    lines = printed.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("    "))
    code = []
    for line in lines[first:]:
        if line and not line.startswith("    "):
            break
        code.append(line[4:])
    return "\n".join(code)


def test_printed_kohya_instructions_run(lora_run, base_path, tmp_path):
    """The diffusers code the kohya export prints loads both files into a working pipeline that samples."""
    from condistill import CoDiScheduler

    result = export(lora_run, "kohya", tmp_path / "s.safetensors")
    code = _printed_code(result.instructions)
    assert f"BASE = {json.dumps(str(base_path))}" in code  # the local base as the run recorded it
    scope = {"control": torch.rand(1, 3, 16, 16)}
    exec(code, scope)  # noqa: S102
    pipe = scope["pipe"]
    assert isinstance(pipe.scheduler, CoDiScheduler) and pipe.unet.peft_config
    assert scope["image"].size == (16, 16)
    assert "A1111/ComfyUI cannot use" in result.notes[0] and "A1111/ComfyUI: put" not in result.instructions


def _tiny_base_vae8(folder):
    """A tiny SD-layout base whose VAE downsamples by 8, as SD's does (64 px images, 8 x 8 latents): its
    ControlNets get SD's 4-width condition embedding, the layout of the single-file loaders."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from helpers import make_tiny_components

    components = make_tiny_components(folder)
    torch.manual_seed(1)
    components["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=16, sample_size=64)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "tiny_base_vae8")
    return folder / "tiny_base_vae8"


@pytest.mark.slow
@pytest.mark.parametrize("base_kind", ["embedded", "tiny base", "tiny base, VAE factor 8"])
def test_printed_single_file_instructions_run(base_kind, base_path, tmp_path, monkeypatch, capsys):
    """``condistill export RUN --format single-file`` prints only code that works for the run, and it runs.

    diffusers' ``from_single_file`` reads SD's hint block only (conv_out at ``input_hint_block.14``): on the
    embedded teacher (VAE factor 4) and the tiny base (factor 2) it would leave tensors on the meta device, so
    the export prints the run's diffusers folder instead, and no A1111/ComfyUI line. On a base with SD's
    factor 8 it prints ``from_single_file`` of the file just written, and the loaded weights are the run's.
    """
    from diffusers import ControlNetModel

    from condistill.training.loop import distill
    from helpers import tiny_run_config

    base = {"embedded": "embedded:tiny-teacher", "tiny base": str(base_path)}.get(base_kind) or \
        str(_tiny_base_vae8(tmp_path))
    run = distill(tiny_run_config(base, tmp_path / "run", batch_size=2))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "run", "--format", "single-file", "--out", "cn.safetensors", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr()
    sd_layout = base_kind.endswith("factor 8")
    assert ("from_single_file('cn.safetensors'" in printed.out) == sd_layout
    assert ("A1111/ComfyUI" in printed.out) == (base_kind != "embedded" and sd_layout)
    assert ("diffusers' from_single_file will not load it either" in printed.err) == (not sd_layout)
    if base_kind == "embedded":
        assert 'BASE = resolve_pretrained_dir("embedded:tiny-teacher")' in printed.out

    from condistill.pipeline import load_adapter

    control = load_adapter(run).condistill_condition.control_image(Image.new("RGB", (64, 64), "white"))
    scope = {"control": control}
    exec(_printed_code(printed.out), scope)  # noqa: S102
    config = read_adapter_config(run)  # the export in the run folder's adapter/
    assert scope["image"].size == (config["resolution"], config["resolution"])
    saved = load_file(str(Path(config["_folder"]) / "controlnet" / "diffusion_pytorch_model.safetensors"))
    loaded = scope["controlnet"].state_dict()
    assert isinstance(scope["controlnet"], ControlNetModel) and set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


# ---------------------------------------------------------------------- atomic writes
def _no_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


def _interrupt_at(monkeypatch, name: str):
    """Make the rename onto a path called ``name`` fail as a kill there would leave things."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_rerun_completes_an_interrupted_kohya_export_without_overwrite(lora_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "student.safetensors"
    _interrupt_at(monkeypatch, out.name)  # the adapter folder is in place, the LoRA file not yet
    with pytest.raises(KeyboardInterrupt):
        export(lora_run, "kohya", out)
    monkeypatch.undo()
    adapter = tmp_path / "student_condition_adapter"
    assert not out.exists() and (adapter / "config.json").is_file() and _no_leftovers(tmp_path) == []
    record = json.loads((adapter / "condistill_export.json").read_text())
    assert record["lora_file"] == out.name and len(record["source_sha256"]) == 64
    argv = ["export", str(lora_run), "--format", "kohya", "--out", str(out)]
    assert main(argv) == 0  # no --overwrite: what exists is this run's unfinished export
    assert f"replacing {adapter}, left by an interrupted export of this run" in capsys.readouterr().err
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["condistill_source_sha256"] == record["source_sha256"]
    assert main(argv) == 1  # a complete export is kept
    assert capsys.readouterr().err == f"condistill export: error: --out {out} already exists; pass --overwrite to " \
                                      "replace it.\n"


def test_an_interrupted_folder_swap_keeps_the_old_export_and_its_leftovers_go(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "student.safetensors"
    export(lora_run, "kohya", out)
    before = out.read_bytes()
    _interrupt_at(monkeypatch, "student_condition_adapter")  # the staged folder is never swapped in
    with pytest.raises(KeyboardInterrupt):
        export(lora_run, "kohya", out, overwrite=True)
    monkeypatch.undo()
    assert out.read_bytes() == before and _no_leftovers(tmp_path) == [".old-student_condition_adapter"]
    lines = []
    with pytest.raises(FileExistsError, match="--out"):  # the previous export, put back whole, is kept
        export(lora_run, "kohya", out, log=lines.append)
    assert lines[0].startswith("restoring ") and _no_leftovers(tmp_path) == []
    assert (tmp_path / "student_condition_adapter" / "config.json").is_file()
    # what a kill (no clean-up) leaves: staged copies of processes that are gone, and an old release's name
    (tmp_path / ".tmp-student.safetensors-999999999").write_bytes(b"x" * 100)
    (tmp_path / ".tmp-student.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".tmp-student_condition_adapter-999999999").mkdir()
    (tmp_path / ".tmp-student_condition_adapter").mkdir()
    lines = []
    export(lora_run, "kohya", out, overwrite=True, log=lines.append)
    assert _no_leftovers(tmp_path) == [] and len(lines) == 4


def test_another_runs_output_is_not_taken_for_a_leftover(lora_run, tmp_path):
    out = tmp_path / "student.safetensors"
    adapter = tmp_path / "student_condition_adapter"
    adapter.mkdir()
    (adapter / "condistill_export.json").write_text(json.dumps({"lora_file": out.name, "source_sha256": "0" * 64}))
    with pytest.raises(FileExistsError, match="--adapter-out .* already exists; pass --overwrite"):
        export(lora_run, "kohya", out)
    out.write_bytes(b"not ours")  # both halves there: never a leftover
    with pytest.raises(FileExistsError, match="--out"):
        export(lora_run, "kohya", out)


@pytest.mark.parametrize("kind", ["kohya", "single-file"])
def test_outputs_are_0644_under_umask_022_and_nothing_is_left_behind(kind, lora_run, controlnet_run, tmp_path):
    run = lora_run if kind == "kohya" else controlnet_run
    out = tmp_path / "o.safetensors"
    old = os.umask(0o022)
    try:
        result = export(run, kind, out)
        export(run, kind, out, overwrite=True)  # the second write replaces the first, leaving no .tmp-* behind
    finally:
        os.umask(old)
    files = [p for f in result.files for p in ([f] if f.is_file() else [f, *f.rglob("*")])]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert all(mode == ("0o755" if p.is_dir() else "0o644") for p, mode in zip(files, modes.values())), modes
    assert _no_leftovers(tmp_path) == []


def test_out_that_is_a_folder_is_refused_even_with_overwrite(controlnet_run, tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export(controlnet_run, "single-file", tmp_path / "dir.safetensors", overwrite=True)
    assert _no_leftovers(tmp_path) == []


def test_a_damaged_export_is_not_converted(run_copy, tmp_path):
    from condistill.publish.formats import export

    weights = run_copy / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed since export"):
        export(run_copy, "single-file", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------- T2I-Adapter files and ComfyUI workflows
def test_t2i_adapter_student_exports_one_original_layout_file(base_path, tmp_path):
    base = load_base(base_path)
    student = build_student("t2i_adapter", base.unet, 3, vae_scale_factor=8)
    perturb_(student, seed=7)
    _save(student, base, tmp_path / "run" / "adapter")
    out = tmp_path / "t2i.safetensors"
    result = export(tmp_path / "run", "single-file", out, dtype="fp32")
    saved = load_file(str(tmp_path / "run" / "adapter" / "t2i_adapter" / "diffusion_pytorch_model.safetensors"))
    written = load_file(str(out))
    assert "conv_in.weight" in written and not any(k.startswith("adapter.") for k in written)
    assert sorted(t.sum().item() for t in written.values()) == sorted(t.sum().item() for t in saved.values())
    # the tiny base's two widths are not the [c, 2c, 4c, 4c] the webui loaders build: said, and no workflow
    assert result.files == [out] and "[c, 2c, 4c, 4c]" in result.notes[0]
    assert "T2IAdapter.from_pretrained" in result.instructions


def test_single_file_export_writes_a_comfyui_workflow_and_keeps_a_foreign_file(controlnet_run, tmp_path):
    out = tmp_path / "cn.safetensors"
    result = export(controlnet_run, "single-file", out)
    flow = tmp_path / "cn_comfyui.json"
    assert result.files == [out, flow] and "ComfyUI workflow" in result.instructions
    nodes = json.loads(flow.read_text())
    loader = next(n for n in nodes.values() if n["class_type"] == "ControlNetLoader")
    assert loader["inputs"]["control_net_name"] == "cn.safetensors"
    export(controlnet_run, "single-file", out, overwrite=True)  # its own workflow is replaced
    assert json.loads(flow.read_text()) == nodes
    mine = tmp_path / "b_comfyui.json"
    mine.write_text('{"my": "edits"}')
    result = export(controlnet_run, "single-file", tmp_path / "b.safetensors")
    assert mine.read_text() == '{"my": "edits"}' and result.files == [tmp_path / "b.safetensors"]
    assert f"kept {mine}, which is not a workflow condistill wrote" in result.notes[0]


# ---------------------------------------------------------------------- what a careless command must not do
def test_outputs_never_replace_the_run_or_foreign_folders(lora_run, controlnet_run, tmp_path):
    """--overwrite replaces only earlier exports: never files in the run, a folder of other files, or the run."""
    mine = tmp_path / "models" / "controlnet"
    mine.mkdir(parents=True)
    (mine / "other_controlnet.safetensors").write_bytes(b"someone's model")
    with pytest.raises(FileExistsError, match="holds files condistill did not write .other_controlnet.safetensors."):
        export(lora_run, "kohya", tmp_path / "s.safetensors", adapter_out=mine, overwrite=True)
    assert (mine / "other_controlnet.safetensors").read_bytes() == b"someone's model"
    weights = controlnet_run / "adapter" / "controlnet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(ValueError, match="is inside the run"):
        export(controlnet_run, "single-file", weights, overwrite=True)
    assert weights.read_bytes() == before
    with pytest.raises(ValueError, match="is inside the run"):
        export(lora_run, "kohya", tmp_path / "x.safetensors", adapter_out=lora_run, overwrite=True)
    with pytest.raises(ValueError, match="holds the run"):
        export(lora_run, "kohya", tmp_path / "x.safetensors", adapter_out=lora_run.parent, overwrite=True)
    with pytest.raises(ValueError, match="is inside --adapter-out"):
        export(lora_run, "kohya", tmp_path / "kk" / "k.safetensors", adapter_out=tmp_path / "kk")
    with pytest.raises(ValueError, match="is inside --adapter-out"):
        export(lora_run, "kohya", tmp_path / "k2.safetensors", adapter_out=tmp_path / "k2.safetensors")
    assert not (tmp_path / "kk").exists() and not (tmp_path / "x.safetensors").exists()
    export(lora_run, "kohya", tmp_path / "s.safetensors")  # an earlier export's folder is replaced as before
    export(lora_run, "kohya", tmp_path / "s.safetensors", overwrite=True)


def test_float16_overflow_is_refused_not_written_as_inf(base_path, tmp_path):
    base = load_base(base_path)
    student = build_student("controlnet", base.unet, 3, vae_scale_factor=8)
    with torch.no_grad():
        student.controlnet.conv_in.weight[0, 0, 0, 0] = 1e5
    _save(student, base, tmp_path / "run")
    with pytest.raises(ValueError, match=r"input_blocks.0.0.weight holds values up to 1e\+05, beyond torch.float16's range"):
        export(tmp_path / "run", "single-file", tmp_path / "cn.safetensors")
    assert not (tmp_path / "cn.safetensors").exists()
    export(tmp_path / "run", "single-file", tmp_path / "cn.safetensors", dtype="bf16")


def test_a_one_step_student_from_the_input_is_told_how_to_sample_as_trained(base_path, tmp_path):
    """Its workflow starts KSampler at the trained timestep from the encoded input.png; the printed stock
    pipeline would take the step from noise, so the instructions say to use load_adapter, and A1111 cannot."""
    base = load_base(base_path)
    student = build_student("controlnet", base.unet, 3, vae_scale_factor=8)
    _save(student, base, tmp_path / "run", condition_name="sr", recommended_steps=1,
          one_step_start={"timestep": 499, "from": "input"})
    result = export(tmp_path / "run", "single-file", tmp_path / "sr.safetensors")
    text = result.instructions
    assert "as input.png" in text and "A1111 cannot start the step where it was trained" in text
    assert "one step was trained from the input noised to t = 499" in text and "condistill.load_adapter(" in text
    nodes = json.loads((tmp_path / "sr_comfyui.json").read_text())
    sampler = next(n["inputs"] for n in nodes.values() if n["class_type"] == "KSampler")
    assert sampler["denoise"] == 0.5 and nodes[sampler["latent_image"][0]]["class_type"] == "VAEEncode"


def test_the_kohya_workflow_loads_the_adapter_file_the_export_wrote(lora_run, tmp_path, monkeypatch):
    """(The tiny base's adapter does not fit the webui loaders; pretend it does to reach the workflow.)"""
    import condistill.publish.formats as formats

    monkeypatch.setattr(formats, "loader_problem", lambda config: None)
    out = tmp_path / "student.safetensors"
    result = export(lora_run, "kohya", out)
    nodes = json.loads((tmp_path / "student_comfyui.json").read_text())
    names = {n["class_type"]: n["inputs"] for n in nodes.values()}
    assert names["LoraLoaderModelOnly"]["lora_name"] == out.name
    assert (tmp_path / "student_condition_adapter" / names["ControlNetLoader"]["control_net_name"]).is_file()
    assert "student_t2i_adapter.safetensors in models/controlnet" in result.instructions


def test_a_controlnet_with_other_hint_widths_gets_no_webui_advice(base_path, tmp_path):
    base = load_base(base_path)
    student = build_student("controlnet", base.unet, 3, vae_scale_factor=8,
                            conditioning_embedding_out_channels=(32, 64, 128, 256))
    _save(student, base, tmp_path / "run")
    result = export(tmp_path / "run", "single-file", tmp_path / "w.safetensors")
    assert "widths [32, 64, 128, 256], not SD's [16, 32, 96, 256]" in result.notes[0]
    assert result.files == [tmp_path / "w.safetensors"] and "A1111/ComfyUI: put" not in result.instructions
    assert "from_single_file(" in result.instructions  # diffusers reads it: four widths, taken from the config


def test_a_tilde_out_is_checked_and_written_in_the_home_folder(controlnet_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(controlnet_run), "--format", "single-file", "--out=~/t.safetensors"]) == 0
    assert (tmp_path / "t.safetensors").is_file() and not (tmp_path / "~").exists()
