"""Shared fixtures of the solver tests (`test_solvers.py`, `test_failures.py`)."""

import jax
import pytest


@pytest.fixture
def enable_x64():
    """Run one test with 64-bit types enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield
