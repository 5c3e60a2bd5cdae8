"""The lineax linear solvers: direct use, PyTree operators, transposes, statistics,
failure codes and the truncated Neumann series."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import fixedpoint as fp


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


SOLVERS = {
    "anderson": lambda **kw: fp.linear.Anderson(**kw),
    "broyden": lambda **kw: fp.linear.Broyden(**kw),
    "neumann": lambda **kw: fp.linear.Neumann(**kw),
}


def _contraction(n, radius, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    m = jax.random.normal(k1, (n, n), jnp.float64)
    m = radius * m / jnp.linalg.norm(m, 2)
    b = jax.random.normal(k2, (n,), jnp.float64)
    return m, b


# Steps to rtol = 1e-12, atol = 1e-13 on the 20 x 20 system of `test_matrix_and_transpose`
# (||M||_2 = 0.9), for A and for A^T (float64).
MATRIX_STEPS = {"anderson": (37, 39), "broyden": (26, 27), "neumann": (55, 57)}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_matrix_and_transpose(name):
    """A = M - I (the implicit-differentiation convention) and its transpose."""
    m, b = _contraction(20, 0.9)
    a = m - jnp.eye(20)
    rtol, atol = 1e-12, 1e-13
    solver = SOLVERS[name](rtol=rtol, atol=atol, max_steps=1000)
    op = lx.MatrixLinearOperator(a)
    for operator, matrix, steps in zip((op, op.T), (a, a.T), MATRIX_STEPS[name]):
        sol = lx.linear_solve(operator, b, solver)
        np.testing.assert_allclose(sol.value, jnp.linalg.solve(matrix, b), rtol=1e-9, atol=1e-10)
        assert int(sol.stats["num_steps"]) == steps
        # Stopped at rms(r / (atol + rtol |u|)) < 1, so rms(r) < atol + rtol max|u|.
        bound = atol + rtol * float(jnp.max(jnp.abs(sol.value)))
        assert float(sol.stats["residual_norm"]) < bound


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_pytree_function_operator(name):
    """A matrix-free operator on a dict: u -> 0.5 * rotate(u) - u."""
    structure = {
        "p": jax.ShapeDtypeStruct((3,), jnp.float64),
        "q": jax.ShapeDtypeStruct((2, 2), jnp.float64),
    }

    def mv(u):
        return {
            "p": 0.5 * jnp.roll(u["p"], 1) + 0.1 * jnp.sum(u["q"]) - u["p"],
            "q": 0.4 * u["q"].T - u["q"],
        }

    op = lx.FunctionLinearOperator(mv, structure)
    b = {"p": jnp.array([1.0, 2.0, 3.0]), "q": jnp.array([[1.0, -1.0], [0.5, 2.0]])}
    sol = lx.linear_solve(op, b, SOLVERS[name](rtol=1e-12, atol=1e-13))
    dense = op.as_matrix()
    flat_b = jnp.concatenate([b["p"], b["q"].reshape(-1)])
    expected = jnp.linalg.solve(dense, flat_b)
    got = jnp.concatenate([sol.value["p"], sol.value["q"].reshape(-1)])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)


def test_truncated_neumann_series_is_exact():
    """rtol = atol = 0 and max_steps = k sum exactly k terms: -sum_{i<k} M^i b."""
    m, b = _contraction(7, 0.7)
    a = m - jnp.eye(7)
    for k in (1, 2, 4):
        sol = lx.linear_solve(
            lx.MatrixLinearOperator(a),
            b,
            fp.linear.Neumann(rtol=0.0, atol=0.0, max_steps=k),
            throw=False,
        )
        expected = -sum(jnp.linalg.matrix_power(m, i) @ b for i in range(k))
        np.testing.assert_allclose(sol.value, expected, rtol=1e-13, atol=1e-14)
        assert sol.result == lx.RESULTS.max_steps_reached


def test_failure_codes():
    m, b = _contraction(5, 0.99)
    a = m - jnp.eye(5)
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(a),
        b,
        fp.linear.Neumann(rtol=1e-12, atol=1e-14, max_steps=3),
        throw=False,
    )
    assert sol.result == lx.RESULTS.max_steps_reached
    with pytest.raises(Exception, match="maximum number of solver steps"):
        lx.linear_solve(lx.MatrixLinearOperator(a), b, fp.linear.Neumann(rtol=1e-12, max_steps=3))
    # M = 3 I: the iteration u <- M u - b expands, a breakdown.
    expanding = lx.MatrixLinearOperator(2.0 * jnp.eye(5))
    sol = lx.linear_solve(expanding, b, fp.linear.Neumann(max_steps=200), throw=False)
    assert sol.result == lx.RESULTS.breakdown
    assert np.all(np.isfinite(sol.value))


def test_construction_errors():
    with pytest.raises(ValueError, match="max_steps"):
        fp.linear.Anderson(max_steps=0)
    with pytest.raises(ValueError, match="`m`"):
        fp.linear.Anderson(m=0)
    with pytest.raises(ValueError, match="beta"):
        fp.linear.Neumann(beta=2.0)
    with pytest.raises(ValueError, match="memory"):
        fp.linear.Broyden(memory=0)
    rect = lx.MatrixLinearOperator(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(rect, jnp.ones(3), fp.linear.Anderson())


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_nonfinite_operator_or_vector(name):
    """An operator or right-hand side holding NaN or inf is reported as such
    (lx.RESULTS.nonfinite_input: "received non-finite (NaN or inf) input"), not as a
    breakdown with advice about GMRES's `restart`; a finite but non-contractive
    problem is still a breakdown."""
    m, b = _contraction(5, 0.5)
    a = m - jnp.eye(5)
    solver = SOLVERS[name]()
    for op, vec in [
        (lx.MatrixLinearOperator(a.at[1, 2].set(jnp.nan)), b),
        (lx.MatrixLinearOperator(a.at[0, 0].set(jnp.inf)), b),
        (lx.MatrixLinearOperator(a), b.at[3].set(jnp.nan)),
    ]:
        sol = lx.linear_solve(op, vec, solver, throw=False)
        assert sol.result == lx.RESULTS.nonfinite_input
        with pytest.raises(Exception, match="non-finite"):
            lx.linear_solve(op, vec, solver)
