"""Data-parallel training on 2 CPU processes over gloo (each test takes seconds to half a minute).

Most runs start their 2 processes by forking this test process (modules already imported, so a
run takes seconds), each with the environment a launcher gives its workers (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...) and ``ACCELERATE_USE_CPU=true``; the interrupted run is
started with ``torchrun`` and killed, launcher and workers, once its first checkpoint exists.

Float tolerance of "2 processes x batch B == 1 process x batch 2B": the two runs draw the same
items and the same randoms, but the mean gradient is summed in another order (each process's
mean over B, then gloo's average, instead of one mean over 2B) and convolutions over B and 2B
items may block their sums differently. AdamW turns those rounding differences into weight
differences of a fraction of one step (its first steps move a weight by about the learning rate
whatever the gradient's size; a gradient that nearly cancels can change sign). So the weights
must agree to ``atol = 0.1 * lr``; one process's half alone (what a step on gradients that were
not averaged would use) is checked to be more than ``lr`` away. ``pytest -s`` prints both
distances (measured: 0.0105 lr and 7.8 lr for controlnet, 0.0058 lr and 7.5 lr for t2i_adapter). The
killed and resumed 2-process run must be bit-identical to the uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condistill.config import DistillConfig
from condistill.training.checkpoint import list_checkpoints, read_state
from condistill.training.loop import distill
from condistill.training.run_folder import ResumeMismatchError

pytestmark = pytest.mark.slow

LR = 2e-4
ATOL = 0.1 * LR
RUN_TIMEOUT_S = 240


def _opts(base, out, **overrides) -> dict:
    """A tiny edge run: 4 steps, no warm-up (so the weights move from the first step), a checkpoint at 2."""
    opts = dict(condition="edge", adapter="controlnet", base=base, data="synthetic:train:24", output_dir=str(out),
                max_steps=4, batch_size=2, learning_rate=LR, lr_warmup_steps=0, checkpoint_every=2,
                keep_checkpoints=3, validate_every=0, log_every=1, seed=0, threads=1, report_to="none",
                ema_decay=0.9)  # every option the command line's preset sets, so a torchrun run is the same run
    opts.update(overrides)
    return opts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": "1"}


def _rank_main(rank: int, world: int, port: int, opts: dict) -> None:
    from accelerate.state import AcceleratorState, GradientState

    os.environ.update(_launcher_env(rank, world, port))
    # the forked process inherits this test process's single-process accelerate state: start afresh
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    distill(DistillConfig(**opts))  # its end_training() closes the process group


def run_processes(opts: dict, world: int = 2) -> Path:
    """``distill(opts)`` on ``world`` forked processes joined over gloo; raises what a process raised."""
    ctx = torch.multiprocessing.start_processes(_rank_main, args=(world, _free_port(), opts), nprocs=world,
                                                join=False, start_method="fork")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process run did not finish in {RUN_TIMEOUT_S} s")
    return Path(opts["output_dir"])


def _weights(out: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    return {name: load_file(str(ckpt / f"{name}.safetensors")) for name in ("online", "ema")}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def _assert_same(a: dict, b: dict, atol: float) -> float:
    worst = 0.0
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=atol, msg=lambda m: f"{name}:{k}: {m}")
            worst = max(worst, float((a[name][k] - b[name][k]).abs().max()))
    return worst


def _moved(out: Path) -> bool:
    """The online weights changed between the checkpoints of steps 2 and 4 (else equality would prove little)."""
    a, b = _weights(out, 2)["online"], _weights(out, 4)["online"]
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_process_run(tiny_base, tmp_path_factory):
    """The uninterrupted 2-process controlnet run (batch 2 per process, one DataLoader worker each)."""
    return run_processes(_opts(tiny_base, tmp_path_factory.mktemp("mp") / "two", num_workers=1))


def test_two_process_run_finishes_and_exports_once(two_process_run):
    out = two_process_run
    for name in ("adapter/condistill_config.json", "adapter/README.md", "loss.png", "config.json", "data_report.json"):
        assert (out / name).is_file(), name
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    state = read_state(out / "checkpoints" / "step-0000004")
    assert (state["processes"], state["global_batch"]) == (2, 4)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002", "step-0000004"]
    assert not (out / ".condistill.lock").exists()


@pytest.mark.parametrize("adapter, accumulation", [("controlnet", 1), ("t2i_adapter", 2)])
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(two_process_run, tiny_base, tmp_path, adapter,
                                                                   accumulation):
    if adapter == "controlnet":
        two = two_process_run
    else:  # the T2I-Adapter runs its trainable encoder outside the wrapped model's forward
        two = run_processes(_opts(tiny_base, tmp_path / "two", adapter=adapter,
                                  gradient_accumulation_steps=accumulation))
    one = distill(DistillConfig(**_opts(tiny_base, tmp_path / "one", adapter=adapter, batch_size=4,
                                        gradient_accumulation_steps=accumulation)))
    assert _moved(one)
    worst = _assert_same(_weights(two, 4), _weights(one, 4), ATOL)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)
    # what one process's half alone trains (gradients not averaged) is far outside the tolerance
    half = distill(DistillConfig(**_opts(tiny_base, tmp_path / "half", adapter=adapter,
                                         gradient_accumulation_steps=accumulation)))
    apart = max(float((a - _weights(one, 4)["online"][k]).abs().max()) for k, a in _weights(half, 4)["online"].items())
    print(f"{adapter}: 2 x batch 2 vs 1 x batch 4: {worst / LR:.3g} lr; 1 x batch 2 vs 1 x batch 4: {apart / LR:.3g} lr")
    assert apart > 10 * ATOL


def _fake_score_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(out / "checkpoints" / f"step-{step:07d}" / "training_state.pt", weights_only=True)
    return state["extra"]["fake_score"]["weights"]


def test_distribution_matching_on_two_processes_equals_one_process_of_the_global_batch(tiny_base, tmp_path):
    """The student (through DDP) and the fake-score LoRA (its own gradient averaging) both train on 2B items."""
    opts = dict(loss="codi+dmd", dmd_fake_rank=4)
    two = run_processes(_opts(tiny_base, tmp_path / "two", **opts))
    one = distill(DistillConfig(**_opts(tiny_base, tmp_path / "one", batch_size=4, **opts)))
    assert _moved(one)
    _assert_same(_weights(two, 4), _weights(one, 4), ATOL)
    fake_two, fake_one = _fake_score_weights(two, 4), _fake_score_weights(one, 4)
    assert any(bool(v.abs().sum() > 0) for k, v in fake_one.items() if "lora_B" in k)  # it trained
    _assert_same({"fake": fake_two}, {"fake": fake_one}, ATOL)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4)


def test_resume_with_one_process_and_the_same_global_batch(two_process_run, tiny_base, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(two_process_run, part)
    checkpoint = str(part / "checkpoints" / "step-0000002")
    with pytest.raises(ResumeMismatchError, match=r"2 process\(es\) x batch 2 = a global batch of 4.*--batch-size 4"):
        distill(DistillConfig(**_opts(tiny_base, part, resume=checkpoint, overwrite=True)))
    distill(DistillConfig(**_opts(tiny_base, part, resume=checkpoint, batch_size=4, overwrite=True)))
    _assert_same(_weights(part, 4), _weights(two_process_run, 4), ATOL)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_killed_run_resumed_on_two_processes_equals_the_uninterrupted_one(two_process_run, tiny_base, tmp_path):
    out = tmp_path / "killed"
    opts = _opts(tiny_base, out)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if k != "condition"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "condistill", "train", "edge", *flags], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not list_checkpoints(out):
            if launcher.poll() is not None:
                pytest.fail(f"the torchrun run stopped early: {launcher.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {RUN_TIMEOUT_S} s")
            time.sleep(0.05)
        assert launcher.poll() is None  # killed mid-run, not after it finished
    finally:
        for pid in [launcher.pid, *_descendants(launcher.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
        launcher.stderr.close()
    assert not (out / "adapter").exists()
    # the command line ran the fixture's configuration (without DataLoader workers, which change nothing)
    differ = {k for k, v in json.loads((out / "config.json").read_text()).items()
              if json.loads((two_process_run / "config.json").read_text())[k] != v}
    assert differ == {"output_dir", "num_workers"}
    assert (out / ".condistill.lock").exists()  # left by the killed main process; the resumed run clears it

    run_processes(_opts(tiny_base, out, resume="latest"))
    _assert_same(_weights(out, 4), _weights(two_process_run, 4), atol=0)
    assert _losses(out) == _losses(two_process_run)
