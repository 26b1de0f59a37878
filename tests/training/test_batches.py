"""The global batch of each micro-step and each process's part of it."""
from __future__ import annotations

import pytest

from condistill.training.batches import Part, StepBatchSampler, batch_length, start_processes


def test_process_parts_split_the_one_process_batch_of_the_global_size():
    one = StepBatchSampler(10, 6, seed=3, start=0, stop=5)
    parts = [StepBatchSampler(10, 2, seed=3, start=0, stop=5, processes=3, rank=r) for r in range(3)]
    for m, whole in enumerate(one):
        split = [p.batch(m) for p in parts]
        assert sum(split, []) == whole  # rank r holds items [2r, 2r + 2) of the global batch
    # a resumed sampler gives the same parts, and every process stops after the same micro-step
    later = StepBatchSampler(10, 2, seed=3, start=2, stop=5, processes=3, rank=1)
    assert list(later) == list(parts[1])[2:]
    assert {len(p) for p in parts} == {5}


def test_no_item_is_in_two_processes_within_an_epoch():
    parts = [StepBatchSampler(12, 2, seed=0, start=0, stop=3, processes=2, rank=r) for r in range(2)]
    seen = [i for p in parts for batch in p for i in batch]
    assert sorted(seen) == list(range(12))


def test_part_checks_its_rank_and_slices():
    assert Part(2, 1).take(list("abcd"), 2) == ["c", "d"] and Part(2, 1).global_size(2) == 4
    with pytest.raises(ValueError, match="0 <= rank < processes"):
        Part(2, 2)


def test_batch_length_reads_pixels_or_latents():
    import torch

    assert batch_length({"latents": torch.zeros(3, 4, 2, 2), "caption": ["", "", ""]}) == 3
    assert batch_length({"pixel_values": torch.zeros(2, 3, 4, 4)}) == 2


def test_processes_that_did_not_join_one_group_are_refused(monkeypatch):
    from accelerate import PartialState

    PartialState()  # this test process: one process, already started
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="did not join one process group.*torchrun --nproc_per_node 2"):
        start_processes()


def test_sharded_setups_are_refused_before_any_model_loads():
    from accelerate.utils import DistributedType

    from condistill.training.batches import require_data_parallel

    for ok in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        require_data_parallel(ok)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"{sharded.value} is not supported.*examples/accelerate/ddp.yaml"):
            require_data_parallel(sharded)
