"""Dtypes: float16 and bfloat16 states, complex states (complex64, complex128), for the
three root finders and the three `fixedpoint.linear` solvers: right answers, the
state's dtype kept, and real residual norms."""

import functools

import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp


pytestmark = [
    pytest.mark.strict_promotion,
    pytest.mark.filterwarnings("ignore:Complex support in Optimistix is a work in progress"),
]

N = 8
# Broyden keeps its rank-one terms summed as an N x N matrix when N <= memory (the
# default 30), and as pairs of vectors otherwise: "broyden-pairs" (memory 3, less than
# every state here) checks the latter.
SOLVERS = {
    "anderson": fp.Anderson,
    "broyden": fp.Broyden,
    "broyden-pairs": functools.partial(fp.Broyden, memory=3),
    "neumann": fp.Neumann,
}
LINEAR = {
    "anderson": fp.linear.Anderson,
    "broyden": fp.linear.Broyden,
    "broyden-pairs": functools.partial(fp.linear.Broyden, memory=3),
    "neumann": fp.linear.Neumann,
}
# A few units of the dtype's epsilon (float16 9.8e-4, bfloat16 7.8e-3), relative.
HALF_TOL = {"float16": 1e-2, "bfloat16": 4e-2}


def _contraction(dtype, seed=0, radius=0.5):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((N, N))
    b = rng.standard_normal(N)
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
        m = m + 1j * rng.standard_normal((N, N))
        b = b + 1j * rng.standard_normal(N)
    return radius * m / np.linalg.norm(m, 2), b


def _affine(z, args):
    m, b = args
    return m @ z + b


def _tanh(z, args):
    m, b = args
    return jnp.tanh(m @ z + b)


def _check_dtypes(sol, dtype):
    assert sol.value.dtype == dtype
    residual_norm = sol.stats["residual_norm"]
    assert not jnp.iscomplexobj(residual_norm)
    assert residual_norm.dtype == jnp.finfo(dtype).dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_half_precision_root_finders(name, dtype):
    """z = M z + b and z = tanh(M z + b), ||M|| = 0.5, in float16 / bfloat16: solved to
    the dtype's accuracy, in the dtype. (Anderson's small least-squares solve used to
    crash in LAPACK: "Unsupported dtype".)"""
    tol = HALF_TOL[dtype]
    m, b = _contraction("float64")
    exact = np.linalg.solve(np.eye(N) - m, b)
    args = (jnp.asarray(m, dtype), jnp.asarray(b, dtype))
    solver = SOLVERS[name](rtol=tol, atol=tol)
    sol = optx.fixed_point(_affine, solver, jnp.zeros(N, dtype), args, max_steps=100, throw=False)
    assert sol.result == optx.RESULTS.successful
    _check_dtypes(sol, dtype)
    # |g| < tol (1 + |z|) and ||(I - M)^-1|| <= 2: |z - z*| < 2 tol (1 + |z|) + rounding.
    value = np.asarray(sol.value, np.float64)
    np.testing.assert_allclose(value, exact, rtol=0, atol=3 * tol * (1 + np.abs(exact).max()))
    sol = optx.fixed_point(_tanh, solver, jnp.zeros(N, dtype), args, max_steps=100, throw=False)
    assert sol.result == optx.RESULTS.successful
    _check_dtypes(sol, dtype)
    z = np.asarray(sol.value, np.float64)
    assert np.abs(np.tanh(m @ z + b) - z).max() < 3 * tol * (1 + np.abs(z).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(LINEAR))
