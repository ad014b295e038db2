"""Fixtures shared by the test files."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded NumPy generator: a test sees the same numbers on every run."""
    return np.random.default_rng(20240521)
