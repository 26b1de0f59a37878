"""The global batch of every micro-step, and the part of it each process trains on.

A run on ``N`` processes with ``--batch-size B`` trains on a *global* batch of ``B * N`` items per
micro-step. The global batch of micro-step ``m`` holds the ``B * N`` data positions
``m * B * N ...`` of the seeded epoch permutations (:class:`StepBatchSampler`), and process ``r``
takes the slice ``[r * B, (r + 1) * B)`` of it (:class:`Part`). The objective draws its randoms
for the whole global batch and keeps the same slice, so ``N`` processes with batch ``B`` compute
what one process computes with batch ``B * N``: only the float rounding of the sums differs.

:func:`start_processes` is where the process group starts: it makes sure a ``torchrun`` launch on
a machine without GPUs runs on CPU over gloo instead of as ``N`` unrelated single-process runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import Sampler

from condistill.seeding import BATCH_ORDER_STRIDE, torch_generator

__all__ = ["Part", "StepBatchSampler", "batch_length", "require_data_parallel", "start_processes"]


@dataclass(frozen=True)
class Part:
    """Process ``rank`` of ``processes`` trains on items ``[rank * B, (rank + 1) * B)`` of each global batch."""

    processes: int = 1
    rank: int = 0

    def __post_init__(self):
        if self.processes < 1 or not 0 <= self.rank < self.processes:
            raise ValueError(f"process {self.rank} of {self.processes}: need 0 <= rank < processes")

    def global_size(self, local: int) -> int:
        """``B * N``: the global batch of a local batch of ``local`` items."""
        return local * self.processes

    def take(self, values: torch.Tensor | Sequence[Any], local: int):
        """This process's ``local`` items of ``values``, drawn for the global batch (first axis)."""
        return values[self.rank * local:(self.rank + 1) * local]


class StepBatchSampler(Sampler):
    """Index batches for optimizer micro-steps ``start, start+1, ...`` (one batch per micro-step).

    Epoch ``e`` visits the data in a permutation seeded by ``(seed, e)``, so the batch of a
    given micro-step does not depend on where the run was (re)started. With ``processes > 1``
    the global batch of micro-step ``m`` is the ``batch_size * processes`` positions a one-process
    sampler of that batch size gives, and process ``rank`` gets its slice of it (:class:`Part`).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, processes: int = 1,
                 rank: int = 0):
        if size < 1:
            raise ValueError("cannot draw batches from an empty dataset")
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop
        self.part = Part(processes, rank)
        self._perm: tuple[int, torch.Tensor] | None = None  # the permutation of the epoch last read

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.size, generator=torch_generator(self.seed, epoch,
                                                                                   BATCH_ORDER_STRIDE)))
        return self._perm[1]

    def global_batch(self, micro_step: int) -> list[int]:
        """The item indices of micro-step ``micro_step``'s global batch (every process's part)."""
        size = self.part.global_size(self.batch_size)
        out = []
        for pos in range(micro_step * size, (micro_step + 1) * size):
            epoch, i = divmod(pos, self.size)
            out.append(int(self._permutation(epoch)[i]))
        return out

    def batch(self, micro_step: int) -> list[int]:
        """This process's part of :meth:`global_batch`."""
        return self.part.take(self.global_batch(micro_step), self.batch_size)

    def __iter__(self):
        return (self.batch(m) for m in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def batch_length(batch: dict) -> int:
    """The number of items in a training batch (pixels or cached latents, whichever it carries)."""
    for key in ("latents", "pixel_values", "conditioning"):
        if key in batch:
            return int(batch[key].shape[0])
    return len(batch["caption"])


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _no_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def start_processes():
    """The run's :class:`accelerate.PartialState` (the process group starts here).

    ``ACCELERATE_USE_CPU=true``, or a multi-process launch (``WORLD_SIZE > 1``) on a machine
    without an accelerator, runs on CPU over gloo.

    Raises:
        RuntimeError: the launcher started several processes but they did not join one group
            (each would train alone and write the same folder).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = _launched_processes()
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (launched > 1 and _no_accelerator())
    state = PartialState(cpu=cpu)
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but they did not join one process group "
            f"(accelerate sees {state.num_processes}, {state.distributed_type}); launch with `torchrun "
            f"--nproc_per_node {launched} ...` or `accelerate launch --num_processes {launched} ...` and set "
            "ACCELERATE_USE_CPU=true to train on CPU")
    return state


#: accelerate's distributed types the loop supports: one process, or data-parallel (DDP) processes
DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                 "MULTI_HPU", "MULTI_NEURON")


def require_data_parallel(distributed_type) -> None:
    """Refuse the accelerate set-ups the loop does not support (FSDP, DeepSpeed, ...) before any model loads.

    The loop swaps the EMA weights into the adapter's parameters and saves the optimizer state
    from the main process: FSDP shards those parameters and DeepSpeed ZeRO shards that state,
    so a run would fail or, worse, resume from a part of the optimizer state.
    """
    name = getattr(distributed_type, "value", str(distributed_type))
    if name not in DATA_PARALLEL:
        raise ValueError(f"accelerate's distributed_type {name} is not supported by condistill, which trains "
                         "data-parallel (DDP): FSDP would shard the adapter weights the EMA is swapped into and "
                         "DeepSpeed ZeRO the optimizer state a checkpoint saves. Launch with `accelerate launch "
                         "--config_file examples/accelerate/ddp.yaml` (or `--multi_gpu`), or `torchrun`")
