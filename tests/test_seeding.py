"""condistill.seeding: every random stream is a pure function of its keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from condistill import seeding


def test_numpy_streams_mix_the_whole_key_tuple():
    a = seeding.numpy_rng(3, 1, 7).integers(1 << 30, size=4)
    assert np.array_equal(a, seeding.numpy_rng(3, 1, 7).integers(1 << 30, size=4))
    # the same stream numpy builds from SeedSequence([3, 1, 7]) (what scenes and conditions used before)
    assert np.array_equal(a, np.random.default_rng([3, 1, 7]).integers(1 << 30, size=4))
    assert not np.array_equal(a, seeding.numpy_rng(3, 7, 1).integers(1 << 30, size=4))


def test_derive_seed_is_stable_and_bounded():
    assert seeding.derive_seed(7, 3) == int(np.random.SeedSequence([7, 3]).generate_state(1)[0] >> 1)
    assert seeding.derive_seed(0, 1) != seeding.derive_seed(1, 0)
    assert 0 <= seeding.derive_seed(2**40, 5) < 2**31


def test_torch_streams_are_strided_seeds():
    g = seeding.torch_generator(2, 5, seeding.STEP_STRIDE)
    expected = torch.Generator().manual_seed(2 * 1_000_003 + 5)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=expected))
    assert seeding.BATCH_ORDER_STRIDE == 7919


@pytest.mark.parametrize("keys", [(), (-1,), (1.5,), (True,)])
def test_bad_keys_are_refused(keys):
    with pytest.raises(ValueError, match="seed keys must be non-negative integers|at least one key"):
        seeding.numpy_rng(*keys)


def test_text_key_is_crc32():
    import zlib

    assert seeding.text_key("a/b.png") == zlib.crc32(b"a/b.png")


def test_torch_seed_may_be_negative_like_manual_seed():
    g = seeding.torch_generator(-3)
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=torch.Generator().manual_seed(-3)))
    with pytest.raises(ValueError, match="must be an integer"):
        seeding.torch_generator(1.5)
