"""Solves of the standard nonlinear systems (`benchmarks.nonlinear`, problems of
`benchmarks.problems.mgh`), timed with pytest-benchmark and grouped by problem.

A few representative problems, each with our root finders (every one `fixedpoint`
exports, as `nonlinear.our_solvers` finds them, but plain iteration, which solves
none of these), optimistix's Newton and SciPy's hybr, under the protocol of
`benchmarks.nonlinear` (float64, rtol = atol = 1e-10, at most 10,000 steps). The JAX
solves are compiled before they are timed. In smoke mode (the default test run) each
solve runs once and must reach max|g(y)| <= 1e-6; the evaluations go to the
benchmark's ``extra_info``. One problem runs by default, two more with ``-m slow``. The whole table is ``python -m benchmarks.nonlinear``.

Case ids are ``<problem>|<solver>``: select with e.g. ``-k "chandrasekhar and Broyden"``.
"""

import jax
import pytest

from . import nonlinear
from .problems import mgh


pytestmark = pytest.mark.usefixtures("pinned_threads", "x64")

# Dense (n = 10), and marked slow: small (n = 2) and banded (n = 10). Every solver
# below solves them.
PROBLEMS = ("chandrasekhar",)
SLOW_PROBLEMS = ("dennis_schnabel", "broyden_tridiagonal")

# Ours but plain iteration (`fp.Neumann` diverges on these), then the references.
SOLVERS = [
    *(name for name in nonlinear.our_solvers() if name != "fp.Neumann"),
    "optx.Newton",
    "scipy.hybr",
]


def _prepare(problem: mgh.MGHProblem, solver: str):
    """``() -> (y, evaluations)`` for one solve, compiled (JAX) or ready (SciPy)."""
    if solver.startswith("scipy."):
        return nonlinear.scipy_solve(problem, solver.removeprefix("scipy."))
    if solver in nonlinear.OPTX_SOLVERS:
        factory, count = nonlinear.OPTX_SOLVERS[solver], nonlinear.optx_evaluations
    else:
        factory = nonlinear.our_solvers()[solver]
        count = lambda sol, n: nonlinear.our_evaluations(sol)
    solve = nonlinear.jax_solve(problem, factory(nonlinear.TOL, nonlinear.TOL))

    def run():
        sol = jax.block_until_ready(solve())
        return sol.value, count(sol, problem.n)

    return run


CASES = [
    pytest.param(p, s, id=f"{p}|{s}", marks=[pytest.mark.slow] if p in SLOW_PROBLEMS else [])
    for p in PROBLEMS + SLOW_PROBLEMS
    for s in SOLVERS
]


@pytest.mark.parametrize("problem, solver", CASES)
def test_nonlinear_system(benchmark, problem, solver):
    benchmark.group = f"nonlinear {problem}"
    p = mgh.by_name(problem)
    run = _prepare(p, solver)
    run()  # compiles the JAX solves (and the SciPy function) outside the timing
    y, evaluations = benchmark(run)
    residual = p.residual(y)
    benchmark.extra_info.update(evaluations=evaluations, residual=residual)
    assert residual <= nonlinear.SOLVED, (evaluations, residual)
