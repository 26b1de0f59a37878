"""The fake-score network of distribution matching: a LoRA on the frozen teacher UNet, trained online.

DMD's second denoiser models the distribution of the student's own outputs. Here it is
parameter-efficient: a peft LoRA (adapter name :data:`FAKE_SCORE_ADAPTER`) injected into the
same frozen UNet the teacher and the student use. peft keeps it switched off; forward hooks apply it
only inside the fake score's own calls (or to its own rows of a pass shared with the teacher's real
score), so the teacher and the student never see it. It is trained with the plain diffusion
loss on the student's (detached) outputs by its own AdamW, ``updates`` times per student
micro-step (DMD2's two time-scale update rule), and optionally carries a small discriminator
head on the UNet's mid-block features (DMD2's GAN term: real = noised training images, fake =
noised student outputs).

It reads the text but not the condition: it models the student's outputs over all conditions,
whose distribution a condition-faithful student shares with the teacher's text-conditional one
(the conditions come from real images), so matching the two does not fight the regression term
that carries the condition.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from condistill.adapters.lora import LORA_TARGETS, switch_lora
from condistill.method.distribution_matching import gan_discriminator_loss
from condistill.method.losses import diffusion_loss
from condistill.method.schedule import add_noise

__all__ = ["FAKE_SCORE_ADAPTER", "DiscriminatorHead", "FakeScore"]

#: peft adapter name of the fake-score LoRA inside the teacher UNet
FAKE_SCORE_ADAPTER = "dmd_fake_score"


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


class DiscriminatorHead(nn.Module):
    """Logits ``[B, 1, h', w']`` from the UNet's mid-block features ``[B, C, h, w]``."""

    def __init__(self, channels: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or max(channels // 2, 16)
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if hidden % g == 0)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, stride=2), nn.GroupNorm(groups, hidden), nn.SiLU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


