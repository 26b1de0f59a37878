import pytest

from helpers import make_tiny_base


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random base folder (as a string, the way a config names it), built once per module."""
    return str(make_tiny_base(tmp_path_factory.mktemp("base")))
