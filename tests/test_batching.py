"""Batched solves (`jax.vmap`) run as one loop over the batch (`fixedpoint._iterate`):
per-sample results identical to per-sample solves, for samples that converge at
different steps, run out of steps, diverge or hit non-finite values; gradients; linear
solvers; unbatched arguments; nested `vmap`; and the reason for it all, that no
history buffer is selected per step."""

import re

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


N = 5
MAX_STEPS = 30


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _w():
    w = jax.random.normal(jax.random.PRNGKey(3), (N, N), jnp.float64)
    return w / jnp.linalg.norm(w, 2)


def _fn(z, p):
    """Fixed-point map with a per-sample scale s and offset b: contracts for s < 1
    (slowly near 1), expands for s > 1 (`2 z`: diverges); s < 0 gives log of a
    negative number (non-finite)."""
    s, b = p[0], p[1:]
    w = _w()
    return jnp.where(s < 0, jnp.log(s) * z, s * jnp.tanh(w @ z) + b + jnp.where(s > 1, 2 * z, 0))


# One sample each: fast, medium, slow, out of steps (for Neumann: plain iteration at
# 0.97 needs more than 30), expanding (Neumann diverges; Anderson and Broyden find its
# repelling fixed point), non-finite. (A NumPy array: JAX arrays are made inside the
# x64 fixture.)
PARAMS = np.array(
    [
        [0.1] + [1.0] * N,
        [0.7] + [0.5] * N,
        [0.97] + [-1.0] * N,
        [0.97] + [-0.2] * N,
        [1.5] + [1.0] * N,
        [-1.0] + [1.0] * N,
    ],
    np.float64,
)
# Batched and per-sample runs may round differently (batched products); the steps,
# counts and result codes must be identical.
RTOL, ATOL = 1e-8, 1e-10

SOLVERS = {
    "anderson": fp.Anderson(rtol=1e-10, atol=1e-10, trace_length=MAX_STEPS),
    "broyden": fp.Broyden(rtol=1e-10, atol=1e-10, trace_length=MAX_STEPS),
    "broyden-ls": fp.Broyden(rtol=1e-10, atol=1e-10, line_search=True),
    # (Memory below N: the rank-one terms as pairs of vectors, not summed; see
    # `fixedpoint._solver.broyden._summed`.)
    "broyden-pairs": fp.Broyden(rtol=1e-10, atol=1e-10, memory=3, trace_length=MAX_STEPS),
    "neumann": fp.Neumann(rtol=1e-10, atol=1e-10, trace_length=MAX_STEPS),
}


def result_is(result: lx.RESULTS, member: lx.RESULTS) -> np.ndarray:
    """`result == member` as a NumPy boolean array, one entry per sample of a batched
    `result` (a scalar for an unbatched one). For `optx.RESULTS` (which extends
    `lx.RESULTS`) and `lx.RESULTS` alike."""
    return np.asarray(result == member)


def _solve(solver, adjoint, p, y0=None):
    y0 = jnp.zeros(N, jnp.float64) if y0 is None else y0
    sol = optx.fixed_point(
        _fn, solver, y0, p, max_steps=MAX_STEPS, adjoint=adjoint, throw=False, has_aux=False
    )
    return sol.value, sol.stats, sol.result


def _assert_same(batched, single, i):
    value, stats, result = batched
    s_value, s_stats, s_result = single
    np.testing.assert_allclose(value[i], s_value, rtol=RTOL, atol=ATOL)
    assert result_is(result, s_result)[i]
    assert set(stats) == set(s_stats)
    for key in stats:
        if key in ("num_steps", "max_steps"):
            assert stats[key][i] == s_stats[key]
        else:
            np.testing.assert_allclose(stats[key][i], s_stats[key], rtol=RTOL, atol=ATOL)


