"""pytest set-up of the benchmarks.

Two modes, chosen by pytest-benchmark's own switch:

- **smoke** (benchmarks disabled, the default through pyproject's
  ``--benchmark-disable``): each benchmark runs once on the small ``"smoke"`` grid of
  `benchmarks.problems` and its convergence is asserted (no timing). The ``"default"`` and
  ``"full"`` problems are collected too, marked ``slow`` (``pytest -m slow``).
- **timed** (``--benchmark-only`` or ``--benchmark-enable``): the ``"default"`` grid
  is timed, grouped by problem; the ``"full"`` grid's extra problems and solver
  settings are marked ``slow`` (add ``-m slow`` or ``-m ""`` to run them). Save with
  ``--benchmark-autosave`` / ``--benchmark-save=NAME`` and compare runs with
  ``pytest-benchmark compare`` or ``--benchmark-compare``.

``--benchmark-only`` implies ``--benchmark-enable`` here, so that
``pytest benchmarks/ --benchmark-only`` works although pyproject's addopts contain
``--benchmark-disable`` (pytest-benchmark refuses the two together otherwise).
"""

import os

import jax
import pytest

from . import harness, peers, problems


# The MNIST command line and the benchmark runners keep what they compile on disk
# (`fixedpoint_deq.mnist.compile_cache`); tests that call them must not fill the user's
# cache, nor change how later tests in the same process compile. (Set it to a
# directory to use one anyway; tests of the cache name their own.)
os.environ.setdefault("FIXEDPOINT_COMPILATION_CACHE", "off")


# The compilations of the JAX solvers, shared by every benchmark test of the session
# (held in pytest's per-session stash, not in a module).
_CACHE = pytest.StashKey[peers.CompileCache]()


def _compile_cache(config) -> peers.CompileCache:
    if _CACHE not in config.stash:
        config.stash[_CACHE] = peers.CompileCache()
    return config.stash[_CACHE]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) pytest_configure builds its session.
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True


def _timed(config) -> bool:
    disabled = config.getoption("benchmark_disable", default=False)
    return not disabled or config.getoption("benchmark_enable", default=False)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    timed = _timed(metafunc.config)
    solver_grid = "default"
    if timed:
        fast_specs = problems.specs("default")
        slow_specs = [s for s in problems.specs("full") if "default" not in s.grids]
    else:
        fast_specs = problems.specs("smoke")
        slow_specs = problems.specs("full")
    cache = _compile_cache(metafunc.config)
    default_solvers = peers.solvers(solver_grid, cache=cache)
    default_names = {a.name for a in default_solvers}
    extra_solvers = [a for a in peers.solvers("full", cache=cache) if a.name not in default_names]
    params = []
    for specs, slow in ((fast_specs, False), (slow_specs, True)):
        for spec in specs:
            for adapter in default_solvers + extra_solvers:
                marks = [pytest.mark.slow] if slow or adapter.name not in default_names else []
                params.append(
                    pytest.param((spec, adapter), id=f"{spec.name}|{adapter.name}", marks=marks)
                )
    metafunc.parametrize("case", params)


@pytest.fixture(scope="session")
def compile_cache(request) -> peers.CompileCache:
    """The session's `peers.CompileCache` (the one the parametrised benchmarks use)."""
    return _compile_cache(request.config)


@pytest.fixture(scope="session")
def pinned_threads():
    """One BLAS/OpenMP thread for NumPy/SciPy/torch (see `harness.pin_threads`).
    Used by the comparison tests only (`pytestmark` of `test_forward.py`)."""
    harness.pin_threads(1)
    yield


@pytest.fixture
def x64():
    """float64 for one comparison test (scoped: other benchmarks, e.g. the float32
    gradient benchmarks, and the rest of the test suite are not affected)."""
    with jax.enable_x64(True):
        yield
