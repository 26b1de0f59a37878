"""The step objective: global-batch draws sliced per process, and cached latents / prompt embeddings."""
from __future__ import annotations

import contextlib

import pytest
import torch

from condistill.adapters import build_student
from condistill.conditions import get_condition
from condistill.data.dataset import ConditionDataset, collate
from condistill.data.sources import open_source
from condistill.frozen import load_base
from condistill.training.batches import Part
from condistill.training.ema import EMA
from condistill.training.objective import build_objective, prompt_embeddings, step_generator
from helpers import perturb_, tiny_run_config, torch_single_thread  # noqa: F401


def _student_and_batch(tiny_base, kind: str, seed: int):
    """The tiny base, a perturbed edge student of ``kind`` (so the condition matters) and a batch of 4 scenes."""
    base = load_base(tiny_base)
    condition = get_condition("edge")
    student = build_student(kind, base, condition.channels)
    perturb_(student, seed=seed)
    dataset = ConditionDataset(open_source("synthetic:train:4", resolution=base.resolution), condition, base.resolution)
    return base, student, collate([dataset[i] for i in range(4)])


@pytest.fixture(scope="module")
def parts(tiny_base):
    """A tiny base, a perturbed T2I-Adapter student (so the condition matters) and a batch of 4 scenes."""
    base, student, batch = _student_and_batch(tiny_base, "t2i_adapter", 1)
    batch["caption"] = ["a red cube", "the blue ball", "a green cube on the sky", "a photo of a ball"]
    return base, student, batch


def _objective(tiny_base, base, student, part=Part(), **overrides):
    cfg = tiny_run_config(tiny_base, "unused", adapter="t2i_adapter", caption_dropout=0.5, guidance_min=1.5,
                          guidance_max=3.0, **overrides)
    return build_objective(cfg, student, student, EMA(student.trainable_named_parameters()), base, part)


def _half(batch: dict, rank: int) -> dict:
    return {k: v[2 * rank:2 * rank + 2] for k, v in batch.items()}


@pytest.mark.parametrize("loss", ["codi", "diffusion"])
def test_each_process_computes_its_slice_of_the_global_batch(tiny_base, parts, loss):
    """Process r of 2 with batch 2 draws for the global batch of 4 and keeps items [2r, 2r+2)."""
    base, student, batch = parts
    whole, _ = _objective(tiny_base, base, student, loss=loss)(batch, 3)
    halves = [_objective(tiny_base, base, student, Part(2, r), loss=loss)(_half(batch, r), 3)[0] for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-5, atol=1e-6)
    alone, _ = _objective(tiny_base, base, student, loss=loss)(_half(batch, 1), 3)  # its own draws differ
    assert not torch.allclose(alone, halves[1], rtol=1e-3, atol=0)


def test_cached_latents_and_prompt_embeddings_give_the_same_loss(tiny_base, parts):
    base, student, batch = parts
    objective = _objective(tiny_base, base, student)
    step = 5  # at caption_dropout 0.5 this step's draws drop some captions and keep others (checked below)
    g = step_generator(0, step)
    dropped = [bool(torch.rand((), generator=g) < 0.5) for _ in range(4)]
    assert any(dropped) and not all(dropped)
    cached = {"latents": base.encode_images(batch["pixel_values"]), "prompt_embeds": base.encode_prompts(batch["caption"]),
              "conditioning": batch["conditioning"], "caption": batch["caption"], "key": batch["key"]}
    encoded, _ = objective(batch, step)
    from_cache, _ = objective(cached, step)
    torch.testing.assert_close(from_cache, encoded, rtol=1e-5, atol=1e-6)


class _DictBase:
    """The embedding side of a base whose prompts give a dict of tensors (like SDXL's two encoders)."""

    device = torch.device("cpu")

    def encode_prompts(self, prompts):
        n = len(prompts)
        value = torch.tensor([float(len(p)) for p in prompts])
        return {"hidden": value.view(n, 1, 1).expand(n, 3, 2).clone(), "pooled": value.view(n, 1).expand(n, 5).clone()}


def test_dropped_cached_embeddings_become_the_empty_prompts():
    base = _DictBase()
    captions = ["ab", "abcd", "abcdef"]
    drop = [False, True, False]
    uncond = base.encode_prompts([""])
    got = prompt_embeddings(base, {"caption": captions, "prompt_embeds": base.encode_prompts(captions)}, drop, uncond)
    want = base.encode_prompts(["" if d else c for c, d in zip(captions, drop)])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k])
    with pytest.raises(ValueError, match="rebuild the cache"):
        prompt_embeddings(base, {"caption": captions, "prompt_embeds": want["hidden"]}, drop, uncond)


