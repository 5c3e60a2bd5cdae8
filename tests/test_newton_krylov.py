"""`fp.NewtonKrylov`, its GMRES, and `fp.Polyalgorithm`: closed forms (linear
problems, where a Newton step is exact), Krylov-space optimality, PyTrees and dtypes,
batching, implicit gradients against finite differences, and the polyalgorithm's
hand-over."""

import functools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
from hypothesis import given, settings

import fixedpoint as fp
from fixedpoint._solver._krylov import gmres


pytestmark = pytest.mark.strict_promotion


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _matrix(seed: int, n: int, complex_: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n)) + 2 * np.eye(n)
    if complex_:
        a = a + 1j * rng.normal(size=(n, n))
    return a


@functools.partial(jax.jit, static_argnames="dim")
def _gmres_dense(a, b, *, dim):
    return gmres(
        lambda v: a @ v, b, dim=dim, tol=jnp.array(0.0), active=jnp.array(True), acc=a.dtype
    )


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("dim", [3, 6])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_gmres_minimises_the_residual_over_the_krylov_space(seed, dim, complex_):
    n = 5
    a = _matrix(seed, n, complex_)
    b = np.random.default_rng(seed + 1).normal(size=n).astype(a.dtype)
    sol = _gmres_dense(jnp.asarray(a), jnp.asarray(b), dim=dim)
    k = int(sol.num_products)
    assert 1 <= k <= min(dim, n)
    # The minimiser of ||b - A x|| over span{b, A b, ..., A^(k-1) b}, by least squares.
    krylov = np.stack([np.linalg.matrix_power(a, i) @ b for i in range(k)], axis=1)
    coeff = np.linalg.lstsq(a @ krylov, b, rcond=None)[0]
    best = np.linalg.norm(b - a @ krylov @ coeff)
    achieved = np.linalg.norm(b - a @ np.asarray(sol.x))
    assert achieved <= best + 1e-9 * np.linalg.norm(b)
    assert float(sol.residual) == pytest.approx(achieved, abs=1e-9 * float(np.linalg.norm(b)))
    if dim >= n:  # the whole space: the exact solution
        np.testing.assert_allclose(sol.x, np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


def test_gmres_stops_at_the_tolerance_and_on_a_singular_operator():
    a = _matrix(0, 12, False)
    b = np.ones(12)
    acc = jnp.dtype(jnp.float64)
    on, off = jnp.array(True), jnp.array(False)
    loose = gmres(
        lambda v: jnp.asarray(a) @ v, jnp.asarray(b), dim=12, tol=jnp.array(0.5), active=on, acc=acc
    )
    assert float(loose.residual) <= 0.5 < np.linalg.norm(b)
    assert np.linalg.norm(b - a @ np.asarray(loose.x)) == pytest.approx(float(loose.residual))
    idle = gmres(
        lambda v: jnp.asarray(a) @ v,
        jnp.asarray(b),
        dim=12,
        tol=jnp.array(0.0),
        active=off,
        acc=acc,
    )
    assert int(idle.num_products) == 0 and not np.any(np.asarray(idle.x))
    # diag(1, 2, 0): no solution; the least residual, 1, with a finite x.
    singular = gmres(
        lambda v: jnp.array([1.0, 2.0, 0.0]) * v,
        jnp.ones(3),
        dim=3,
        tol=jnp.array(0.0),
        active=on,
        acc=acc,
    )
    assert np.all(np.isfinite(singular.x))
    assert float(singular.residual) == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(singular.x)[:2], [1.0, 0.5])


def _linear(y, args):
    a, b = args
    return a @ y - b