_OK = optx.RESULTS.successful
_NONFINITE = optx.RESULTS.nonfinite
# Per solver, the result and the evaluations of each sample of PARAMS, solved alone.
OUTCOMES = {
    "anderson": ([_OK] * 5 + [_NONFINITE], [8, 11, 12, 13, 11, 1]),
    "broyden": ([_OK] * 5 + [_NONFINITE], [8, 13, 14, 14, 14, 1]),
    # (The line search is never needed on these maps: the same steps as without.)
    "broyden-ls": ([_OK] * 5 + [_NONFINITE], [8, 13, 14, 14, 14, 1]),
    "broyden-pairs": ([_OK] * 5 + [_NONFINITE], [8, 17, 19, 21, 20, 1]),
    "neumann": (
        [_OK] * 3
        + [
            optx.RESULTS.nonlinear_max_steps_reached,
            optx.RESULTS.nonlinear_divergence,
            _NONFINITE,
        ],
        [9, 26, 28, MAX_STEPS, 16, 1],
    ),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_vmap_equals_per_sample(name):
    solver = SOLVERS[name]
    adjoint = fp.ImplicitAdjoint(throw=False)
    batched = jax.jit(jax.vmap(lambda p: _solve(solver, adjoint, p)))(PARAMS)
    solve_one = jax.jit(lambda p: _solve(solver, adjoint, p))  # one compilation
    results, steps = OUTCOMES[name]
    for i, p in enumerate(PARAMS):
        single = solve_one(p)
        assert result_is(single[2], results[i]), (i, single[2])
        assert int(single[1]["num_steps"]) == steps[i], i
        _assert_same(batched, single, i)


@pytest.mark.parametrize("name", ["anderson", "broyden", "neumann"])
def test_vmap_grad_equals_per_sample(name):
    solver = SOLVERS[name]
    adjoint = fp.ImplicitAdjoint(fp.linear.Anderson(rtol=1e-11, atol=1e-12), throw=False)
    params = PARAMS[:3]

    def loss(p):
        return jnp.sum(_solve(solver, adjoint, p)[0] ** 2)

    batched = jax.jit(jax.vmap(jax.grad(loss)))(params)
    grad_one = jax.jit(jax.grad(loss))
    single = np.stack([grad_one(p) for p in params])
    np.testing.assert_allclose(batched, single, rtol=RTOL, atol=ATOL)
    if name != "anderson":
        return
    # And the gradient of a batch mean (the training-loop case: grad of vmap).
    mean_grad = jax.jit(jax.grad(lambda ps: jnp.mean(jax.vmap(loss)(ps))))(params)
    np.testing.assert_allclose(mean_grad, single / len(params), rtol=RTOL, atol=ATOL)


def test_unbatched_arguments_and_batched_start():
    solver = SOLVERS["anderson"]
    adjoint = fp.ImplicitAdjoint(throw=False)
    starts = jnp.stack([jnp.full(N, v, jnp.float64) for v in (0.0, 1.0, -3.0)])
    p = PARAMS[1]
    batched = jax.jit(jax.vmap(lambda y0: _solve(solver, adjoint, p, y0)))(starts)
    solve_one = jax.jit(lambda y0: _solve(solver, adjoint, p, y0))
    for i, y0 in enumerate(starts):
        _assert_same(batched, solve_one(y0), i)
    # Anderson's evaluations from 0, 1 and -3 (11 from 0: `OUTCOMES`).
    np.testing.assert_array_equal(batched[1]["num_steps"], [11, 10, 11])


def test_nested_vmap():
    solver = SOLVERS["anderson"]
    adjoint = fp.ImplicitAdjoint(throw=False)
    grid = jnp.stack([PARAMS[:3], PARAMS[:3] * np.array([1.0] + [0.5] * N)])
    batched = jax.jit(jax.vmap(jax.vmap(lambda p: _solve(solver, adjoint, p))))(grid)
    solve_one = jax.jit(lambda p: _solve(solver, adjoint, p))
    for j in range(grid.shape[0]):
        for i in range(grid.shape[1]):
            single = solve_one(grid[j, i])
            np.testing.assert_allclose(batched[0][j, i], single[0], rtol=RTOL, atol=ATOL)
            assert batched[1]["num_steps"][j, i] == single[1]["num_steps"]
    # Anderson's evaluations per sample; halving the offsets slows the slow one by one.
    np.testing.assert_array_equal(batched[1]["num_steps"], [[8, 11, 12], [8, 11, 13]])


def test_other_solvers_fall_back_to_the_plain_batched_loop():
    solver = optx.FixedPointIteration(rtol=1e-10, atol=1e-10)
    adjoint = fp.ImplicitAdjoint(throw=False)
    params = PARAMS[:3]
    batched = jax.jit(jax.vmap(lambda p: _solve(solver, adjoint, p)))(params)
    solve_one = jax.jit(lambda p: _solve(solver, adjoint, p))
    for i, p in enumerate(params):
        single = solve_one(p)
        np.testing.assert_allclose(batched[0][i], single[0], rtol=RTOL, atol=ATOL)
        assert batched[1]["num_steps"][i] == single[1]["num_steps"]
    # Plain iteration: the same evaluations as fp.Neumann (`OUTCOMES`).
    np.testing.assert_array_equal(batched[1]["num_steps"], [9, 26, 28])
    assert np.all(result_is(batched[2], optx.RESULTS.successful))


@pytest.mark.parametrize(
    "solver, steps",
    [
        (fp.linear.Anderson(rtol=1e-10, atol=1e-10, max_steps=60), [7, 8, 8, 8]),
        (fp.linear.Broyden(rtol=1e-10, atol=1e-10, max_steps=60), [10, 11, 11, 11]),
        # (Plain iteration runs out of its 60 steps at the two slowest contractions.)
        (fp.linear.Neumann(rtol=1e-10, atol=1e-10, max_steps=60), [14, 31, 60, 60]),
    ],
    ids=["anderson", "broyden", "neumann"],
)
def test_linear_solvers_vmap_equals_per_sample(solver, steps):
    w = _w()
    scales = jnp.array([0.2, 0.6, 0.9, 0.99])
    b = jnp.arange(1.0, N + 1.0)

    def solve(s):
        operator = lx.MatrixLinearOperator(s * w - jnp.eye(N))
        sol = lx.linear_solve(operator, b, solver, throw=False)
        return sol.value, sol.stats["num_steps"], sol.result

    batched = jax.jit(jax.vmap(solve))(scales)
    solve_one = jax.jit(solve)
    for i, s in enumerate(scales):
        value, num_steps, result = solve_one(s)
        np.testing.assert_allclose(batched[0][i], value, rtol=RTOL, atol=ATOL)
        assert batched[1][i] == num_steps and result_is(batched[2], result)[i]
        assert int(num_steps) == steps[i], i
        expected = lx.RESULTS.successful if steps[i] < 60 else lx.RESULTS.max_steps_reached
        assert result_is(result, expected), (i, result)


def test_history_is_not_selected_per_step():
    """Under `vmap` the per-step `select(running, new, old)` of a batched while loop
    would touch the whole history (batch x m x n) every step; the batch loop does not."""
    m, batch = 7, 3
    solver = fp.Anderson(m=m, rtol=1e-10, atol=1e-10)
    adjoint = fp.ImplicitAdjoint(throw=False)
    hlo = jax.jit(jax.vmap(lambda p: _solve(solver, adjoint, p)[0])).lower(PARAMS[:batch]).as_text()
    history = f"tensor<{batch}x{m}x{N}xf64>"
    selects = [line for line in hlo.splitlines() if "stablehlo.select" in line]
    assert selects  # the check below looks at real select ops
    assert not [line for line in selects if re.search(re.escape(history) + r"\s*$", line)]
