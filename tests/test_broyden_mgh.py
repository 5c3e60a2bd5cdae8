"""`fp.Broyden(jacobian="exact")`: the Moré-Garbow-Hillstrom problems it solves (one
compilation for all 23), an exact first step on a linear problem, the count of
Jacobian-vector products, a singular Jacobian, validation, and the default unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp
from benchmarks.problems.mgh import by_name, MGH_PROBLEMS, padded


pytestmark = pytest.mark.strict_promotion


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# Freudenstein-Roth's iterates go to the local minimum of |g| near (11.41, -0.897).
UNSOLVED = {"freudenstein_roth"}


@pytest.mark.slow  # (the MGH sets of the default methods run by default: test_nonlinear_problems)
def test_exact_solves_mgh():
    problems = padded()
    solver = fp.Broyden(rtol=1e-10, atol=1e-10, jacobian="exact")

    @jax.jit
    @jax.vmap
    def solve(y0, index):
        sol = optx.root_find(problems.fn, solver, y0, index, max_steps=10_000, throw=False)
        return sol.value, sol.stats["num_jvps"]

    values, jvps = solve(jnp.asarray(problems.y0), jnp.arange(len(MGH_PROBLEMS)))
    unsolved = {
        p.name
        for i, p in enumerate(MGH_PROBLEMS)
        if not p.residual(problems.unpad(values[i], i)) <= 1e-6
    }
    assert unsolved == UNSOLVED
    # Every solve forms J at y_0: n_max = 10 products at least.
    assert np.all(np.asarray(jvps) >= problems.n_max)
    assert np.all(np.asarray(jvps) % problems.n_max == 0)


def test_exact_first_step_solves_linear():
    rng = np.random.default_rng(0)
    n = 5
    a = jnp.asarray(rng.normal(size=(n, n)) + 3 * np.eye(n))
    b = jnp.asarray(rng.normal(size=n))
    solver = fp.Broyden(rtol=1e-12, atol=1e-12, jacobian="exact")
    sol = optx.root_find(lambda y, _: a @ y - b, solver, jnp.zeros(n), max_steps=20)
    np.testing.assert_allclose(sol.value, np.linalg.solve(a, b), rtol=1e-12)
    assert int(sol.stats["num_steps"]) == 2  # g(y_0), then g(y_1) = 0
    assert int(sol.stats["num_jvps"]) == n  # one Jacobian


def test_exact_pytree_and_jvp_count():
    # A PyTree state of 3 numbers: every Jacobian costs 3 products.
    def fn(y, _):
        return {"a": y["a"] ** 3 - 8.0, "b": jnp.sin(y["b"]) - 0.5 * y["a"] / 2}

    y0 = {"a": jnp.array(1.0), "b": jnp.array([0.1, 0.2])}
    sol = optx.root_find(
        fn, fp.Broyden(rtol=1e-10, atol=1e-10, jacobian="exact"), y0, max_steps=100
    )
    np.testing.assert_allclose(sol.value["a"], 2.0, rtol=1e-9)
    np.testing.assert_allclose(np.sin(sol.value["b"]), 0.5, rtol=1e-9)
    jvps = int(sol.stats["num_jvps"])
    assert jvps >= 3 and jvps % 3 == 0
    assert int(sol.state.num_jvps) == jvps


def test_exact_singular_jacobian_falls_back():
    # J_g(0) = 0: H starts from gamma I (a damped Picard step), no NaN.
    sol = optx.root_find(
        lambda y, _: y**3 - 1.0,
        fp.Broyden(rtol=1e-10, atol=1e-10, jacobian="exact"),
        jnp.zeros(2),
        max_steps=200,
        throw=False,
    )
    assert np.all(np.isfinite(np.asarray(sol.value)))
    np.testing.assert_allclose(sol.value, [1.0, 1.0], rtol=1e-8)


def test_jacobian_validation():
    with pytest.raises(ValueError, match="jacobian"):
        fp.Broyden(jacobian="dense")


def test_default_unchanged():
    # Counts of the default (identity) solver, pinned before the option was added.
    p = by_name("helical_valley")
    sol = optx.root_find(
        lambda y, _: p.fn(y),
        fp.Broyden(rtol=1e-10, atol=1e-10),
        jnp.asarray(p.y0),
        max_steps=10_000,
        throw=False,
    )
    assert int(sol.stats["num_steps"]) == HELICAL_STEPS
    assert int(sol.stats["num_jvps"]) == 0
    a = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)) * 0.2)
    sol = optx.fixed_point(
        lambda y, _: jnp.tanh(a @ y + 1.0), fp.Broyden(), jnp.zeros(6), max_steps=100
    )
    assert int(sol.stats["num_steps"]) == TANH_STEPS
    assert int(sol.state.num_backtracks) == TANH_BACKTRACKS


HELICAL_STEPS = 127
TANH_STEPS = 7
TANH_BACKTRACKS = 0
