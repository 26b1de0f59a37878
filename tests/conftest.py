import pytest
import torch

from helpers import make_tiny_base

# The test models are tiny: one thread is faster than several competing ones.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    """A tiny random Stable-Diffusion-layout base folder, built once per test module."""
    return make_tiny_base(tmp_path_factory.mktemp("base"))
