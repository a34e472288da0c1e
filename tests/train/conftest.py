"""Fixtures of the train tests."""

import pytest

from klingjax.sharding.mesh import make_mesh


@pytest.fixture(scope="module")
def mesh():
    """The 8 fake CPU devices as a data-parallel mesh."""
    return make_mesh((-1, 1, 1, 1))
