"""The 23 standard nonlinear systems (`benchmarks.problems.mgh`, the Moré-Garbow-
Hillstrom problems as NonlinearProblemLibrary.jl defines them): their definitions, and
which of them Anderson and Broyden solve under the protocol of `benchmarks.nonlinear`
(float64, rtol = atol = 1e-10, at most 10,000 steps, solved when max|g(y)| <= 1e-6 at
the returned point).

The solves use the padded form (`mgh.padded`): all 23 problems as one problem of size
10 selected by an index, which `jax.lax.switch` reads at run time, so one compilation
per solver covers them all (solved one after the other: a `jax.vmap` over the index
would solve them in one call, but compiles for twice as long). Its padding starts at
0 with ``g_i = y_i`` there, so it stays exactly 0 and does not change the iteration:
the outcomes and evaluation counts are those of the unpadded runner
(``python -m benchmarks.nonlinear``).

Some outcomes depend on rounding, though. On a few problems a solver wanders before it
finds (or misses) a root, and differences in the last bit (a batch, or another length
of the vectors, makes XLA sum in another order) grow until they decide the outcome.
Measured from 20 starts ``y0 + e`` near the standard one, ``|e_i|`` 1e-15 to 1e-12
times ``max(|y0_i|, 1)``: Anderson, which misses the helical valley from ``y0``,
solves it from 15 of them (in 63-183 evaluations), and needs 242-247 evaluations for
Wood; Broyden solves Wood from 4 of them, Watson from 2 and Hammarling 2x2 from 9
(from ``y0`` none of the three), and misses the helical valley from 2 (solved from
``y0``). Those outcomes and counts are not pinned (`ROUNDING`); every other outcome
and count was the same from all 21 starts.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp
from benchmarks import nonlinear
from benchmarks.problems import mgh


# Solvers and problems never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


NAMES = tuple(p.name for p in mgh.MGH_PROBLEMS)

# NonlinearProblemLibrary.jl's sizes, in its order.
LIBRARY_SIZES = (10, 4, 2, 4, 3, 2, 2, 10, 10, 10, 10, 10, 10, 10, 4, 9, 2, 2, 2, 1, 2, 2, 10)

SOLVERS = {
    "anderson": lambda: fp.Anderson(rtol=nonlinear.TOL, atol=nonlinear.TOL),
    "broyden": lambda: fp.Broyden(rtol=nonlinear.TOL, atol=nonlinear.TOL),
    "newton_krylov": lambda: fp.NewtonKrylov(rtol=nonlinear.TOL, atol=nonlinear.TOL),
    "polyalgorithm": lambda: fp.Polyalgorithm(rtol=nonlinear.TOL, atol=nonlinear.TOL),
}

# Evaluations of the unpadded runner (`python -m benchmarks.nonlinear`), None where
# the problem is not solved.
EVALUATIONS = {
    "anderson": dict(
        rosenbrock=None,
        powell_singular=41,
        powell_badly_scaled=42,
        wood=242,
        helical_valley=None,
        watson=20,
        chebyquad=21,
        brown_almost_linear=18,
        discrete_boundary_value=133,
        discrete_integral_equation=9,
        trigonometric=39,
        variably_dimensioned=43,
        broyden_tridiagonal=25,
        broyden_banded=48,
        hammarling_2x2=48,
        hammarling_3x3=49,
        dennis_schnabel=14,
        sample_18=11,
        sample_19=57,
        scalar=43,
        freudenstein_roth=65,
        boggs=44,
        chandrasekhar=10,
    ),
    "broyden": dict(
        rosenbrock=None,
        powell_singular=100,
        powell_badly_scaled=66,
        wood=None,
        helical_valley=127,
        watson=None,
        chebyquad=13,
        brown_almost_linear=14,
        discrete_boundary_value=77,
        discrete_integral_equation=11,
        trigonometric=15,
        variably_dimensioned=29,
        broyden_tridiagonal=20,
        broyden_banded=28,
        hammarling_2x2=None,
        hammarling_3x3=None,
        dennis_schnabel=20,
        sample_18=19,
        sample_19=37,
        scalar=27,
        freudenstein_roth=None,
        boggs=24,
        chandrasekhar=12,
    ),
    "newton_krylov": dict(
        rosenbrock=565,
        powell_singular=95,
        powell_badly_scaled=53,
        wood=55,
        helical_valley=31,
        watson=24,
        chebyquad=16,
        brown_almost_linear=21,
        discrete_boundary_value=30,
        discrete_integral_equation=13,
        trigonometric=60,
        variably_dimensioned=29,
        broyden_tridiagonal=38,
        broyden_banded=28,
        hammarling_2x2=39,
        hammarling_3x3=42,
        dennis_schnabel=15,
        sample_18=19,
        sample_19=47,
        scalar=13,
        freudenstein_roth=87,
        boggs=10,
        chandrasekhar=15,
    ),
    "polyalgorithm": dict(
        rosenbrock=616,
        powell_singular=41,
        powell_badly_scaled=42,
        wood=631,
        helical_valley=131,
        watson=20,
        chebyquad=21,
        brown_almost_linear=18,
        discrete_boundary_value=133,
        discrete_integral_equation=9,
        trigonometric=39,
        variably_dimensioned=43,
        broyden_tridiagonal=25,
        broyden_banded=48,
        hammarling_2x2=48,
        hammarling_3x3=49,
        dennis_schnabel=14,
        sample_18=11,
        sample_19=57,
        scalar=43,
        freudenstein_roth=65,
        boggs=44,
        chandrasekhar=10,
    ),
}

# Outcomes (solved or not) that depend on rounding, and counts that do (see the module
# docstring): neither is pinned for these.
ROUNDING = {
    "anderson": dict(outcome={"helical_valley"}, count={"wood"}),
    "broyden": dict(outcome={"wood", "watson", "hammarling_2x2", "helical_valley"}, count=set()),
    "newton_krylov": dict(outcome=set(), count=set()),
    # (Anderson first: its rounding-dependent cells hand over at another point.)
    "polyalgorithm": dict(outcome=set(), count={"wood", "helical_valley"}),
}


_PADDED = mgh.padded()
# The padded function at a batch of points (23, 10), and every unpadded function at
# its own point: one compilation each.
_padded_g = jax.jit(jax.vmap(_PADDED.fn))
_unpadded_g = jax.jit(lambda ys: tuple(p.fn(y) for p, y in zip(mgh.MGH_PROBLEMS, ys)))


def _max_abs(g: np.ndarray, sizes=_PADDED.sizes) -> np.ndarray:
    """max|g_i| over the first n entries of each row of a padded batch."""
    return np.array([np.max(np.abs(g[i, :n])) for i, n in enumerate(sizes)])


def test_problem_definitions():
    """23 problems in the library's order, with its sizes; each ``y0`` a float64 vector
    of that size at which ``g`` is finite, and the padded starting points zero beyond
    each size."""
    problems = mgh.MGH_PROBLEMS
    assert [p.number for p in problems] == list(range(1, 24))
    assert len(set(NAMES)) == 23
    assert tuple(p.n for p in problems) == LIBRARY_SIZES
    for p in problems:
        assert p.y0.dtype == np.float64 and p.y0.shape == (p.n,), p.name
        assert p.root is None or (p.root.dtype == np.float64 and p.root.shape == (p.n,))
        assert mgh.by_name(p.name) is p
    assert _PADDED.n_max == 10 and _PADDED.y0.shape == (23, 10)
    for i, p in enumerate(problems):
        np.testing.assert_array_equal(_PADDED.y0[i, : p.n], p.y0)
        np.testing.assert_array_equal(_PADDED.y0[i, p.n :], 0.0)
    g0 = np.asarray(_padded_g(jnp.asarray(_PADDED.y0), jnp.arange(23)))
    assert np.all(np.isfinite(g0))
    np.testing.assert_array_equal(_max_abs(g0) > 0, True)  # no start is a root


def test_known_roots():
    """``g(root) = 0`` up to rounding at the library's roots (16 of the 23), but for
    Powell's badly scaled problem, whose root the library gives to 7 digits
    (max|g| = 3.8e-7 there)."""
    with_root = [p.root is not None for p in mgh.MGH_PROBLEMS]
    assert sum(with_root) == 16
    points = [p.y0 if p.root is None else p.root for p in mgh.MGH_PROBLEMS]
    g = _unpadded_g(tuple(jnp.asarray(y) for y in points))
    for p, gi, known in zip(mgh.MGH_PROBLEMS, g, with_root):
        if known:
            bound = 1e-6 if p.name == "powell_badly_scaled" else 1e-14
            assert float(jnp.max(jnp.abs(gi))) <= bound, p.name


def test_padded_form_agrees_with_each_problem():
    """At the starts and at random points around them, the padded function is the
    problem's ``g`` on the first ``n`` entries (to rounding) and exactly ``y`` on the
    rest."""
    rng = np.random.default_rng(0)
    for trial in range(3):
        y = _PADDED.y0 + (0 if trial == 0 else rng.standard_normal(_PADDED.y0.shape))
        g = np.asarray(_padded_g(jnp.asarray(y), jnp.arange(23)))
        expected = _unpadded_g(tuple(jnp.asarray(y[i, :n]) for i, n in enumerate(_PADDED.sizes)))
        for i, p in enumerate(mgh.MGH_PROBLEMS):
            np.testing.assert_allclose(g[i, : p.n], expected[i], rtol=1e-13, atol=1e-13)
            np.testing.assert_array_equal(g[i, p.n :], y[i, p.n :])


_SOLVES: dict[str, tuple[np.ndarray, np.ndarray]] = {}


@eqx.filter_jit
def _solve(solver, y0, index):
    return optx.root_find(_PADDED.fn, solver, y0, index, max_steps=nonlinear.MAX_STEPS, throw=False)


def _solve_all(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All 23 problems with solver `name`, one compilation (the index is traced): the
    returned points (23, 10) and evaluations (23,). Cached: the tests of one solver
    share it."""
    if name not in _SOLVES:
        solver = SOLVERS[name]()
        values, evaluations = [], []
        for i in range(23):
            sol = _solve(solver, jnp.asarray(_PADDED.y0[i]), jnp.asarray(i))
            values.append(np.asarray(sol.value))
            evaluations.append(nonlinear.our_evaluations(sol))
        _SOLVES[name] = (np.stack(values), np.array(evaluations))
    return _SOLVES[name]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_padding_stays_zero(name):
    """The padding is a decoupled root: it is exactly 0 at every returned point."""
    y, _ = _solve_all(name)
    for i, p in enumerate(mgh.MGH_PROBLEMS):
        np.testing.assert_array_equal(y[i, p.n :], 0.0, err_msg=p.name)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solved_problems(name):
    """Which problems each solver solves, by name, and in how many evaluations, as the
    unpadded runner measures them (`EVALUATIONS`, outside `ROUNDING`). Anderson solves
    21 of 23 (not the generalized Rosenbrock function, nor, from the standard start,
    the helical valley), Broyden 17 (not Rosenbrock, Wood, Watson, both Hammarling
    problems, Freudenstein-Roth), Newton-Krylov and the Polyalgorithm all 23."""
    y, evaluations = _solve_all(name)
    residuals = _max_abs(np.asarray(_padded_g(jnp.asarray(y), jnp.arange(23))))
    solved = dict(zip(NAMES, residuals <= nonlinear.SOLVED))
    expected = EVALUATIONS[name]
    rounding = ROUNDING[name]
    for i, problem in enumerate(NAMES):
        if problem in rounding["outcome"]:
            continue
        assert solved[problem] == (expected[problem] is not None), problem
        if expected[problem] is not None and problem not in rounding["count"]:
            assert evaluations[i] == expected[problem], problem
    pinned = sum(v is not None for k, v in expected.items() if k not in rounding["outcome"])
    assert pinned <= sum(solved.values()) <= pinned + len(rounding["outcome"])
