"""End-to-end checks of the training loop on a tiny randomly initialised base (seconds each)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from condistill.config import ConfigError, DistillConfig
from condistill.training.loop import StepBatchSampler, distill
from helpers import tiny_run_config as _cfg


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "loss.jsonl").read_text().splitlines()]


# Recorded from `distill` on the tiny base of tests/helpers.py (seed 0, 2 steps, batch 4).
RECORDED_LOSSES = {"codi": [93.07316589355469, 3.410846471786499], "diffusion": [1.1904277801513672, 1.1933338642120361]}


@pytest.mark.parametrize("loss", ["codi", "diffusion"])
def test_two_step_run_matches_recorded_losses(tiny_base, tmp_path, loss):
    out = distill(_cfg(tiny_base, tmp_path / "run", loss=loss))
    assert _losses(out) == pytest.approx(RECORDED_LOSSES[loss], rel=1e-3)
    for name in ("adapter/condistill_config.json", "adapter/README.md", "loss.png", "config.json"):
        assert (out / name).is_file()
    assert not (out / "condistill_config.json").exists()  # the export lives in adapter/ only
    assert list((out / "validation").glob("step-*.png"))


def test_resume_matches_uninterrupted_run(tiny_base, tmp_path):
    full = distill(_cfg(tiny_base, tmp_path / "full", max_steps=4))
    part = tmp_path / "part"
    distill(_cfg(tiny_base, part, max_steps=2))
    distill(_cfg(tiny_base, part, max_steps=4, resume="latest"))
    for name in ("online.safetensors", "ema.safetensors"):
        a = load_file(str(full / "checkpoints/step-0000004" / name))
        b = load_file(str(part / "checkpoints/step-0000004" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert _losses(part)[-2:] == _losses(full)[-2:]


def test_online_and_ema_are_saved_apart_and_differ(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run", max_steps=3))
    ckpt = out / "checkpoints" / "step-0000003"
    online, ema = load_file(str(ckpt / "online.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert online.keys() == ema.keys()
    assert any(not torch.equal(online[k], ema[k]) for k in online)


@pytest.mark.parametrize("stochastic, sampler", [(True, "codi-stochastic"), (False, "codi")])
def test_exported_sampler_follows_stochastic_sampling(tiny_base, tmp_path, stochastic, sampler):
    from condistill.adapters.save_load import adapter_sampler

    out = distill(_cfg(tiny_base, tmp_path / "run", max_steps=1, stochastic_sampling=stochastic))
    assert adapter_sampler(out) == sampler
    assert json.loads((out / "adapter" / "scheduler" / "scheduler_config.json").read_text())["stochastic"] is stochastic


def test_existing_run_is_not_overwritten(tiny_base, tmp_path):
    out = distill(_cfg(tiny_base, tmp_path / "run"))
    before = (out / "loss.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--resume latest"):
        distill(_cfg(tiny_base, out))
    assert (out / "loss.jsonl").read_text() == before


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        DistillConfig(condition="edges", adapter="controlnett", max_steps=0, distance="l1", guidance_min=3, guidance_max=2)
    text = str(err.value)
    for part in ("condition='edges'", "adapter='controlnett'", "max_steps=0", "distance='l1'", "guidance range"):
        assert part in text


def test_batches_depend_only_on_the_step():
    a = StepBatchSampler(10, 4, seed=1, start=0, stop=6)
    b = StepBatchSampler(10, 4, seed=1, start=3, stop=6)
    assert list(a)[3:] == list(b)
    epoch0 = sum((a.batch(m) for m in range(5)), [])[:10]
    assert sorted(epoch0) == list(range(10))


@pytest.mark.parametrize("branches, guided_calls", [("all", 3), ("ode", 1)])
def test_guidance_branches_choose_which_calls_are_guided(tiny_base, branches, guided_calls):
    """CFG-aware distillation doubles every model call; guidance_branches="ode" only the ODE solver's."""
    from condistill.frozen import load_base
    from condistill.conditions import get_condition
    from condistill.data.dataset import ConditionDataset, collate
    from condistill.data.sources import open_source
    from condistill.adapters import build_student
    from condistill.training.ema import EMA
    from condistill.training.objective import build_objective

    cfg = _cfg(tiny_base, "unused", guidance_min=2.0, guidance_max=3.0, guidance_branches=branches)
    base = load_base(tiny_base)
    condition = get_condition("edge")
    student = build_student("controlnet", base, condition.channels)
    ema = EMA(student.trainable_named_parameters())
    dataset = ConditionDataset(open_source("synthetic:train:4", resolution=base.resolution), condition, base.resolution)
    batch = collate([dataset[i] for i in range(4)])
    sizes = []
    forward = student.forward

    def spy(z, *args, **kwargs):
        sizes.append(z.shape[0])
        return forward(z, *args, **kwargs)

    student.forward = spy
    loss, _ = build_objective(cfg, student, student, ema, base)(batch, 0)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert len(sizes) == 3 and sizes.count(8) == guided_calls and sizes.count(4) == 3 - guided_calls
    # the ODE solver runs first and is guided in both modes
    assert sizes[0] == 8
    expected = 1.0 if branches == "ode" else 2.5
    assert cfg.sampling_guidance == expected


def test_guidance_branches_is_validated():
    with pytest.raises(ConfigError, match="guidance_branches='online'"):
        DistillConfig(guidance_branches="online")


def test_late_ema_decay_equals_resuming_with_a_slower_ema(tiny_base, tmp_path):
    """ema_decay_late from step K is the same run as stopping at K and resuming with --ema-decay late."""
    one = distill(_cfg(tiny_base, tmp_path / "one", max_steps=4, ema_decay=0.5, ema_decay_late=0.9, ema_late_from=2))
    two = tmp_path / "two"
    distill(_cfg(tiny_base, two, max_steps=2, ema_decay=0.5))
    distill(_cfg(tiny_base, two, max_steps=4, ema_decay=0.9, resume="latest"))
    plain = distill(_cfg(tiny_base, tmp_path / "plain", max_steps=4, ema_decay=0.5))
    a = load_file(str(one / "checkpoints/step-0000004/ema.safetensors"))
    b = load_file(str(two / "checkpoints/step-0000004/ema.safetensors"))
    c = load_file(str(plain / "checkpoints/step-0000004/ema.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_ema_decay_at_and_its_validation():
    cfg = DistillConfig(max_steps=10, ema_decay=0.9, ema_decay_late=0.99, ema_late_from=6)
    assert [cfg.ema_decay_at(s) for s in (0, 5, 6, 9)] == [0.9, 0.9, 0.99, 0.99]
    assert DistillConfig(max_steps=10, ema_decay=0.9).ema_decay_at(9) == 0.9
    assert DistillConfig(max_steps=10, ema_decay=0.9, ema_decay_late=0.99, ema_late_from=10).ema_decay_at(9) == 0.9
    with pytest.raises(ConfigError, match="ema_late_from=0"):
        DistillConfig(max_steps=10, ema_decay_late=0.99, ema_late_from=0)
    with pytest.raises(ConfigError, match="ema_decay_late=1.0"):
        DistillConfig(ema_decay_late=1.0, ema_late_from=1)


def test_optimizer_choice_is_validated():
    import importlib.util

    with pytest.raises(ConfigError, match="optimizer='lion'"):
        DistillConfig(optimizer="lion")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="optimizer='adamw8bit': the bitsandbytes package is not installed"):
            DistillConfig(optimizer="adamw8bit")


def test_allow_tf32_sets_the_cuda_flags_and_leaves_cpu_results_alone(tiny_base, tmp_path):
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        out = distill(_cfg(tiny_base, tmp_path / "run", allow_tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert _losses(out) == pytest.approx(RECORDED_LOSSES["codi"], rel=1e-3)