def test_a_newton_step_solves_a_linear_problem():
    # g(y) = A y - b: with eta_max = 0 the first direction is exact, so the second
    # evaluation is at the root (4 products: GMRES is exact after n = 4).
    a = jnp.asarray(_matrix(3, 4, False))
    b = jnp.arange(1.0, 5.0)
    solver = fp.NewtonKrylov(rtol=1e-10, atol=1e-10, eta_max=0.0)
    sol = optx.root_find(_linear, solver, jnp.zeros(4), (a, b))
    np.testing.assert_allclose(sol.value, np.linalg.solve(a, b), rtol=1e-10)
    assert int(sol.stats["num_steps"]) == 2
    assert int(sol.stats["num_jvps"]) == 4
    assert int(sol.state.num_backtracks) == 0
    # An exact inverse as preconditioner: one product per direction.
    inverse = jnp.linalg.inv(a)
    pre = fp.NewtonKrylov(rtol=1e-10, atol=1e-10, eta_max=0.0, preconditioner=lambda v: inverse @ v)
    sol = optx.root_find(_linear, pre, jnp.zeros(4), (a, b))
    np.testing.assert_allclose(sol.value, np.linalg.solve(a, b), rtol=1e-10)
    assert (int(sol.stats["num_steps"]), int(sol.stats["num_jvps"])) == (2, 1)


def _tree_problem(y, theta):
    # Componentwise y^3 + y = theta on a PyTree: the root has dy/dtheta = 1 / (3 y^2 + 1).
    return jax.tree.map(lambda v, t: v**3 + v - t, y, theta), None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_pytree_dtype_and_vmap(dtype):
    theta = {"a": jnp.array([0.5, 2.0], dtype), "b": jnp.array(10.0, dtype)}
    y0 = jax.tree.map(jnp.zeros_like, theta)
    tol = 1e-5 if dtype == jnp.float32 else 1e-10
    solver = fp.NewtonKrylov(rtol=tol, atol=tol)

    def solve(theta):
        sol = optx.root_find(_tree_problem, solver, y0, theta, has_aux=True)
        return sol.value, sol.stats["num_steps"], sol.result

    value, steps, result = jax.jit(solve)(theta)
    assert result == optx.RESULTS.successful
    for leaf, t in zip(jax.tree.leaves(value), jax.tree.leaves(theta)):
        assert leaf.dtype == dtype
        np.testing.assert_allclose(leaf**3 + leaf, t, rtol=10 * tol, atol=10 * tol)
    if dtype == jnp.float32:
        return
    # A batch: each sample as if solved alone (its own step count).
    batch = jax.tree.map(lambda t: jnp.stack([t, 0.1 * t, t]), theta)
    values, counts, _ = jax.jit(jax.vmap(solve))(batch)
    for i in range(3):
        alone = jax.jit(solve)(jax.tree.map(lambda t: t[i], batch))
        assert int(counts[i]) == int(alone[1])
        for x, z in zip(jax.tree.leaves(values), jax.tree.leaves(alone[0])):
            np.testing.assert_array_equal(x[i], z)
    assert int(counts[1]) < int(counts[0]) == int(counts[2])


