"""Distribution matching in training: the fake-score LoRA, what gets gradients, and resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from condistill.adapters import build_student
from condistill.conditions import get_condition
from condistill.config import ConfigError
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.sources import open_source
from condistill.frozen import load_base
from condistill.training.ema import EMA
from condistill.training.fake_score import FAKE_SCORE_ADAPTER, FakeScore
from condistill.training.loop import distill
from condistill.training.objective import build_objective
from helpers import model_inputs, perturb_, tiny_run_config, torch_single_thread  # noqa: F401


def _teacher(base, z, t, e):
    return base.unet(z, t, encoder_hidden_states=e, return_dict=False)[0]


@pytest.mark.parametrize("kind, rank", [("controlnet", 4), ("lora", 4), ("controlnet", 0), ("lora", 0)])
def test_fake_score_starts_as_the_teacher_and_never_leaks_into_it(tiny_base, kind, rank):
    """A LoRA fake score (zero-initialised) or a full copy of the teacher UNet (rank 0) starts as the teacher, and
    training it changes neither the teacher nor the student."""
    base = load_base(tiny_base)
    student = build_student(kind, base, get_condition("edge").channels)
    z, t, e, cond = model_inputs(base)
    before = _teacher(base, z, t, e)
    fake = FakeScore(student, base, rank=rank)
    assert fake.full == (rank == 0) and (rank > 0 or fake.unet is not base.unet)
    with torch.no_grad():
        assert torch.equal(fake(z, t, e), before)  # zero-initialised LoRA: the teacher exactly
        for p in fake.params.values():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(fake(z, t, e), before)
        # the teacher, the student's teacher path and the zero-initialised student are all unchanged
        assert torch.equal(_teacher(base, z, t, e), before)
        assert torch.equal(student(z, t, e, use_adapter=False), before)
        assert torch.equal(student(z, t, e, student.encode_condition(cond)), before)
    assert all(f".{FAKE_SCORE_ADAPTER}." not in name for name in student.trainable_named_parameters())


@pytest.mark.parametrize("kind", ["controlnet", "lora"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_the_real_and_fake_scores_of_one_shared_pass_are_those_of_two_calls(tiny_base, kind, guidance):
    """FakeScore.scores: one UNet call on [uncond, cond, cond] with the fake-score LoRA on the last rows only gives
    the teacher's CFG output and the fake score's, as the separate calls do (to float rounding); the LoRA is
    switched off again afterwards and a LoRA student's own LoRA stays out of both."""
    from condistill.method.guidance import guided_output, make_model_fn

    base = load_base(tiny_base)
    student = build_student(kind, base, get_condition("edge").channels)
    perturb_(student, seed=1)
    fake = FakeScore(student, base, rank=4)
    z, t, e, _ = model_inputs(base)
    uncond = base.encode_prompts([""])
    with torch.no_grad(), fake.frozen():
        for p in fake.params.values():
            p.add_(0.05 * torch.randn_like(p))
        teacher = _teacher(base, z, t, e)
        real = guided_output(make_model_fn(student, None, z.shape[0], use_adapter=False), z, t, e, uncond, guidance)
        separate = fake(z, t, e)
        shared_real, shared_fake = fake.scores(e, uncond, guidance)(z, t)
        assert not torch.allclose(real, separate, atol=1e-3)  # the LoRA makes a difference that the pass must keep
        torch.testing.assert_close(shared_real, real, rtol=0, atol=1e-5)
        torch.testing.assert_close(shared_fake, separate, rtol=0, atol=1e-5)
        assert torch.equal(_teacher(base, z, t, e), teacher)  # its hooks are gone: the teacher is itself again


@pytest.fixture(scope="module")
def batch(tiny_base):
    base = load_base(tiny_base)
    dataset = ConditionDataset(open_source("synthetic:train:4", resolution=base.resolution), get_condition("edge"),
                               base.resolution)
    return collate([dataset[i] for i in range(4)])


@pytest.mark.parametrize("kind, loss, gan, rank", [("controlnet", "codi+dmd", 0.0, 4), ("t2i_adapter", "dmd", 0.5, 4),
                                                   ("lora", "codi+dmd", 0.5, 4), ("controlnet", "codi+dmd", 0.5, 0)])
