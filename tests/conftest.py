"""Shared fixtures of the tests.

A test module marked `pytest.mark.strict_promotion` runs each of its tests with
`jax_numpy_dtype_promotion="strict"`, as optimistix and lineax run their own suites
(and as some users run): the solvers, linear solvers, adjoints and the DEQ layer must
never rely on implicit promotion between dtypes.
"""

import os

import jax
import pytest


# The MNIST command line and the benchmark runners keep what they compile on disk
# (`fixedpoint_deq.mnist.compile_cache`); tests that call them must not fill the user's
# cache, nor change how later tests in the same process compile. (Set it to a
# directory to use one anyway; tests of the cache name their own.)
os.environ.setdefault("FIXEDPOINT_COMPILATION_CACHE", "off")


@pytest.fixture(scope="session", autouse=True)
def _one_blas_thread():
    """One BLAS thread for NumPy/SciPy in every test, as the benchmarks' tests pin it
    (`benchmarks.harness.pin_threads`): a test file then sees the same rounding of
    NumPy's factorisations (the problems' matrices) whichever files its worker ran
    before it."""
    from benchmarks.harness import pin_threads

    pin_threads(1)
    yield


@pytest.fixture
def enable_x64():
    """Run one test with 64-bit types enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
    """Strict dtype promotion for the tests marked `strict_promotion`."""
    if request.node.get_closest_marker("strict_promotion") is None:
        yield
    else:
        with jax.numpy_dtype_promotion("strict"):
            yield