def _cubic(y, theta):
    return theta * y**3 + y - jnp.array([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "solver", [fp.NewtonKrylov(rtol=1e-12, atol=1e-12), fp.Polyalgorithm(rtol=1e-12, atol=1e-12)]
)
def test_implicit_gradient_against_the_closed_form_and_finite_differences(solver):
    def root(theta):
        return optx.root_find(
            _cubic, solver, jnp.zeros(3), theta, adjoint=fp.ImplicitAdjoint()
        ).value

    theta, h = 0.7, 1e-6
    # One compilation each: the solutions at theta, theta +- h, and the gradient.
    y, up, down = jax.jit(jax.vmap(root))(jnp.array([theta, theta + h, theta - h]))
    grad = jax.jit(jax.jacobian(root))(jnp.array(theta))
    # d/dtheta of theta y^3 + y = c: dy/dtheta = -y^3 / (3 theta y^2 + 1).
    np.testing.assert_allclose(grad, -(y**3) / (3 * theta * y**2 + 1), rtol=1e-8)
    np.testing.assert_allclose(grad, (up - down) / (2 * h), rtol=1e-6)


def _helical_valley(y, args):
    x1, x2, x3 = y[0], y[1], y[2]
    theta = jnp.arctan(x2 / x1) / (2 * jnp.pi) + jnp.where(x1 > 0, 0.0, 0.5)
    return jnp.stack([10 * (x3 - 10 * theta), 10 * (jnp.sqrt(x1**2 + x2**2) - 1), x3])


def _solve_poly(y0):
    solver = fp.Polyalgorithm(rtol=1e-10, atol=1e-10)
    return optx.root_find(_helical_valley, solver, y0, max_steps=1000, throw=False)


def test_polyalgorithm_hands_over_from_the_best_point():
    # Anderson stalls on the helical valley (its best residual not halved in 50
    # evaluations), and Newton-Krylov takes over from its best point; from a point
    # on the valley's floor Anderson converges by itself.
    run = jax.jit(_solve_poly)
    starts = jnp.array([[-1.0, 0.0, 0.0], [1.0, 1e-3, 0.0]])
    hard, easy = run(starts[0]), run(starts[1])
    for sol in (hard, easy):
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, [1.0, 0.0, 0.0], atol=1e-9)
    assert int(hard.stats["method"]) == 1
    steps = np.asarray(hard.stats["steps_per_method"])
    assert steps[0] % 50 == 0 and steps[1] > 0
    assert int(hard.stats["num_steps"]) == steps.sum()
    assert int(hard.stats["num_jvps"]) > 0
    assert int(easy.stats["method"]) == 0 and int(easy.stats["num_jvps"]) == 0
    # Batched, each sample takes its own path.
    both = jax.jit(jax.vmap(_solve_poly))(starts)
    np.testing.assert_array_equal(both.stats["method"], [1, 0])
    np.testing.assert_array_equal(both.stats["steps_per_method"][0], steps)
    np.testing.assert_array_equal(both.value[0], hard.value)


def test_polyalgorithm_reports_failure_of_the_last_method():
    # y^2 + 1 = 0 has no real root: Anderson stalls, Newton-Krylov runs out of steps
    # (a finite iterate, and the code that says so).
    sol = optx.root_find(
        lambda y, _: y**2 + 1, fp.Polyalgorithm(), jnp.array([3.0]), max_steps=300, throw=False
    )
    assert sol.result == optx.RESULTS.nonlinear_max_steps_reached
    assert int(sol.stats["method"]) == 1
    assert np.all(np.isfinite(sol.value))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: fp.NewtonKrylov(krylov_dim=0), "krylov_dim"),
        (lambda: fp.NewtonKrylov(eta_max=1.0), "eta_max"),
        (lambda: fp.NewtonKrylov(preconditioner=3), "preconditioner"),  # pyright: ignore[reportArgumentType]
        (lambda: fp.NewtonKrylov(max_backtracks=-1), "max_backtracks"),
        (lambda: fp.Polyalgorithm(stall_steps=0), "stall_steps"),
        (lambda: fp.Polyalgorithm(stall_factor=0.0), "stall_factor"),
        (lambda: fp.Polyalgorithm(solvers=()), "solvers"),
        (lambda: fp.Polyalgorithm(solvers=(optx.Newton(1e-3, 1e-3),)), "solvers"),  # pyright: ignore[reportArgumentType]
        (lambda: fp.Polyalgorithm(rtol=-1.0), "rtol"),
    ],
)
def test_invalid_hyperparameters_name_the_parameter(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()


def test_polyalgorithm_gives_its_tolerances_to_every_method():
    poly = fp.Polyalgorithm(rtol=1e-7, atol=1e-9, norm=optx.rms_norm, trace_length=3)
    for solver in poly.methods():
        assert (solver.rtol, solver.atol, solver.norm, solver.trace_length) == (
            1e-7,
            1e-9,
            optx.rms_norm,
            3,
        )
    # Replacing the tolerances afterwards (as diffrax does) reaches every method.
    looser = eqx.tree_at(lambda p: (p.rtol, p.atol), poly, (1e-3, 1e-3))
    assert all((s.rtol, s.atol) == (1e-3, 1e-3) for s in looser.methods())
    assert eqx.tree_equal(
        poly.methods()[1], fp.NewtonKrylov(1e-7, 1e-9, optx.rms_norm, trace_length=3)
    )
