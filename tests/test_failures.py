"""Failure modes of the Anderson, Broyden and Neumann root finders: non-finite values,
divergence, no fixed point, too few steps, throw=True, a batch with failing samples;
and the errors raised at construction (bad hyperparameters) and at trace time (a
function whose output does not look like its input).

To keep compilation down, the failing problems are the branches of one map `_zoo`
chosen by a runtime `mode`, so each solver compiles once per (max_steps, throw).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


(
    NAN_LATER,
    NAN_FIRST,
    INF_FIRST,
    EXPAND,
    NO_FIXED_POINT,
    BLOWUP,
    CONTRACT,
    CONST,
    CLIFF,
    EXP,
) = range(10)


def _zoo(z, mode):
    """fixed_point maps, by mode (y0 = [0, 1] in every test):
    NAN_LATER   0.5 z + 2 while z < 3, NaN beyond (the iterates reach 3 or 4);
    NAN_FIRST   NaN everywhere;             INF_FIRST  +inf everywhere;
    EXPAND      2 z + 1 (fixed point -1, but the Picard map expands);
    NO_FIXED_POINT  z + 1;
    BLOWUP      z + (z + 9)^3 (g = (z + 9)^3, root -9: the first, Picard, step
                overshoots, and the Picard map expands);
    CONTRACT    0.5 z + 1 (fixed point 2);  CONST      3;
    CLIFF       z + 1 at y0, z + 1e6 + z^2 anywhere else: no step from y0 can bring
                the residual back, however short;
    EXP         exp(z) (no real fixed point; plain iteration overflows).
    """
    branches = [
        lambda z: jnp.where(z < 3, 0.5 * z + 2, jnp.nan),
        lambda z: jnp.full_like(z, jnp.nan),
        lambda z: jnp.full_like(z, jnp.inf),
        lambda z: 2 * z + 1,
        lambda z: z + 1,
        lambda z: z + (z + 9) ** 3,
        lambda z: 0.5 * z + 1,
        lambda z: jnp.full_like(z, 3.0),
        lambda z: z + jnp.where(z == jnp.resize(Y0, z.shape), 1.0, 1e6 + z**2),
        lambda z: jnp.exp(z),
    ]
    return jax.lax.switch(mode, branches, z)


Y0 = jnp.array([0.0, 1.0])


@eqx.filter_jit
def _solve(solver, mode, max_steps, throw):
    return optx.fixed_point(_zoo, solver, Y0, mode, max_steps=max_steps, throw=throw)


def solve(solver, mode, max_steps=60, throw=False):
    # The mode is an array, not a Python int (which filter_jit would make static).
    return _solve(solver, jnp.asarray(mode, jnp.int32), max_steps, throw)


#: XLA's CPU backend reduces arrays of at least this size with other kernels.
LARGE_STATE = 2**12

SOLVERS = {
    "anderson": fp.Anderson(),
    "broyden": fp.Broyden(),
    "broyden_nols": fp.Broyden(line_search=False),
    "neumann": fp.Neumann(),
}
ALL = sorted(SOLVERS)
BASIC = ["anderson", "broyden", "neumann"]
# throw=True only wraps the result in optimistix (shared by all solvers): two suffice.
THROW = ["anderson", "neumann"]


def result_is(sol, result):
    return bool(sol.result == result)


def results_are(sol, result):
    """`sol.result == result` per sample of a batched solve, as a NumPy boolean array."""
    return np.asarray(sol.result == result)


@pytest.mark.parametrize("name", ALL)
def test_nan_after_progress_returns_best_iterate(name):
    """f becomes NaN at the third point: RESULTS.nonfinite, and the returned value is
    the best evaluated point y1 = [2, 2.5] (residual 1), never the NaN one."""
    sol = solve(SOLVERS[name], NAN_LATER)
    assert result_is(sol, optx.RESULTS.nonfinite), sol.result
    assert int(sol.stats["num_steps"]) == 3
    np.testing.assert_array_equal(sol.value, [2.0, 2.5])
    assert float(sol.stats["residual_norm"]) == 1.0


@pytest.mark.parametrize("mode", [NAN_FIRST, INF_FIRST], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ALL)
def test_nonfinite_at_first_evaluation_is_reported(name, mode):
    sol = solve(SOLVERS[name], mode)
    assert result_is(sol, optx.RESULTS.nonfinite), sol.result
    assert int(sol.stats["num_steps"]) == 1


@pytest.mark.parametrize("mode", [NAN_FIRST, INF_FIRST], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ALL)
def test_nonfinite_at_first_evaluation_returns_y0(name, mode):
    """The only evaluated point is y0: that (finite) point should come back."""
    sol = solve(SOLVERS[name], mode)
    np.testing.assert_array_equal(sol.value, Y0)


def test_expanding_map_neumann_diverges():
    """f(z) = 2 z + 1 from [0, 1]: the residual y + 1 doubles every step; it first
    exceeds divergence_factor x the best at step 15 (2 x 1e4 < 2^15) and divergence is
    declared at the third such step in a row (divergence_patience = 3): 17
    evaluations; y0, the best point, is returned."""
    sol = solve(SOLVERS["neumann"], EXPAND)
    assert result_is(sol, optx.RESULTS.nonlinear_divergence), sol.result
    assert int(sol.stats["num_steps"]) == 17
    np.testing.assert_array_equal(sol.value, Y0)
    assert float(sol.stats["residual_norm"]) == 2.0


@pytest.mark.parametrize("name", ["anderson", "broyden", "broyden_nols"])
def test_expanding_linear_map_is_solved_by_root_finders(name):
    """Anderson and Broyden are root finders: they find the fixed point -1 of 2z + 1
    that Picard iteration cannot reach: after the Picard step the secant step is exact
    on this linear map (3 evaluations; Broyden's line search takes one more), to
    |g| = |z + 1| < atol + rtol |z| = 1e-6 + 1e-4 |z|."""
    sol = solve(SOLVERS[name], EXPAND)
    assert result_is(sol, optx.RESULTS.successful), sol.result
    assert int(sol.stats["num_steps"]) == dict(anderson=3, broyden=4, broyden_nols=3)[name]
    np.testing.assert_allclose(sol.value, [-1.0, -1.0], rtol=0, atol=1.02e-4)


@pytest.mark.parametrize("name", ["anderson", "broyden", "broyden_nols"])
def test_overshooting_first_step_is_recovered(name):
    """g = (z + 9)^3 from [0, 1]: the first (Picard) step raises the residual from 1e3
    to 1e9. That used to end the solve with a divergence; the root finders now
    backtrack (Anderson's restart, Broyden's line search, or Broyden's next secant
    step without it), rescale their initial inverse Jacobian (the Picard map expands)
    and find the root -9 (to |g| < 1e-6 + 1e-4 |z|, i.e. |z + 9| < 0.1: the root is
    triple)."""
    sol = solve(SOLVERS[name], BLOWUP)
    assert result_is(sol, optx.RESULTS.successful), sol.result
    np.testing.assert_allclose(sol.value, [-9.0, -9.0], rtol=0, atol=0.1)


def test_overshooting_neumann_fails_fast():
    """Plain iteration on g = (z + 9)^3 blows up: the residual is 1e9, then 1e27, then
    overflows float32 - a non-finite failure at the 4th evaluation, y0 returned."""
    sol = solve(SOLVERS["neumann"], BLOWUP)
    assert result_is(sol, optx.RESULTS.nonfinite), sol.result
    assert int(sol.stats["num_steps"]) == 4
    np.testing.assert_array_equal(sol.value, Y0)
    assert float(sol.stats["residual_norm"]) == 1000.0


@pytest.mark.parametrize("name", ALL)
def test_cliff_diverges_after_patience(name):
    """Every point but y0 has a residual 1e6 x larger: no restart, backtracking or
    line search can bring it back, so each solver reports divergence after exactly
    divergence_patience evaluations above 1e4 x the best (Neumann 3, Anderson and
    Broyden 10, whose safeguards shorten the step in between), and returns y0."""
    solver = SOLVERS[name]
    sol = solve(solver, CLIFF)
    assert result_is(sol, optx.RESULTS.nonlinear_divergence), sol.result
    assert int(sol.stats["num_steps"]) == 1 + solver.divergence_patience
    np.testing.assert_array_equal(sol.value, Y0)
    assert float(sol.stats["residual_norm"]) == 1.0


def test_exponential_growth_fails_fast():
    """f(z) = exp(z) from [0, 1]: plain iteration (the second element 1, e, 15.2,
    3.8e6) blows up: exp(3.8e6) at the 4th evaluation overflows float32, non-finite
    before the sustained-rise rule would call it a divergence; y0 is returned."""
    sol = solve(SOLVERS["neumann"], EXP)
    assert result_is(sol, optx.RESULTS.nonfinite), sol.result
    assert int(sol.stats["num_steps"]) == 4
    np.testing.assert_array_equal(sol.value, Y0)


@pytest.mark.parametrize("name", ALL)
def test_no_fixed_point(name):
    """f(z) = z + 1: no fixed point; the residual never changes, so no divergence:
    max steps reached, and the value is finite (never NaN)."""
    sol = solve(SOLVERS[name], NO_FIXED_POINT)
    assert result_is(sol, optx.RESULTS.nonlinear_max_steps_reached), sol.result
    assert int(sol.stats["num_steps"]) == 60
    assert np.all(np.isfinite(sol.value))
    assert float(sol.stats["residual_norm"]) == 1.0


@pytest.mark.parametrize("name", BASIC)
def test_max_steps_too_small(name):
    """A contraction that needs more than two steps: max steps reached after exactly
    two evaluations, and a finite iterate returned."""
    sol = solve(SOLVERS[name], CONTRACT, max_steps=2)
    assert result_is(sol, optx.RESULTS.nonlinear_max_steps_reached), sol.result
    assert int(sol.stats["num_steps"]) == 2
    assert np.all(np.isfinite(sol.value))
    # With max_steps=60 the same problem is solved: by the secant step in 3 evaluations
    # (a linear map), by plain iteration when |g(y_k)| <= 0.5^k < 1e-6 + 1e-4 |y_k|
    # (|y_k| ~ 2), first at k = 13: 14 evaluations.
    sol = solve(SOLVERS[name], CONTRACT)
    assert result_is(sol, optx.RESULTS.successful), sol.result
    assert int(sol.stats["num_steps"]) == (14 if name == "neumann" else 3)
    # |g| = |1 - z/2| < 1e-6 + 1e-4 |z|, so |z - 2| < 4.1e-4.
    np.testing.assert_allclose(sol.value, [2.0, 2.0], rtol=0, atol=4.1e-4)


@pytest.mark.parametrize("name", BASIC)
def test_max_steps_reports_last_evaluated_residual(name):
    """Out of steps, stats["residual_norm"] is that of the last EVALUATED point (as
    documented; the returned iterate is the next, unevaluated one), not the best:
    f = 2 z + 1 from [0, 1] for two steps evaluates y0 (residual 2), then the Picard
    point [1, 3] (residual 4)."""
    sol = solve(SOLVERS[name], EXPAND, max_steps=2)
    assert result_is(sol, optx.RESULTS.nonlinear_max_steps_reached), sol.result
    assert float(sol.stats["residual_norm"]) == 4.0


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_zero_tolerance_runs_all_steps(name):
    """rtol = atol = 0: never 'converged', even on the exact fixed point; exactly
    max_steps steps, and the solver sits on the fixed point (no NaN from 0/0)."""
    sol = solve(eqx.tree_at(lambda s: (s.rtol, s.atol), SOLVERS[name], (0.0, 0.0)), CONTRACT)
    assert result_is(sol, optx.RESULTS.nonlinear_max_steps_reached), sol.result
    assert int(sol.stats["num_steps"]) == 60
    np.testing.assert_allclose(sol.value, [2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "mode, message, max_steps",
    [
        (NAN_FIRST, "Nonfinite", 2),
        (CLIFF, "diverged", 12),
        (CONTRACT, "maximum number of steps", 2),
    ],
    ids=["nonfinite", "divergence", "max_steps"],
)
@pytest.mark.parametrize("name", THROW)
def test_throw_raises(name, mode, message, max_steps):
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(solve(SOLVERS[name], mode, max_steps=max_steps, throw=True).value)


@pytest.mark.parametrize("name", THROW)
def test_throw_does_not_raise_on_success(name):
    sol = solve(SOLVERS[name], CONST, max_steps=2, throw=True)
    np.testing.assert_array_equal(sol.value, [3.0, 3.0])
    assert int(sol.stats["num_steps"]) == 2


@pytest.mark.parametrize("name", BASIC)
def test_vmap_over_failing_samples(name):
    """A batch mixing failures and successes (throw=False): each sample gets its own
    result and value, as when solved alone."""
    modes = jnp.array([CONTRACT, NAN_LATER, NO_FIXED_POINT, CLIFF, CONST])
    batch = jax.vmap(lambda m: solve(SOLVERS[name], m))(modes)
    expected = [
        optx.RESULTS.successful,
        optx.RESULTS.nonfinite,
        optx.RESULTS.nonlinear_max_steps_reached,
        optx.RESULTS.nonlinear_divergence,
        optx.RESULTS.successful,
    ]
    for i, mode in enumerate(modes):
        assert results_are(batch, expected[i])[i], (i, batch.result)
        single = solve(SOLVERS[name], mode)
        assert int(batch.stats["num_steps"][i]) == int(single.stats["num_steps"])
        np.testing.assert_allclose(batch.value[i], single.value, rtol=1e-6)
    assert np.all(np.isfinite(batch.value))


# ----------------------------------------------------------------------------------
# Construction and trace-time errors.


BAD_HYPERPARAMETERS = [
    (fp.Anderson, dict(m=0), "m"),
    (fp.Anderson, dict(m=2.0), "m"),
    (fp.Anderson, dict(m=True), "m"),
    (fp.Anderson, dict(beta=0.0), "beta"),
    (fp.Anderson, dict(beta=1.5), "beta"),
    (fp.Anderson, dict(beta=float("nan")), "beta"),
    (fp.Anderson, dict(rtol=-1e-3), "rtol"),
    (fp.Anderson, dict(atol=-1e-6), "atol"),
    (fp.Anderson, dict(rtol="small"), "rtol"),
    (fp.Anderson, dict(regularisation=-1.0), "regularisation"),
    (fp.Anderson, dict(safeguard_factor=1.0), "safeguard_factor"),
    (fp.Anderson, dict(divergence_factor=1.0), "divergence_factor"),
    (fp.Anderson, dict(trace_length=-1), "trace_length"),
    (fp.Anderson, dict(norm="max"), "norm"),
    (fp.Anderson, dict(adaptive_beta=1), "adaptive_beta"),
    (fp.Anderson, dict(periodic_restart="yes"), "periodic_restart"),
    (fp.Broyden, dict(memory=0), "memory"),
    (fp.Broyden, dict(beta=-0.5), "beta"),
    (fp.Broyden, dict(line_search=1), "line_search"),
    (fp.Broyden, dict(divergence_patience=0), "divergence_patience"),
    (fp.Anderson, dict(divergence_patience=1.5), "divergence_patience"),
    (fp.Neumann, dict(divergence_patience=True), "divergence_patience"),
    (fp.Neumann, dict(divergence_patience=2**20 + 1), "divergence_patience"),
    (fp.Broyden, dict(line_search="yes"), "line_search"),
    (fp.Broyden, dict(max_backtracks=-1), "max_backtracks"),
    (fp.Broyden, dict(update="ugly"), "update"),
    (fp.Broyden, dict(update=True), "update"),
    (fp.Broyden, dict(rtol=float("nan")), "rtol"),
    (fp.Broyden, dict(divergence_factor=0.5), "divergence_factor"),
    (fp.Broyden, dict(trace_length=2.5), "trace_length"),
    (fp.Neumann, dict(beta=0.0), "beta"),
    (fp.Neumann, dict(beta=2.0), "beta"),
    (fp.Neumann, dict(atol=-1.0), "atol"),
    (fp.Neumann, dict(divergence_factor=1.0), "divergence_factor"),
    (fp.Neumann, dict(trace_length=-3), "trace_length"),
]


@pytest.mark.parametrize(
    "cls, kwargs, name",
    BAD_HYPERPARAMETERS,
    ids=[f"{cls.__name__}-{name}" for cls, _, name in BAD_HYPERPARAMETERS],
)
def test_bad_hyperparameter_raises(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (fp.Anderson, dict(m=1, beta=1.0, rtol=0.0, atol=0.0, regularisation=0.0)),
        (fp.Anderson, dict(safeguard_factor=1.0001, divergence_factor=1.0001)),
        (fp.Broyden, dict(memory=1, beta=1e-6, line_search=True, max_backtracks=0)),
        (fp.Neumann, dict(beta=1.0, trace_length=0, divergence_patience=1)),
    ],
)
def test_boundary_hyperparameters_accepted(cls, kwargs):
    """The boundaries of the allowed ranges are accepted (so the checks above test
    the ranges, not just any value)."""
    solver = cls(**kwargs)
    for key, value in kwargs.items():
        assert getattr(solver, key) == value


def _shape_4(z, args):
    return jnp.zeros(4)


def _column(z, args):
    return z[:, None]


def _tuple(z, args):
    return (z, z)


def _root_of(f):
    return lambda z, args: jax.tree.map(lambda a: a - 1.0, f(z, args))


@pytest.mark.parametrize("name", BASIC)
def test_fixed_point_output_shape_mismatch(name):
    """Under optx.fixed_point, f(y) of shape (4,) for y of shape (3,) and of shape
    (3, 1) (which would broadcast to (3, 3) in f(y) - y) are both rejected at trace
    time with a ValueError about the structure/shape."""
    solver = SOLVERS[name]
    for f in (_shape_4, _column):
        with pytest.raises(ValueError, match="same structure"):
            optx.fixed_point(f, solver, jnp.zeros(3), throw=False)


@pytest.mark.parametrize("name", BASIC)
def test_root_find_output_shape_mismatch(name):
    """Under optx.root_find the solvers' own check names the shapes."""
    solver = SOLVERS[name]
    for g in (_root_of(_shape_4), _root_of(_column), _root_of(_tuple)):
        with pytest.raises(ValueError, match="same structure and shapes as its input"):
            optx.root_find(g, solver, jnp.zeros(3), throw=False)


def test_anderson_restart_backtracks_instead_of_repeating():
    """From y0 = (2, 2.1) on y^3 - 2 the extrapolation overshoots; a restart's Picard
    step overshoots too, and is halved until it does not: the solve converges after
    one restart, in 14 evaluations (float32, to atol = 1e-6, a few ulps of y^3 = 2:
    rounding may move the last step by one)."""
    sol = optx.root_find(
        lambda y, a: y**3 - 2.0,
        fp.Anderson(rtol=0.0, atol=1e-6),
        jnp.array([2.0, 2.1]),
        throw=False,
        max_steps=100,
    )
    assert result_is(sol, optx.RESULTS.successful), sol.result
    assert int(sol.state.num_restarts) == 1 and 13 <= int(sol.stats["num_steps"]) <= 15
    np.testing.assert_allclose(sol.value, 2.0 ** (1 / 3), rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 12, 30])
