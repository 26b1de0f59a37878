import shutil

import pytest

from helpers import make_tiny_base, tiny_run_config


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory):
    """One two-step edge ControlNet run on a tiny base, shared by the publish tests (copy it before changing it)."""
    import torch

    from condistill.training.loop import distill

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = str(make_tiny_base(tmp_path_factory.mktemp("publish-base")))
        out = tmp_path_factory.mktemp("publish-run") / "edge"
        distill(tiny_run_config(base, out, checkpoint_every=1, keep_checkpoints=1))
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.fixture
def run_copy(trained_export, tmp_path):
    """A private copy of the shared run folder."""
    return shutil.copytree(trained_export, tmp_path / "edge")
