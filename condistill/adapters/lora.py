"""LoRA student: low-rank updates of the frozen UNet's projections (peft ``LoraConfig``) plus
a small zero-initialised T2I-Adapter that feeds the condition into the UNet's down blocks.

* LoRA: ``unet.add_adapter(LoraConfig(...))`` on the attention projections (``targets=
  "attention"``), optionally also the feed-forward / transformer projections
  (``"attention_ff"``) and the ResNet convolutions (``"all"``), or an explicit list of module
  names. ``lora_B`` starts at zero (peft's default), so the LoRA adds exactly nothing at step 0.
* Condition: a light T2I-Adapter (``light_adapter``, zero-initialised as described in
  :mod:`condistill.adapters.t2i_adapter`) whose features enter through
  ``down_intrablock_additional_residuals``, the same path ``StableDiffusionAdapterPipeline``
  uses. ``condition_adapter="auto"`` takes the light adapter when the UNet's last two widths
  are equal (every SD 1.x/2.x), else the full adapter, or ``full_adapter_xl`` on SDXL.

The LoRA layers are injected into the given UNet **in place** (peft adapter name
``"condistill"``, then ``"condistill_1"``... when several LoRA students share one UNet) but
stay switched off outside the student's own forward, so ``student(..., use_adapter=False)``
and direct ``base.unet(...)`` calls are both exactly the teacher (see
:meth:`LoRAStudent.enable_gradient_checkpointing` for the one exception).

Export: ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (keys
``unet.<module>.lora_A/B.weight``, the ``LoraConfig`` rank/alpha/targets in the safetensors
metadata), loadable by
``StableDiffusionPipeline.load_lora_weights`` or ``unet.load_lora_adapter(..., prefix="unet")``,
plus the stock ``t2i_adapter/`` folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from condistill.adapters.student import (AdapterWeightsError, Student, base_family, check_state_dict_keys,
                                        register_adapter)
from condistill.adapters.t2i_adapter import (
    AUTO_ADAPTER_TYPES,
    WEIGHT_COMPONENT,
    T2IAdapterFeatures,
    make_t2i_adapter,
    resolve_adapter_type,
)

__all__ = ["LoRAStudent", "LORA_TARGETS", "LORA_WEIGHT_NAME", "LORA_ADAPTER_NAME", "stacked_lora", "switch_lora"]

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_NAME = "condistill"
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_FF = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
_CONV = ["conv1", "conv2", "conv_shortcut"]
#: Named LoRA target sets (peft ``target_modules`` suffixes).
LORA_TARGETS = {
    "attention": _ATTENTION,
    "attention_ff": _ATTENTION + _FF,
    "all": _ATTENTION + _FF + _CONV,
}


def switch_lora(unet, name: str | None) -> None:
    """Make the peft LoRA ``name`` the only active one in ``unet`` (``None``: switch every LoRA off), besides
    the LoRAs :func:`stacked_lora` keeps on.

    diffusers' ``set_adapter`` / ``enable_adapters`` / ``disable_adapters`` also change the
    ``requires_grad`` of the LoRA layers of every adapter in the UNet; each keeps its own here.
    """
    flags = {n: p.requires_grad for n, p in unet.named_parameters() if ".lora_" in n}
    stacked = getattr(unet, "_condistill_stacked_loras", None) or {}
    if stacked:
        names = ([name] if name is not None else []) + [n for n in stacked if n != name]
        unet.set_adapters(names, [stacked.get(n, 1.0) if n != name else 1.0 for n in names])
        unet.enable_adapters()
    elif name is not None:
        unet.set_adapter(name)
        unet.enable_adapters()
    else:
        unet.disable_adapters()
    for n, p in unet.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


@contextlib.contextmanager
def stacked_lora(unet, name: str, weight: float = 1.0):
    """Keep the peft LoRA ``name`` switched on at ``weight`` in ``unet`` while inside, whatever else is switched
    on or off: a student's own LoRA is stacked on it (two named adapters, weights ``1.0`` and ``weight``,
    unfused, as diffusers' ``set_adapters`` does), and the teacher's calls include it."""
    unet._condistill_stacked_loras = {name: float(weight)}
    switch_lora(unet, None)
    try:
        yield
    finally:
        del unet._condistill_stacked_loras
        switch_lora(unet, None)


def _resolve_targets(targets) -> list[str]:
    if isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise ValueError(
                f"targets={targets!r}: choose one of {sorted(LORA_TARGETS)} or pass a list of module names."
            )
        return list(LORA_TARGETS[targets])
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets):
        return list(targets)
    raise ValueError(f"targets must be one of {sorted(LORA_TARGETS)} or a non-empty list of module names, got {targets!r}.")


class UNetLoRA:
    """A trainable peft LoRA inside the shared frozen UNet, for a :class:`Student` that carries one.

    It is switched on only inside the student's own forward (:meth:`_lora_switched`), so
    ``student(..., use_adapter=False)`` and direct ``base.unet(...)`` calls stay the teacher; its
    file is ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format. Used by
    :class:`LoRAStudent` (with a light T2I-Adapter) and the ControlNet + LoRA student
    (:mod:`condistill.adapters.controlnet_lora`).
    """

    @staticmethod
    def _other_lora_flags(unet) -> dict[str, bool]:
        """``requires_grad`` of the LoRA layers of other students already in ``unet`` (the base class freezes the
        whole UNet, and adding an adapter freezes the other adapters; they keep theirs)."""
        if not isinstance(unet, torch.nn.Module):
            return {}
        return {n: p.requires_grad for n, p in unet.named_parameters() if ".lora_" in n}

    def _init_lora(self, unet, rank, lora_alpha, targets, others_flags: dict[str, bool]) -> dict:
        """Add this student's LoRA to ``unet`` (switched off); returns its options for ``adapter_options``."""
        from peft import LoraConfig

        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}.")
        alpha = float(rank if lora_alpha is None else lora_alpha)
        if alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}.")
        target_modules = _resolve_targets(targets)
        existing = set(getattr(unet, "peft_config", None) or {})
        if getattr(unet, "_condistill_lora_always_on", False):
            raise ValueError(
                "A LoRA student with gradient checkpointing already keeps its LoRA switched on in this UNet; "
                "build further LoRA students on a freshly loaded base."
            )
        # Several LoRA students may share one UNet (e.g. evaluating several adapters on one base):
        # each gets its own peft adapter name and switches only its own LoRA on in its forward.
        name, i = LORA_ADAPTER_NAME, 0
        while name in existing:
            i += 1
            name = f"{LORA_ADAPTER_NAME}_{i}"
        self.lora_adapter_name = name
        self.lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": target_modules}
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True)
        try:
            unet.add_adapter(config, adapter_name=self.lora_adapter_name)
        except ValueError as error:
            raise ValueError(f"Could not add LoRA layers for targets {target_modules} to this UNet: {error}") from error
        # LoRA weights live in float32 like the other adapters' (mixed precision casts at run time).
        for param_name, param in unet.named_parameters():
            if self._is_lora_param(param_name):
                param.data = param.data.float()
                param.requires_grad_(True)
            elif param_name in others_flags:
                param.requires_grad_(others_flags[param_name])
        self._lora_default_on = False
        self._set_lora(False)  # off by default: only the student's forward switches it on
        return {"rank": rank, "lora_alpha": alpha, "targets": target_modules}

    def _is_lora_param(self, name: str) -> bool:
        return ".lora_" in name and f".{self.lora_adapter_name}." in name

    def _lora_parameters(self) -> dict:
        """The LoRA parameters, named ``unet.*lora_A/B.<adapter name>*``."""
        return {f"unet.{n}": p for n, p in self.unet.named_parameters() if self._is_lora_param(n)}

    def _set_lora(self, enabled: bool) -> None:
        switch_lora(self.unet, self.lora_adapter_name if enabled else None)

    @contextlib.contextmanager
    def _lora_switched(self, enabled: bool):
        if enabled == self._lora_default_on:
            yield
            return
        self._set_lora(enabled)
        try:
            yield
        finally:
            self._set_lora(self._lora_default_on)

    def _forward_teacher(self, z, t, encoder_hidden_states):
        with self._lora_switched(False):
            return super()._forward_teacher(z, t, encoder_hidden_states)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet and adapter; the LoRA then stays switched on in the shared UNet.

        Checkpointed blocks are recomputed during ``backward``, after the student's forward has
        returned, so the LoRA must be on at that time too. From this call on, direct
        ``base.unet(...)`` calls include the LoRA; use ``student(..., use_adapter=False)`` for
        the teacher.
        """
        others = set(self.unet.peft_config) - {self.lora_adapter_name}
        if others:
            raise ValueError(
                f"This UNet also carries other LoRA adapters {sorted(others)}; gradient checkpointing keeps "
                "this student's LoRA switched on, so build it on a freshly loaded base."
            )
        super().enable_gradient_checkpointing()
        self._lora_default_on = True
        self.unet._condistill_lora_always_on = True
        self._set_lora(True)

    # ---- files ------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (no ``unet.`` prefix).

        This is the PEFT key format that diffusers' LoRA loaders read natively. (Passing it
        through ``convert_state_dict_to_diffusers`` would rename only the attention keys to
        ``lora.down/up``; with feed-forward or conv targets the mixed result loads incompletely.)
        """
        from peft.utils import get_peft_model_state_dict

        peft_sd = get_peft_model_state_dict(self.unet, adapter_name=self.lora_adapter_name)
        return {k: v.detach().clone().contiguous() for k, v in peft_sd.items()}

    def _save_lora(self, out_dir) -> dict[str, str]:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers LoRA format, its config in the metadata)."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            Path(out_dir),
            unet_lora_layers=self.lora_state_dict(),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
            unet_lora_adapter_metadata=dict(self.lora_config, target_modules=list(self.lora_config["target_modules"])),
        )
        return {"lora": LORA_WEIGHT_NAME}

    def file_state_dicts(self):
        """The other components' tensors and the LoRA file's (keys ``unet.<module>.lora_A/B.weight``, as saved)."""
        return {**super().file_state_dicts(), "lora": {f"unet.{k}": v for k, v in self.lora_state_dict().items()}}

    def _load_file_states(self, states) -> None:
        self._load_lora_state(states)
        super()._load_file_states(states)

    def check_weight_files(self, files) -> None:
        """The LoRA file's metadata (what diffusers' loader builds the LoRA from) must match the options."""
        from safetensors import safe_open

        path = files["lora"]
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
        saved_alpha, saved_targets = meta.get("unet.lora_alpha"), meta.get("unet.target_modules")
        alpha, targets = self.lora_config["lora_alpha"], sorted(self.lora_config["target_modules"])
        problems = []
        if saved_alpha is not None and float(saved_alpha) != float(alpha):
            problems.append(f"lora_alpha={saved_alpha} but this student has lora_alpha={alpha}")
        if saved_targets is not None and sorted(saved_targets) != targets:
            problems.append(f"target_modules={sorted(saved_targets)} but this student has {targets}")
        if problems:
            raise AdapterWeightsError(
                f"{path} was trained with {'; '.join(problems)}. Build the student with the saved options "
                "(load_student does this), or re-export the adapter if its files are damaged."
            )

    def _load_lora_state(self, states) -> None:
        from peft.utils import set_peft_model_state_dict

        peft_sd = {k[len("unet."):]: v for k, v in states["lora"].items()}
        result = set_peft_model_state_dict(self.unet, peft_sd, adapter_name=self.lora_adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
        if unexpected:
            check_state_dict_keys([], unexpected, "the LoRA file")

    @staticmethod
    def _load_lora_into(pipe, adapter_dir, weight_file: str) -> None:
        """Load the exported LoRA into ``pipe``'s UNet (a pipeline with ``load_lora_weights``), adapter name
        ``"condistill"``, not fused."""
        unet = pipe.unet
        if LORA_ADAPTER_NAME in (getattr(unet, "peft_config", None) or {}):
            raise ValueError(
                f"This pipeline's UNet already carries a LoRA named {LORA_ADAPTER_NAME!r} (a condistill "
                f"adapter was loaded before); remove it with pipe.unet.delete_adapters({LORA_ADAPTER_NAME!r}) "
                "or start from a fresh pipeline."
            )
        pipe.load_lora_weights(adapter_dir, weight_name=weight_file, adapter_name=LORA_ADAPTER_NAME,
                               use_safetensors=True)


class LoRAStudent(UNetLoRA, T2IAdapterFeatures, Student):
    """Frozen UNet with trainable LoRA layers + a trainable light T2I-Adapter for the condition.

    Options (keyword arguments of :func:`~condistill.adapters.build_student`):
        vae_scale_factor: pixels per latent pixel (SD: 8); required unless built from a Base.
        rank: LoRA rank (default 4).
        lora_alpha: LoRA alpha (default = rank, i.e. scale 1).
        targets: ``"attention"`` (default), ``"attention_ff"``, ``"all"`` or a list of module names.
        condition_adapter: ``"auto"`` (default), ``"light_adapter"``, ``"full_adapter"`` or
            ``"full_adapter_xl"`` (SDXL).
        adapter_num_res_blocks: residual blocks per T2I-Adapter block (default: 4 for the light
            adapter, the layout A1111's and ComfyUI's adapter loaders build; 2 for the full ones).
    """

    kind = "lora"
    weight_components = {"lora": LORA_WEIGHT_NAME, **WEIGHT_COMPONENT}

    def __init__(
        self,
        unet,
        condition_channels: int,
        vae_scale_factor: int | None = None,
        rank: int = 4,
        lora_alpha: float | None = None,
        targets: str | Sequence[str] = "attention",
        condition_adapter: str = "auto",
        adapter_num_res_blocks: int | None = None,
    ):
        others_flags = self._other_lora_flags(unet)
        super().__init__(unet, condition_channels, vae_scale_factor)
        if condition_adapter == "auto":
            condition_adapter = resolve_adapter_type(unet, "auto", ("light_adapter", *AUTO_ADAPTER_TYPES))
            logger.info("LoRA student: condition enters through a %s", condition_adapter)
        self.adapter = self._trainable(
            make_t2i_adapter(unet, condition_channels, vae_scale_factor, condition_adapter, adapter_num_res_blocks)
        )
        lora = self._init_lora(unet, rank, lora_alpha, targets, others_flags)
        self.adapter_options = {
            "condition_channels": condition_channels,
            "vae_scale_factor": vae_scale_factor,
            **lora,
            "condition_adapter": condition_adapter,
            "adapter_num_res_blocks": int(self.adapter.config.num_res_blocks),
        }

    def _adapter_modules(self):
        return {"adapter": self.adapter}

    def trainable_named_parameters(self):
        """LoRA parameters (``unet.*lora_A/B.condistill*``) and T2I-Adapter parameters (``adapter.*``)."""
        out = self._lora_parameters()
        out.update(super().trainable_named_parameters())
        return out

    def _forward_adapter(self, z, t, encoder_hidden_states, features):
        # The LoRA is switched on only inside the student's own forward, so direct calls of the
        # shared UNet (e.g. ``base.unet(...)`` as the teacher elsewhere) stay the plain teacher.
        with self._lora_switched(True):
            return self._unet_with_features(z, t, encoder_hidden_states, features)

    # ---- files ------------------------------------------------------------------------
    def save_weights(self, out_dir):
        """Write ``pytorch_lora_weights.safetensors`` (diffusers LoRA format) and ``t2i_adapter/``."""
        files = self._save_lora(out_dir)
        files.update(self._save_adapter_folder(Path(out_dir)))
        return files

    @classmethod
    def diffusers_snippet(cls, base, weight_files, family=None):
        family = base_family(family)
        lora = weight_files.get("lora", LORA_WEIGHT_NAME)
        pipeline = family.pipelines["adapter"]
        if hasattr(family.pipeline_class("adapter"), "load_lora_weights"):  # SDXL's adapter pipeline loads LoRAs
            return cls.adapter_snippet(weight_files, family) + [
                f'pipe = {pipeline}.from_pretrained("{base}", adapter=adapter)',
                f'pipe.load_lora_weights(ADAPTER, weight_name="{lora}")',
            ]
        # StableDiffusionAdapterPipeline has no LoRA loader: load it on the plain pipeline, then share its parts
        return cls.adapter_snippet(weight_files, family) + [
            f"from diffusers import {family.pipelines['text']}",
            f'sd = {family.pipelines["text"]}.from_pretrained("{base}", safety_checker=None)',
            f'sd.load_lora_weights(ADAPTER, weight_name="{lora}")',
            f"pipe = {pipeline}(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,",
            "                                      unet=sd.unet, scheduler=sd.scheduler, adapter=adapter,",
            "                                      safety_checker=None, feature_extractor=None,",
            "                                      requires_safety_checker=False)",
        ]

    @classmethod
    def stock_pipeline(cls, adapter_dir, weight_files, components, dtype, family=None):
        """The family's T2I-Adapter pipeline whose UNet carries the LoRA (adapter name ``"condistill"``, not fused).

        ``StableDiffusionAdapterPipeline`` has no ``load_lora_weights`` of its own, so the LoRA
        file is loaded by the family's stock text-to-image pipeline (``StableDiffusionPipeline``,
        ``StableDiffusionXLPipeline``) ``load_lora_weights`` on a pipeline sharing the same components.
        """
        family = base_family(family, components["unet"])
        adapter = cls.load_stock_adapter(adapter_dir, weight_files, dtype)
        cls._load_lora_into(family.pipeline("text", components), adapter_dir, weight_files["lora"])
        return cls.adapter_pipeline(components, adapter, family)


register_adapter("lora", LoRAStudent)