def test_a_batch_without_images_or_latents_is_refused(tiny_base, parts):
    base, student, batch = parts
    no_images = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(KeyError, match="'pixel_values' .* or 'latents'"):
        _objective(tiny_base, base, student)(no_images, 0)


@pytest.mark.parametrize("guided", [False, True])
def test_the_controlnet_step_shares_the_frozen_down_pass_bit_identically(tiny_base, guided, monkeypatch):
    """The UNet's down and mid blocks run once for the online and ODE branches; the loss and gradients are unchanged."""
    import condistill.training.objective as objective_module
    from condistill.adapters import shared_pass

    base, student, batch = _student_and_batch(tiny_base, "controlnet", 2)
    scales = dict(guidance_min=1.5, guidance_max=3.0) if guided else {}
    cfg = tiny_run_config(tiny_base, "unused", **scales)
    seen = []

    @contextlib.contextmanager
    def counting(blocks):
        with shared_pass.shared_frozen_blocks(blocks) as stats:
            seen.append(stats)
            yield stats

    def run(share: bool):
        student.zero_grad(set_to_none=True)
        if not share:
            monkeypatch.setattr(student, "shared_frozen_blocks", lambda: [])
        objective = build_objective(cfg, student, student, EMA(student.trainable_named_parameters()), base)
        loss, _ = objective(batch, 4)
        loss.mean().backward()
        monkeypatch.undo()
        return loss.detach(), [p.grad.clone() for p in student.trainable_named_parameters().values()]

    plain_loss, plain_grads = run(share=False)
    monkeypatch.setattr(objective_module, "shared_frozen_blocks", counting)
    shared_loss, shared_grads = run(share=True)
    assert torch.equal(plain_loss, shared_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, shared_grads))
    blocks = len(student.shared_frozen_blocks())
    assert blocks == len(student.unet.down_blocks) + 1
    assert seen[-1].hits == blocks  # the online branch reused every block of the ODE branch's pass