def test_student_loss_reaches_only_the_adapter_and_the_fake_score_trains_itself(tiny_base, batch, kind, loss, gan,
                                                                                 rank):
    base = load_base(tiny_base)
    student = build_student(kind, base, get_condition("edge").channels)
    perturb_(student, seed=2)
    cfg = tiny_run_config(tiny_base, "unused", adapter=kind, loss=loss, gan_weight=gan, dmd_fake_updates=2,
                          dmd_fake_rank=rank)
    fake = FakeScore.from_config(cfg, student, base)
    start = {k: v.detach().clone() for k, v in fake.params.items()}
    objective = build_objective(cfg, student, student, EMA(student.trainable_named_parameters()), base,
                                fake_score=fake)
    value, info = objective(batch, 0)
    assert value.shape == (4,) and bool(torch.isfinite(value).all())
    assert {"dmd", "fake_score", "regression"} <= set(info) and (("gan_g" in info) == (gan > 0))
    if loss == "dmd":
        assert torch.equal(info["distill"], torch.zeros(4))
    value.mean().backward()
    assert all(p.grad is None for p in fake.params.values())  # the student's loss never reaches the fake score
    grads = [p.grad for p in student.trainable_named_parameters().values()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    moved = [name for name, p in fake.params.items() if not torch.equal(p.detach(), start[name])]
    assert moved and (gan == 0 or any(name.startswith("head.") for name in moved))
    assert rank > 0 or any(name.startswith("copy.") for name in moved)  # a full copy trains its own UNet weights


def test_the_gan_term_trains_with_gradient_checkpointing(tiny_base, tmp_path):
    """The generator's GAN loss goes backward after the fake score's call: its features are not checkpointed (a
    recomputation without the LoRA's hooks would differ and torch would refuse it)."""
    out = distill(tiny_run_config(tiny_base, tmp_path / "run", loss="codi+dmd", gan_weight=0.1,
                                  gradient_checkpointing=True, batch_size=2))
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("gan_g" in r and "gan_d" in r for r in records)


def test_distribution_matching_term_changes_the_step(tiny_base, batch):
    """The DMD term is in the loss: with dmd_weight 0 the same draws give the CoDi loss alone."""
    base = load_base(tiny_base)
    student = build_student("controlnet", base, get_condition("edge").channels)
    perturb_(student, seed=3)
    ema = EMA(student.trainable_named_parameters())
    values = {}
    for weight in (0.0, 1.0):
        cfg = tiny_run_config(tiny_base, "unused", loss="codi+dmd", dmd_weight=weight, dmd_fake_rank=4)
        objective = build_objective(cfg, student, student, ema, base, fake_score=FakeScore.from_config(cfg, student, base))
        values[weight], info = objective(batch, 5)
        base.unet.delete_adapters(FAKE_SCORE_ADAPTER)
    codi, _ = build_objective(tiny_run_config(tiny_base, "unused"), student, student, ema, base)(batch, 5)
    torch.testing.assert_close(values[0.0], codi, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(values[1.0], codi + info["dmd"], rtol=1e-5, atol=1e-7)


def test_resume_restores_the_fake_score_and_its_optimizer_bit_identically(tiny_base, tmp_path):
    opts = dict(loss="codi+dmd", gan_weight=0.5, dmd_fake_updates=2, dmd_fake_rank=4, checkpoint_every=2,
                keep_checkpoints=3)
    full = distill(tiny_run_config(tiny_base, tmp_path / "full", max_steps=4, **opts))
    part = tmp_path / "part"
    distill(tiny_run_config(tiny_base, part, max_steps=2, **opts))
    distill(tiny_run_config(tiny_base, part, max_steps=4, resume="latest", **opts))
    a_dir, b_dir = full / "checkpoints/step-0000004", part / "checkpoints/step-0000004"
    for name in ("online.safetensors", "ema.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(d / "training_state.pt", weights_only=True)["extra"]["fake_score"] for d in (a_dir, b_dir))
    assert a["weights"].keys() == b["weights"].keys() and any(k.startswith("head.") for k in a["weights"])
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
    losses = [[json.loads(line) for line in (d / "loss.jsonl").read_text().splitlines()] for d in (full, part)]
    assert [r["loss"] for r in losses[0][-2:]] == [r["loss"] for r in losses[1][-2:]]
    assert "dmd" in losses[0][-1] and "fake_score" in losses[0][-1] and "gan_d" in losses[0][-1]
    card = (full / "adapter" / "README.md").read_text()
    assert "CoDi + distribution matching" in card and "real-score CFG 4" in card


def test_a_checkpoint_without_a_fake_score_is_refused_by_a_distribution_matching_resume(tiny_base, tmp_path):
    distill(tiny_run_config(tiny_base, tmp_path / "run", max_steps=1))
    checkpoint = tmp_path / "run/checkpoints/step-0000001"
    with pytest.raises(Exception, match="loss"):  # the config comparison names the changed loss
        distill(tiny_run_config(tiny_base, tmp_path / "run", max_steps=2, loss="codi+dmd", resume=str(checkpoint)))


def test_config_refuses_what_distribution_matching_cannot_do(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="gan_weight"):
        tiny_run_config(tiny_base, tmp_path, gan_weight=0.1)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        tiny_run_config(tiny_base, tmp_path, adapter="lora", loss="codi+dmd", gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="dmd_guidance"):
        tiny_run_config(tiny_base, tmp_path, loss="codi+dmd", dmd_guidance=0.5)
    with pytest.raises(ConfigError, match=r"dmd_fake_rank=-1: must be at least 1 \(a LoRA's rank\), or 0 \(a full copy\)"):
        tiny_run_config(tiny_base, tmp_path, loss="codi+dmd", dmd_fake_rank=-1)
    assert tiny_run_config(tiny_base, tmp_path, loss="codi+dmd", dmd_fake_rank=0).dmd_fake_rank == 0


@pytest.mark.parametrize("name", ["inpaint", "edge"])
def test_one_step_outputs_can_start_from_the_conditions_own_image(tiny_base, monkeypatch, name):
    """``dmd_start_timestep``: the one-step outputs start from ``start_image`` (inpaint; the zero latent for
    edge) noised to that timestep, with the same noise draw as from pure noise (the other draws of the step
    are unchanged)."""
    import condistill.training.objective as objective_module
    from condistill.method.schedule import add_noise

    base = load_base(tiny_base)
    inpaint = get_condition(name)
    dataset = ConditionDataset(open_source("synthetic:train:4", resolution=base.resolution), inpaint, base.resolution)
    inpaint_batch = collate([dataset[i] for i in range(4)])
    student = build_student("controlnet", base, inpaint.channels)
    ema = EMA(student.trainable_named_parameters())
    seen = []

    class Recording(objective_module.OneStepOutputs):
        def __init__(self, *args):
            super().__init__(*args)
            seen.append((self.z_top.clone(), self.t_top.clone()))

    monkeypatch.setattr(objective_module, "OneStepOutputs", Recording)
    for start in (0, 499):
        cfg = tiny_run_config(tiny_base, "unused", condition=name, loss="codi+dmd", dmd_fake_rank=4,
                              dmd_start_timestep=start)
        objective = build_objective(cfg, student, student, ema, base, fake_score=FakeScore.from_config(cfg, student, base),
                                    condition=inpaint)
        objective(inpaint_batch, 3)
        base.unet.delete_adapters(FAKE_SCORE_ADAPTER)
    (noise, t_top), (z_start, t_start) = seen
    assert torch.equal(t_top, torch.full((4,), 999)) and torch.equal(t_start, torch.full((4,), 499))
    with torch.no_grad():
        image = (base.encode_images(inpaint.start_image(inpaint_batch["conditioning"])).float()
                 if name == "inpaint" else torch.zeros_like(noise))
    expected = add_noise(image, noise, torch.full((4,), 499), base.alphas_cumprod)
    torch.testing.assert_close(z_start, expected, rtol=1e-5, atol=1e-6)


def test_the_one_step_start_is_checked_before_training(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="--loss codi\\+dmd or dmd"):
        tiny_run_config(tiny_base, tmp_path, condition="sr", dmd_start_timestep=499)
    with pytest.raises(ConfigError, match="dmd_start_timestep"):
        tiny_run_config(tiny_base, tmp_path, condition="sr", loss="codi+dmd", dmd_start_timestep=-1)
    with pytest.raises(ValueError, match="not a point of the training grid"):
        distill(tiny_run_config(tiny_base, tmp_path / "run", condition="sr", loss="codi+dmd", dmd_fake_rank=4,
                                dmd_start_timestep=500))
    assert not (tmp_path / "run" / "adapter_config.json").exists()


@pytest.mark.parametrize("name, start", [("sr", "the input"), ("edge", "the zero latent")])
def test_a_run_from_the_input_says_so_in_its_model_card(tiny_base, tmp_path, name, start):
    run = distill(tiny_run_config(tiny_base, tmp_path / "run", condition=name, loss="codi+dmd", dmd_fake_rank=4,
                                  max_steps=1, dmd_start_timestep=499))
    assert f"one-step outputs from {start} noised to t=499" in (run / "adapter" / "README.md").read_text()
