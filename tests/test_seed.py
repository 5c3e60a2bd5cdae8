"""The seed API `FixedPointSolver`: gradients through it, with and without the backward
statistics (`solver_stats=True`)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from fixedpoint_deq import FixedPointSolver


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


def _problem():
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    a = {
        "w": 0.4 * jax.random.normal(k1, (4, 4), jnp.float64) / 2,
        "b": jax.random.normal(k2, (4,), jnp.float64),
    }
    readout = jax.random.normal(k3, (4,), jnp.float64)
    return a, readout


def test_grad_with_solver_stats_equals_grad_without_and_finite_differences(enable_x64):
    """`x_star` (and `jac_reg`) are differentiable with `solver_stats=True` too: the
    statistics' backward solve is not part of the differentiated computation. Checked
    for the parameters `a` and for a parameter `f` closes over."""
    a, readout = _problem()
    seed = FixedPointSolver(
        fwd_iterations=200, fwd_tol=1e-13, bwd_solver="anderson", bwd_iterations=200, bwd_tol=1e-13
    )
    key = jax.random.key(0)

    def loss(params, solver_stats):
        a, scale = params

        def f(x, a):
            return jnp.tanh(scale * (a["w"] @ x) + a["b"])

        x_star, jac_reg, stats = seed(f, jnp.zeros(4), a, key, solver_stats=solver_stats)
        return jnp.dot(readout, x_star) + 0.3 * jac_reg, stats

    params = (a, jnp.asarray(1.2, jnp.float64))
    (value, stats), grads = jax.jit(jax.value_and_grad(lambda p: loss(p, True), has_aux=True))(
        params
    )
    assert bool(stats["fwd_converged"]) and bool(stats["bwd_converged"])
    # Anderson (m=3, beta=0.5) to 1e-13: the forward solve in 23 evaluations, the
    # backward one in 15 (float64).
    assert float(stats["fwd_steps"]) == 23 and float(stats["bwd_steps"]) == 15
    # The backward solution u = (I - J^T)^-1 readout, with ||J|| <= 1.2 ||w||, has
    # max|u| <= ||readout|| / (1 - 1.2 ||w||); the solve stopped (max norm) at
    # |r_i| < atol + rtol |u_i|, with rtol = 1e-13 and atol = 1e-2 rtol.
    u_max = np.linalg.norm(readout) / (1 - 1.2 * np.linalg.norm(a["w"], 2))
    assert float(stats["bwd_residual"]) < 1e-13 * (1e-2 + u_max)
    plain = jax.jit(jax.grad(lambda p: loss(p, False)[0]))(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_grad = jax.flatten_util.ravel_pytree(grads)[0]
    np.testing.assert_allclose(flat_grad, jax.flatten_util.ravel_pytree(plain)[0], rtol=1e-10)
    # Central differences along every coordinate, in one batched solve.
    eps = 1e-6
    steps = eps * jnp.eye(flat.size, dtype=flat.dtype)
    values = jax.jit(jax.vmap(lambda p: loss(unravel(p), False)[0]))
    fd = (values(flat + steps) - values(flat - steps)) / (2 * eps)
    np.testing.assert_allclose(flat_grad, fd, rtol=1e-6, atol=1e-8)
    assert flat_grad[-1] != 0  # the closed-over parameter gets its gradient