def test_anderson_gram_stays_the_gram_of_its_history(steps):
    """The Gram matrix is updated one row and column per step (not recomputed): after
    any number of steps - through ring-buffer wrap-around and safeguard restarts - it
    equals dr @ dr.T of the stored history."""
    sol = optx.root_find(
        lambda y, a: y**3 - 2.0,
        fp.Anderson(rtol=0.0, atol=0.0, m=3),
        jnp.array([2.0, 2.1, -1.5]),
        throw=False,
        max_steps=steps,
    )
    if steps == 30:
        # The restart path was exercised: twice, by step 4 and at step 11 or 12, with
        # residuals of order 1 to 100 (far from rounding).
        assert int(sol.state.num_restarts) == 2
    dr = np.asarray(sol.state.dr, np.float64)
    np.testing.assert_allclose(
        sol.state.gram, dr @ dr.T, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(dr).max() ** 2)
    )


def _solve_big(solver, mode):
    y0 = jnp.tile(Y0, LARGE_STATE // Y0.size)
    return optx.fixed_point(_zoo, solver, y0, mode, max_steps=60, throw=False)


# One compilation for every mode (a runtime argument).
_solve_big_anderson = jax.jit(lambda mode: _solve_big(SOLVERS["anderson"], mode))


@pytest.mark.parametrize("mode", [NAN_LATER, EXPAND, CONTRACT, CLIFF])
def test_large_state_gives_the_outcome_of_the_small_one(mode):
    """A state of LARGE_STATE numbers (where XLA reduces with other kernels, see
    `test_one_nan_in_a_large_residual_is_detected`). The maps here act elementwise, so
    the same problem on
    y0 repeated 2048 times has the same iterates (up to the rounding of the longer sums),
    norms and decisions: the same step count, result and returned point (the best one
    after a NaN, y0 after a divergence)."""
    small = solve(SOLVERS["anderson"], mode)
    sol = _solve_big_anderson(jnp.asarray(mode, jnp.int32))
    reps = sol.value.size // Y0.size
    assert bool(sol.result == small.result), (sol.result, small.result)
    assert int(sol.stats["num_steps"]) == int(small.stats["num_steps"])
    np.testing.assert_allclose(sol.value, jnp.tile(small.value, reps), rtol=1e-6, atol=1e-6)


def test_anderson_ignores_whatever_its_empty_history_rows_hold():
    """On a large state (`_fused`) Anderson writes the history rows of a step that
    pushes no pair (the first step, a restart) as they are, and ignores them: the coefficients and the
    combination over the valid rows must be those of zeroed rows, also when the
    ignored rows (and so their Gram entries) hold infinities and NaN."""
    from fixedpoint._solver.anderson import _combine, _fused, anderson_coefficients

    m, n = 4, LARGE_STATE
    assert _fused(m, n)
    rng = np.random.default_rng(0)
    dy, dr = (rng.normal(size=(m, n)).astype(np.float32) for _ in range(2))
    r = rng.normal(size=n).astype(np.float32)
    valid = jnp.array([True, False, True, False])
    clean_dy, clean_dr = dy * np.asarray(valid)[:, None], dr * np.asarray(valid)[:, None]
    dirty_dy, dirty_dr = dy.copy(), dr.copy()
    dirty_dy[1, :3], dirty_dr[1, 5] = np.inf, np.nan
    dirty_dr[3, 7], dirty_dy[3, 9] = -np.inf, np.nan

    def coefficients(dy, dr):
        with np.errstate(invalid="ignore", over="ignore"):
            gram, dr_r = dr.astype(np.float64) @ dr.T, dr.astype(np.float64) @ r
        return anderson_coefficients(
            jnp.asarray(gram, jnp.float32), jnp.asarray(dr_r, jnp.float32), valid, jnp.asarray(1e-6)
        )

    gamma = coefficients(clean_dy, clean_dr)
    np.testing.assert_array_equal(coefficients(dirty_dy, dirty_dr), gamma)
    assert float(jnp.max(jnp.abs(gamma))) > 0 and not np.any(np.asarray(gamma)[[1, 3]])
    h0 = jnp.float32(-0.7)
    expected = gamma @ (clean_dy - h0 * clean_dr)
    np.testing.assert_allclose(
        _combine(gamma, jnp.asarray(dirty_dy), jnp.asarray(dirty_dr), h0, valid),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", ["anderson", "broyden_nols", "neumann"])
def test_an_infinite_iterate_with_a_finite_residual_is_nonfinite(name):
    """g(y) = 3e38 (float32) for the second sample: its iterates overflow to infinity
    while g stays finite there (with the max norm; the RMS norm of g would overflow
    too). optimistix's loop flags a non-finite iterate, and so must our batched loop,
    on a small and on a large state: RESULTS.nonfinite with a finite returned point for
    that sample, and success for the other (g(y) = 1 - y). (Broyden without its line
    search: with it, the steps on a constant g backtrack instead of overflowing.)"""
    solver = SOLVERS[name]

    def g(y, blow):
        return jnp.where(blow, jnp.full_like(y, 3e38), 1 - y)

    @jax.jit
    @jax.vmap
    def run(y0, blow):
        return optx.root_find(
            g, solver, y0, blow, max_steps=30, adjoint=fp.ImplicitAdjoint(), throw=False
        )

    blow = jnp.array([False, True])
    for n in (4, LARGE_STATE):
        batch = run(jnp.zeros((2, n), jnp.float32), blow)
        np.testing.assert_array_equal(results_are(batch, optx.RESULTS.successful), [True, False])
        np.testing.assert_array_equal(results_are(batch, optx.RESULTS.nonfinite), [False, True])
        assert bool(jnp.all(jnp.isfinite(batch.value[1])))
        np.testing.assert_allclose(batch.value[0], 1.0, rtol=1e-3)


@pytest.mark.parametrize("name", BASIC)
def test_one_nan_in_a_large_residual_is_detected(name):
    """XLA's CPU backend reduces 4,096 or more elements with a max that skips NaN, so
    `optx.max_norm` of a residual with one NaN is finite there. The solvers must still
    see it: f = 0.5 z + 2 (fixed point 4), except that one element turns NaN once it
    reaches 3: RESULTS.nonfinite and a finite returned point (the best one), never
    'converged' with a NaN inside."""
    y0 = jnp.zeros(LARGE_STATE)

    def f(z, _):
        out = 0.5 * z + 2
        return out.at[5].set(jnp.where(z[5] >= 3, jnp.nan, out[5]))

    sol = jax.jit(
        lambda y0: optx.fixed_point(f, SOLVERS[name], y0, None, max_steps=60, throw=False)
    )(y0)
    assert result_is(sol, optx.RESULTS.nonfinite), sol.result
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    assert float(jnp.max(sol.value)) < 3