def test_half_precision_linear_solvers(name, dtype):
    """lx.linear_solve with (M - I) u = b in float16 / bfloat16."""
    tol = HALF_TOL[dtype]
    m, b = _contraction("float64", seed=1)
    a = m - np.eye(N)
    operator = lx.MatrixLinearOperator(jnp.asarray(a, dtype))
    sol = lx.linear_solve(
        operator, jnp.asarray(b, dtype), LINEAR[name](rtol=tol, atol=tol), throw=False
    )
    assert sol.result == lx.RESULTS.successful
    assert sol.value.dtype == dtype
    exact = np.linalg.solve(a, b)
    np.testing.assert_allclose(
        np.asarray(sol.value, np.float64), exact, rtol=0, atol=3 * tol * (1 + np.abs(exact).max())
    )


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_complex_linear(name, dtype, enable_x64):
    """z = A z + b with complex A (||A|| = 0.9, eigenvalues spread over the complex
    plane) and complex b: the closed form (I - A)^-1 b, and a real residual norm.
    (Broyden diverged: its rank-one update did not conjugate; Anderson's Gram matrix
    was not Hermitian; the residual norms came back complex.)"""
    tol = {"complex64": 1e-5, "complex128": 1e-11}[dtype]
    m, b = _contraction(dtype, seed=2, radius=0.9)
    exact = np.linalg.solve(np.eye(N) - m, b)
    args = (jnp.asarray(m, dtype), jnp.asarray(b, dtype))
    solver = SOLVERS[name](rtol=tol, atol=tol)
    sol = optx.fixed_point(_affine, solver, jnp.zeros(N, dtype), args, max_steps=1000, throw=False)
    assert sol.result == optx.RESULTS.successful
    _check_dtypes(sol, dtype)
    # ||(I - A)^-1|| <= 10.
    np.testing.assert_allclose(sol.value, exact, rtol=0, atol=20 * tol * (1 + np.abs(exact).max()))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_complex_rotation(name):
    """z = 0.9 e^{i theta_j} z_j + (1 + i), rotations of different angles: Broyden
    used to stop with a divergence; now every solver converges, Anderson and Broyden
    in a few steps.

    Evaluations, complex64 (7, 9, 51 and 115 or 116 measured; rounding may move them
    by one or two): plain iteration's residual is 0.9^k sqrt(2) at step k, below the
    tolerance 1e-6 + 1e-5 |z| = 8.4e-6 of the slowest component (theta = 3, |z| = 0.74)
    first at k = 115 in exact arithmetic (evaluation 116), with a 2% margin at k = 114
    that the float32 rounding of the iterates (~10% of that residual) can cross."""
    phases = jnp.asarray(np.exp(1j * np.linspace(0.0, 3.0, 4)), jnp.complex64)
    exact = (1 + 1j) / (1 - 0.9 * np.asarray(phases))
    solver = SOLVERS[name](rtol=1e-5, atol=1e-6)
    sol = optx.fixed_point(
        lambda z, c: 0.9 * c * z + (1 + 1j),
        solver,
        jnp.zeros(4, jnp.complex64),
        phases,
        max_steps=500,
        throw=False,
    )
    assert sol.result == optx.RESULTS.successful
    _check_dtypes(sol, jnp.complex64)
    # z - z* = g(z) / (0.9 c - 1) componentwise, and |g_j| < 1e-6 + 1e-5 |z_j|
    # (plus a few float32 ulps of z).
    bound = (1e-6 + 1.1e-5 * np.abs(exact)) / np.abs(1 - 0.9 * np.asarray(phases))
    assert np.all(np.abs(np.asarray(sol.value) - exact) <= bound), (sol.value, exact)
    low, high = {
        "anderson": (6, 8),
        "broyden": (8, 10),
        "broyden-pairs": (48, 54),  # (memory 3 restarts every 3 updates)
        "neumann": (114, 117),
    }[name]
    assert low <= int(sol.stats["num_steps"]) <= high, int(sol.stats["num_steps"])


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_complex_nonlinear(name, enable_x64):
    """z = tanh(A z + b) with complex A (||A|| = 0.5) and b, in complex128: the
    returned point is a fixed point to the tolerance."""
    m, b = _contraction("complex128", seed=3)
    args = (jnp.asarray(m), jnp.asarray(b))
    solver = SOLVERS[name](rtol=1e-10, atol=1e-12)
    sol = optx.fixed_point(
        _tanh, solver, jnp.zeros(N, jnp.complex128), args, max_steps=500, throw=False
    )
    assert sol.result == optx.RESULTS.successful
    _check_dtypes(sol, jnp.complex128)
    z = np.asarray(sol.value)
    assert np.abs(np.tanh(m @ z + b) - z).max() < 1e-12 + 1e-10 * np.abs(z).max()


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_complex_linear_solvers(name, enable_x64):
    """lx.linear_solve with a complex operator (M - I) and its transpose."""
    m, b = _contraction("complex128", seed=4, radius=0.8)
    a = m - np.eye(N)
    operator = lx.MatrixLinearOperator(jnp.asarray(a))
    solver = LINEAR[name](rtol=1e-12, atol=1e-13, max_steps=1000)
    sol = lx.linear_solve(operator, jnp.asarray(b), solver)
    np.testing.assert_allclose(sol.value, np.linalg.solve(a, b), rtol=0, atol=1e-10)
    assert not jnp.iscomplexobj(sol.stats["residual_norm"])
    sol = lx.linear_solve(operator.T, jnp.asarray(b), solver)
    np.testing.assert_allclose(sol.value, np.linalg.solve(a.T, b), rtol=0, atol=1e-10)