class FakeScore:
    """The fake score ``fn(z, t, text) -> raw output`` (the teacher's prediction type) and its training.

    Args:
        student: the :class:`~condistill.adapters.Student` (its UNet is the shared frozen teacher UNet).
        base: the frozen :class:`~condistill.frozen.Base`.
        rank: LoRA rank (alpha = rank); 0 trains a full copy of the teacher UNet instead (float32, every
            weight: the most capacity a fake score can have, at the cost of a UNet's weights and optimizer
            state; its calls cannot share the teacher's pass).
        targets: the layers it covers, a name of :data:`condistill.adapters.lora.LORA_TARGETS`.
        learning_rate, weight_decay, max_grad_norm: its AdamW and clipping.
        gan: also train a :class:`DiscriminatorHead` on the mid-block features.
    """

    def __init__(self, student, base, *, rank: int = 16, targets: str = "attention_ff", learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, gan: bool = False):
        unet = student.unet
        self.base, self.student = base, student
        self.head = None
        self._active = False  # the LoRA is applied (see active())
        self._layers = None  # the LoRA layers that carry it (_apply)
        self.full = rank == 0
        if self.full:
            self.unet = self._full_copy(unet)
            self.params = {f"copy.{n}": p for n, p in self.unet.named_parameters()}
        else:
            self._add_lora(student, unet, rank, targets)
        if gan:
            if getattr(unet, "mid_block", None) is None:
                raise ValueError("the GAN term reads the UNet's mid-block features, and this UNet has no mid block; "
                                 "set gan_weight to 0.")
            self.head = DiscriminatorHead(unet.config.block_out_channels[-1]).to(base.device)
            self.params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=learning_rate, weight_decay=weight_decay)

    @staticmethod
    def _full_copy(unet) -> nn.Module:
        """A trainable float32 copy of the teacher UNet (without any LoRA a student keeps in it)."""
        import copy

        from condistill.adapters.student import unet_without_lora

        clone = unet_without_lora(unet)
        clone = (copy.deepcopy(clone) if clone is unet else clone).to(device=unet.device, dtype=torch.float32)
        clone.train(False)
        for p in clone.parameters():
            p.requires_grad_(True)
        return clone

    def _add_lora(self, student, unet, rank: int, targets: str) -> None:
        from peft import LoraConfig

        if getattr(unet, "_condistill_lora_always_on", False):
            raise ValueError("distribution matching needs the teacher UNet without the student's LoRA: a LoRA student "
                             "with gradient checkpointing keeps its LoRA switched on. Turn gradient checkpointing off, "
                             "or use a ControlNet or T2I-Adapter student.")
        if FAKE_SCORE_ADAPTER in (getattr(unet, "peft_config", None) or {}):
            raise ValueError("this UNet already carries a fake-score LoRA; build the run on a freshly loaded base.")
        flags = {n: p.requires_grad for n, p in unet.named_parameters() if ".lora_" in n}
        try:
            with warnings.catch_warnings():  # a LoRA student's adapter is already there, on purpose
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS[targets]),
                                            init_lora_weights=True), adapter_name=FAKE_SCORE_ADAPTER)
        except ValueError as error:
            raise ValueError(f"could not add the fake-score LoRA to this UNet: {error}") from error
        self.unet = unet
        self.params: dict[str, nn.Parameter] = {}
        for name, p in unet.named_parameters():
            if f".{FAKE_SCORE_ADAPTER}." in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                self.params[f"unet.{name}"] = p
            elif name in flags:
                p.requires_grad_(flags[name])
        switch_lora(unet, None)  # add_adapter made it the active one: off in peft for good, applied by hooks
        # the LoRA lives inside the student's UNet, but DDP must neither wait for its gradients in the
        # student's backward nor hook its own updates: it averages them itself (_average_gradients)
        names = {f"unet.{n}" for n, _ in unet.named_parameters() if f".{FAKE_SCORE_ADAPTER}." in n}
        if names - {n for n, _ in student.named_parameters()}:
            raise ValueError("the student does not hold its UNet as `student.unet`; the fake score cannot find its LoRA")
        ignored = set(getattr(student, "_ddp_params_and_buffers_to_ignore", ()))
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            student, sorted(ignored | names))

    @classmethod
    def from_config(cls, cfg, student, base) -> "FakeScore":
        """The fake score of a run's :class:`~condistill.config.DistillConfig` (its ``dmd_*`` and ``gan_weight``)."""
        return cls(student, base, rank=cfg.dmd_fake_rank, targets=cfg.dmd_fake_targets,
                   learning_rate=cfg.dmd_fake_lr or cfg.learning_rate, weight_decay=cfg.weight_decay,
                   max_grad_norm=cfg.max_grad_norm, gan=cfg.gan_weight > 0)

    # ---- calls ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self):
        """The fake-score LoRA applied to every call of the UNet; nested uses keep it until the outermost ends.

        It is applied by forward hooks on the layers that carry it (``base(x) + B A x``, what peft computes
        for an active LoRA), never switched on in peft: no other adapter's state is touched, and a
        switch costs a registration per layer instead of a walk over the whole UNet."""
        if self._active or self.full:  # a full copy is always itself
            yield
            return
        handles = self._apply(rows=None)
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def on_last(self, rows: int):
        """Its LoRA applied to the last ``rows`` rows of every batch only (no gradient), the other rows running
        the frozen teacher: what lets the real score (the teacher, CFG) and the fake score share one pass
        of the frozen weights (:meth:`scores`)."""
        if self._active:
            raise RuntimeError("on_last applies the fake-score LoRA to some rows: it is already applied to all")
        handles = self._apply(rows=int(rows))
        try:
            with torch.no_grad():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _apply(self, rows: int | None) -> list:
        """Forward hooks adding the LoRA's ``scaling * B(A(dropout(x)))`` to every layer that carries it, on all
        rows (out of place: gradients reach the LoRA) or, in place without a graph, on the last ``rows``."""
        name = FAKE_SCORE_ADAPTER

        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            if rows is not None:
                x = x[-rows:]
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            delta = lora_b(lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype)))) * module.scaling[name]
            if rows is None:
                return output + delta.to(output.dtype)
            output[-rows:] += delta.to(output.dtype)
            return output

        if self._layers is None:
            self._layers = [m for m in self.unet.modules()
                            if name in getattr(getattr(m, "lora_A", None), "keys", lambda: ())()]
        return [m.register_forward_hook(hook, with_kwargs=True) for m in self._layers]

    @contextlib.contextmanager
    def frozen(self):
        """Its parameters excluded from autograd: the student's loss must not reach them.

        Also what lets the frozen-block sharing of a ControlNet step accept the UNet blocks
        that hold the (switched-off) fake-score LoRA.
        """
        flags = {name: p.requires_grad for name, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.requires_grad_(flags[name])

    def __call__(self, z: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        """Raw UNet output of the fake score at ``(z, t)`` for the text conditioning ``text``."""
        with self.active():
            z = z.to(self.unet.dtype)
            return self.unet(z, t, **self.student.text_kwargs(text, z), return_dict=False)[0]

    def scores(self, text, uncond, guidance: float | None):
        """``fn(z, t) -> (real, fake)``: the teacher's CFG output (the real score) and this fake score's raw
        output at ``(z, t)``, in one UNet call on ``[uncond, cond, cond]`` with the LoRA on the last third."""
        from condistill.method.guidance import guided_output, guided_with_copy, make_model_fn

        def fn(z: torch.Tensor, t: torch.Tensor):
            teacher = make_model_fn(self.student, None, z.shape[0], use_adapter=False)
            if self.full:  # other weights: two calls
                with torch.no_grad():
                    return guided_output(teacher, z, t, text, uncond, guidance), self(z, t, text)
            with self.on_last(z.shape[0]):
                return guided_with_copy(teacher, z, t, text, uncond, guidance)

        return fn

    def features(self, z: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        """The UNet's mid-block output under the fake score (the forward stops there)."""
        def stop(module, args, output):
            raise _Stop(output)

        handle = self.unet.mid_block.register_forward_hook(stop)
        try:
            # not checkpointed: the generator's GAN loss goes backward after this call has removed the LoRA's
            # hooks, and a recomputed forward without them would differ (it only runs to the mid block)
            with _without_checkpointing(self.unet):
                self(z, t, text)
        except _Stop as caught:
            return caught.value
        finally:
            handle.remove()
        raise RuntimeError("the UNet's forward did not reach its mid block")

    def logits(self, z: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.head(self.features(z, t, text))

    # ---- training ------------------------------------------------------------------------
    def update(self, x: torch.Tensor, text, noise: torch.Tensor, t: torch.Tensor,
               real: torch.Tensor | None = None, gan_noise: torch.Tensor | None = None,
               gan_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step of the fake score on the student's outputs ``x`` (detached here).

        Loss: the diffusion loss of the fake score at ``(x, noise, t)``; with the head, plus the
        discriminator loss on ``x`` and the real latents ``real`` noised with the same
        ``gan_noise`` at ``gan_t``. Gradients are averaged over processes before the step.

        Returns:
            ``{"fake_score": [B], "gan_d": [B]}`` (detached; ``gan_d`` only with the head).
        """
        x = x.detach().float()
        alphas = self.base.alphas_cumprod.to(x.device)
        # the backward inside the LoRA's switch too: with gradient checkpointing, it re-runs the forward
        with self.active():
            loss = diffusion_loss(lambda z, tt: self(z, tt, text).float(), x, noise, t, alphas,
                                  self.base.prediction_type)
            out = {"fake_score": loss.detach()}
            total = loss.mean()
            if self.head is not None:
                fake_t = add_noise(x, gan_noise, gan_t, alphas)
                real_t = add_noise(real.detach().float(), gan_noise, gan_t, alphas)
                d = gan_discriminator_loss(self.logits(real_t, gan_t, text), self.logits(fake_t, gan_t, text))
                out["gan_d"] = d.detach()
                total = total + d.mean()
            total.backward()
        _average_gradients(self.params.values())
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def state_dict(self) -> dict:
        """Its weights and optimizer state (what a checkpoint keeps)."""
        return {"weights": {k: v.detach().float().cpu().clone() for k, v in self.params.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        weights = state["weights"]
        missing, unexpected = set(self.params) - set(weights), set(weights) - set(self.params)
        if missing or unexpected:
            raise RuntimeError(f"the checkpoint's fake-score state does not match this run's (missing "
                               f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); was it written "
                               "with another dmd_fake_rank, gan_weight or base?")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(weights[name].to(device=p.device, dtype=p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])


@contextlib.contextmanager
def _without_checkpointing(module: nn.Module):
    """diffusers' gradient checkpointing switched off in ``module``'s blocks for the duration."""
    blocks = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for block in blocks:
        block.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in blocks:
            block.gradient_checkpointing = True


def _average_gradients(params) -> None:
    """Mean of every gradient over the processes of a data-parallel run (no-op with one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