@pytest.mark.parametrize("adapter", ["t2i_adapter", "controlnet", "lora"])
def test_ode_from_the_online_output_saves_one_student_call_and_equals_the_ema_ode_at_equal_weights(tiny_base, adapter):
    """ode_source='online': with the EMA equal to the online weights (as at step 0), the ODE step
    from the detached online prediction is the EMA branch's, so loss and gradients agree; one
    student forward fewer runs per step (guided: each branch is one call on the doubled batch)."""
    base, student, batch = _student_and_batch(tiny_base, adapter, 4)
    calls = []
    student.register_forward_pre_hook(lambda module, args: calls.append(1))

    def run(ode_source: str):
        student.zero_grad(set_to_none=True)
        calls.clear()
        cfg = tiny_run_config(tiny_base, "unused", adapter=adapter, guidance_min=1.5, guidance_max=3.0,
                              ode_source=ode_source)
        objective = build_objective(cfg, student, student, EMA(student.trainable_named_parameters()), base)
        loss, _ = objective(batch, 2)
        loss.mean().backward()
        return loss.detach(), [p.grad.clone() for p in student.trainable_named_parameters().values()], len(calls)

    ema_loss, ema_grads, ema_calls = run("ema")
    online_loss, online_grads, online_calls = run("online")
    torch.testing.assert_close(online_loss, ema_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(online_grads, ema_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ema_calls == 3 and online_calls == 2


def test_ode_from_an_unguided_online_output_is_refused(tiny_base):
    from condistill.config import ConfigError

    with pytest.raises(ConfigError, match="guidance_branches='all' or ode_source='ema'"):
        tiny_run_config(tiny_base, "unused", ode_source="online", guidance_min=1.5, guidance_max=3.0,
                        guidance_branches="ode")
    tiny_run_config(tiny_base, "unused", ode_source="online", guidance_min=1.5, guidance_max=3.0)  # accepted


def test_binding_the_ema_gives_the_same_step_as_copying_it_in(tiny_base, monkeypatch):
    """The EMA branches bind the EMA tensors (EMA.bound) instead of copying them into the weights
    (EMA.swapped_in): the loss and gradients of a step are bit-identical either way."""
    base, student, batch = _student_and_batch(tiny_base, "controlnet", 5)
    ema = EMA(student.trainable_named_parameters())
    perturb_(student, seed=6)  # the EMA now lags the online weights
    cfg = tiny_run_config(tiny_base, "unused", guidance_min=1.5, guidance_max=3.0)

    def run():
        student.zero_grad(set_to_none=True)
        loss, _ = build_objective(cfg, student, student, ema, base)(batch, 3)
        loss.mean().backward()
        return loss.detach(), [p.grad.clone() for p in student.trainable_named_parameters().values()]

    bound_loss, bound_grads = run()
    monkeypatch.setattr(EMA, "bound", EMA.swapped_in)
    copied_loss, copied_grads = run()
    assert torch.equal(bound_loss, copied_loss)
    assert all(torch.equal(a, b) for a, b in zip(bound_grads, copied_grads))


def test_grid_top_fraction_reaches_the_consistency_draw(tiny_base, parts):
    """``grid_top_fraction`` moves the CoDi loss's timesteps to the top of the grid; 0 keeps the uniform draw."""
    from condistill.config import ConfigError

    base, student, batch = parts
    _, top = _objective(tiny_base, base, student, grid_top_fraction=1.0)(batch, 3)
    assert top["t"].tolist() == [999] * 4
    _, uniform = _objective(tiny_base, base, student)(batch, 3)
    _, zero = _objective(tiny_base, base, student, grid_top_fraction=0.0)(batch, 3)
    assert torch.equal(uniform["t"], zero["t"]) and not bool((uniform["t"] == 999).all())
    with pytest.raises(ConfigError, match="grid_top_fraction=1.5"):
        tiny_run_config(tiny_base, "unused", grid_top_fraction=1.5)


@pytest.mark.parametrize("stochastic", [True, False])
def test_backward_simulation_is_the_students_own_k_step_sampler(tiny_base, stochastic):
    """``backward_simulation``: after the draw of ``k``, the state is what the stock CoDiScheduler reaches after ``k``
    of its K steps with this student (its fresh noise drawn from the same generator), at the sampler's ``k``-th
    timestep; every ``k`` in ``0..K-1`` is drawn, and ``k = 0`` is the noise itself at the top of the grid."""
    from condistill.method.codi_scheduler import CoDiScheduler
    from condistill.method.guidance import make_model_fn
    from condistill.method.schedule import skip_grid
    from condistill.training.objective import backward_simulation

    base, student, batch = _student_and_batch(tiny_base, "controlnet", seed=4)
    cfg = tiny_run_config(tiny_base, "unused", loss="codi+dmd", dmd_backward_steps=4, stochastic_sampling=stochastic)
    grid, alphas = skip_grid(base.num_train_timesteps, 50), base.alphas_cumprod
    cond = batch["conditioning"]
    emb = base.encode_prompts(batch["caption"])
    z = torch.randn(4, base.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = CoDiScheduler.from_config(base.scheduler_config, num_grid=50, stochastic=stochastic)
    scheduler.set_timesteps(4)
    seen = set()
    for seed in range(12):
        got, t_k = backward_simulation(cfg, student, cond, emb, None, None, z.clone(), grid, alphas,
                                       torch.Generator().manual_seed(seed), Part(), base.prediction_type)
        g = torch.Generator().manual_seed(seed)
        k = int(torch.randint(0, 4, (), generator=g))
        expected = z.clone()
        fn = make_model_fn(student, student.encode_condition(cond), 4)
        with torch.no_grad():
            for t in scheduler.timesteps[:k]:
                raw = fn(expected, t.expand(4), emb)
                if not stochastic:
                    torch.randn(expected.shape, generator=g)  # drawn either way: the stream does not depend on it
                expected = scheduler.step(raw, t, expected, generator=g).prev_sample
        assert t_k == int(scheduler.timesteps[k])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_backward_simulation_settings_are_checked(tiny_base):
    from condistill.config import ConfigError

    for bad, phrase in ((dict(loss="codi+dmd", dmd_backward_steps=1), "must be 0 (off) or a step count K in 2..num_grid"),
                        (dict(loss="codi", dmd_backward_steps=4), "use --loss codi+dmd or dmd"),
                        (dict(loss="codi+dmd", dmd_backward_steps=4, dmd_start_timestep=499), "set one of them to 0")):
        with pytest.raises(ConfigError) as info:
            tiny_run_config(tiny_base, "unused", **bad)
        assert phrase in str(info.value)


def test_a_backward_simulated_step_trains(tiny_base):
    from condistill.training.fake_score import FakeScore

    base, student, batch = _student_and_batch(tiny_base, "controlnet", seed=5)
    cfg = tiny_run_config(tiny_base, "unused", loss="codi+dmd", dmd_backward_steps=4, dmd_fake_rank=4)
    objective = build_objective(cfg, student, student, EMA(student.trainable_named_parameters()), base,
                                fake_score=FakeScore.from_config(cfg, student, base))
    value, info = objective(batch, 3)
    value.mean().backward()
    assert bool(torch.isfinite(value).all()) and "dmd" in info
    assert any(bool(p.grad.abs().sum() > 0) for p in student.trainable_named_parameters().values())
