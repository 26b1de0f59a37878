"""Exponential moving average of the trainable (adapter) parameters, kept by name.

The EMA student is used by the target and ODE branches of the CoDi loss and is what gets
exported.  It must be the *current* EMA, never the adapter's initial weights.  The training
branches bind it in place of the live parameter objects with :meth:`EMA.bound` (no copy, and a
graph built from the online weights stays valid); export and validation copy it in with
:meth:`EMA.swapped_in`::

    ema = EMA.from_module(adapter)                        # trainable parameters only
    ...
    loss.backward(); opt.step(); ema.update(dict(adapter.named_parameters()), decay=0.95)
    with ema.swapped_in(adapter):                          # adapter now computes with EMA weights
        target = adapter_forward(...)
    # online weights are back here, bit-exact, even if the block raised

Names are those of ``module.named_parameters()``; wrap/unwrap (DDP, ``torch.compile``) the same
way when creating and when swapping.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copies ``theta_ema`` of named parameters, updated as ``theta_ema <- decay * theta_ema + (1 - decay) * theta``.

    Args:
        params: mapping ``name -> tensor`` (e.g. ``{n: p for n, p in module.named_parameters() if
            p.requires_grad}``).  The shadows are detached copies (same shape, device, dtype).
    """

    def __init__(self, params: Mapping[str, torch.Tensor]):
        if not isinstance(params, Mapping):
            raise TypeError(
                "EMA expects a mapping name -> tensor, e.g. dict(module.named_parameters()); "
                f"got {type(params).__name__}. Use EMA.from_module(module) for a module."
            )
        if len(params) == 0:
            raise ValueError(
                "EMA got no parameters: nothing is trainable. Check that the adapter's parameters have "
                "requires_grad=True (a frozen pretrained adapter would silently train nothing)."
            )
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"EMA parameter {name!r} is a {type(p).__name__}, not a tensor.")
            self.shadow[name] = p.detach().clone()

    @classmethod
    def from_module(cls, module: nn.Module) -> "EMA":
        """EMA over ``module``'s trainable parameters (``requires_grad=True``), keyed by their names."""
        return cls({n: p for n, p in module.named_parameters() if p.requires_grad})

    def __len__(self) -> int:
        return len(self.shadow)

    def _check_names(self, names: set[str], what: str) -> None:
        missing = sorted(set(self.shadow) - names)
        unexpected = sorted(names - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"{what} does not match the EMA parameters: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}. Use the same (un)wrapped module and the same "
                "trainable-parameter filter as when the EMA was created."
            )

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], decay: float) -> None:
        """``theta_ema <- decay * theta_ema + (1 - decay) * theta`` for every name (no grad).

        Args:
            params: mapping ``name -> current online tensor`` holding every name given at
                construction; extra names (e.g. frozen base parameters) are ignored.
            decay: in ``[0, 1]``; 0 copies the online weights, 1 keeps the EMA unchanged.
        """
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}.")
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise KeyError(
                f"params lacks EMA parameters {missing[:10]}{' ...' if len(missing) > 10 else ''}; pass "
                "dict(module.named_parameters()) of the same (un)wrapped module that created the EMA."
            )
        for name, shadow in self.shadow.items():
            p = params[name].detach()
            if p.shape != shadow.shape:
                raise ValueError(f"EMA parameter {name!r} has shape {tuple(shadow.shape)}, got {tuple(p.shape)}.")
            shadow.lerp_(p.to(device=shadow.device, dtype=shadow.dtype), 1.0 - decay)

    def _module_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        live = dict(module.named_parameters())
        missing = sorted(set(self.shadow) - set(live))
        if missing:
            raise KeyError(
                f"module has no parameters named {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                "pass the module whose named_parameters() created this EMA (same wrapping)."
            )
        return {name: live[name] for name in self.shadow}

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s parameters (by name) with the EMA values (e.g. for export)."""
        for name, p in self._module_params(module).items():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA values into ``module``'s live parameters; restore the online ones on exit.

        The online values are restored bit-exactly, also when the block raises.  Do not step an
        optimizer inside the block.
        """
        live = self._module_params(module)
        with torch.no_grad():
            backup = {name: p.detach().clone() for name, p in live.items()}
            for name, p in live.items():
                p.copy_(self.shadow[name])
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in live.items():
                    p.copy_(backup[name])

    @contextmanager
    def bound(self, module: nn.Module) -> Iterator[nn.Module]:
        """Like :meth:`swapped_in`, but by swapping parameter objects, not by copying values into them.

        Inside the block each named parameter of ``module`` is a frozen parameter sharing the EMA
        tensor's storage; on exit the original parameter objects are put back.  The online tensors
        are never written, so an autograd graph built from them before the block (the online
        branch) still backpropagates correctly after it, and the optimizer and any distributed
        wrapper keep the objects they hold.  Use it for no-grad forwards only.
        """
        live = self._module_params(module)  # the same names check as swapped_in
        slots = {}
        for name in live:
            path, _, attr = name.rpartition(".")
            slots[name] = (module.get_submodule(path) if path else module, attr)
        try:
            for name, (owner, attr) in slots.items():
                owner._parameters[attr] = nn.Parameter(self.shadow[name], requires_grad=False)
            yield module
        finally:
            for name, (owner, attr) in slots.items():
                owner._parameters[attr] = live[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous detached copies ``name -> tensor`` (safetensors-friendly)."""
        return {name: t.detach().clone().contiguous() for name, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load EMA values saved by :meth:`state_dict`; names and shapes must match exactly."""
        self._check_names(set(state_dict), "state_dict")
        for name, shadow in self.shadow.items():
            value = state_dict[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor.")
            if value.shape != shadow.shape:
                raise ValueError(
                    f"state_dict entry {name!r} has shape {tuple(value.shape)}, expected {tuple(shadow.shape)}."
                )
            shadow.copy_(value.to(device=shadow.device, dtype=shadow.dtype))
