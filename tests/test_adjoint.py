"""Implicit differentiation: every forward solver x every backward solver against the
closed form, finite differences and unrolled differentiation; backward statistics;
approximate gradients."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


TOL: dict[str, Any] = dict(rtol=1e-11, atol=1e-12)
FORWARD = {
    "anderson": fp.Anderson(**TOL),
    "broyden": fp.Broyden(**TOL),
    "neumann": fp.Neumann(**TOL),
}
BACKWARD = {
    "anderson": fp.linear.Anderson(**TOL, max_steps=500),
    "broyden": fp.linear.Broyden(**TOL, max_steps=500),
    "neumann": fp.linear.Neumann(**TOL, max_steps=500),
}


def _adjoints():
    for name, solver in BACKWARD.items():
        yield f"fp-{name}", fp.ImplicitAdjoint(solver)
        yield f"optx-{name}", optx.ImplicitAdjoint(linear_solver=solver)


ADJOINTS = dict(_adjoints())


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _linear_problem(n=12, radius=0.8, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    a = jax.random.normal(k1, (n, n), jnp.float64)
    a = radius * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(k2, (n,), jnp.float64)
    c = jax.random.normal(k3, (n,), jnp.float64)
    return a, b, c


def _linear_fn(z, ab):
    a, b = ab
    return a @ z + b


@pytest.mark.parametrize("adjoint_name", sorted(ADJOINTS))
@pytest.mark.parametrize("forward_name", sorted(FORWARD))
def test_linear_closed_form(forward_name, adjoint_name):
    """z* = (I - A)^-1 b, so d(c.z*)/db = (I - A)^-T c and d(c.z*)/dA = u z*^T."""
    a, b, c = _linear_problem()
    n = b.size
    solver, adjoint = FORWARD[forward_name], ADJOINTS[adjoint_name]

    @jax.jit
    def loss(ab):
        sol = optx.fixed_point(_linear_fn, solver, jnp.zeros(n), ab, adjoint=adjoint, max_steps=500)
        return c @ sol.value

    grad_a, grad_b = jax.grad(loss)((a, b))
    eye = jnp.eye(n)
    z_star = jnp.linalg.solve(eye - a, b)
    u = jnp.linalg.solve((eye - a).T, c)
    np.testing.assert_allclose(grad_b, u, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(grad_a, jnp.outer(u, z_star), rtol=1e-8, atol=1e-9)


def test_linear_jacrev_and_jvp():
    """Full Jacobian dz*/db = (I - A)^-1 by reverse mode (our adjoint) and forward
    mode (optimistix's adjoint with our linear solver)."""
    a, b, _ = _linear_problem(n=6)
    n = b.size
    solver = FORWARD["broyden"]
    exact = jnp.linalg.inv(jnp.eye(n) - a)

    def z_star(b, adjoint):
        return optx.fixed_point(
            _linear_fn, solver, jnp.zeros(n), (a, b), adjoint=adjoint, max_steps=500
        ).value

    rev = jax.jacrev(lambda b: z_star(b, fp.ImplicitAdjoint(BACKWARD["anderson"])))(b)
    np.testing.assert_allclose(rev, exact, rtol=1e-8, atol=1e-9)
    fwd_adjoint = optx.ImplicitAdjoint(linear_solver=BACKWARD["broyden"])
    fwd = jax.jacfwd(lambda b: z_star(b, fwd_adjoint))(b)
    np.testing.assert_allclose(fwd, exact, rtol=1e-8, atol=1e-9)
    _, tangent = jax.jvp(lambda b: z_star(b, fwd_adjoint), (b,), (jnp.ones(n),))
    np.testing.assert_allclose(tangent, exact @ jnp.ones(n), rtol=1e-8, atol=1e-9)


def _tanh_problem(n=10, radius=0.9, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(k1, (n, n), jnp.float64)
    w = radius * w / jnp.linalg.norm(w, 2)
    x = jax.random.normal(k2, (n,), jnp.float64)
    return w, x


def _tanh_fn(z, wx):
    w, x = wx
    return jnp.tanh(w @ z + x)


def _tanh_loss(wx, solver, adjoint, max_steps=500):
    z = optx.fixed_point(
        _tanh_fn, solver, jnp.zeros(wx[1].size), wx, adjoint=adjoint, max_steps=max_steps
    ).value
    return jnp.sum(jnp.sin(z))


@pytest.mark.parametrize("backward_name", sorted(BACKWARD))
@pytest.mark.parametrize("forward_name", sorted(FORWARD))
def test_nonlinear_against_unrolled_and_finite_differences(forward_name, backward_name):
    wx = _tanh_problem()
    solver = FORWARD[forward_name]
    adjoint = fp.ImplicitAdjoint(BACKWARD[backward_name])
    grad = jax.jit(jax.grad(lambda wx: _tanh_loss(wx, solver, adjoint)))(wx)
    # Unrolled: differentiate through the iterations of plain iteration.
    unrolled = jax.jit(
        jax.grad(
            lambda wx: _tanh_loss(
                wx, fp.Neumann(**TOL), optx.RecursiveCheckpointAdjoint(), max_steps=2000
            )
        )
    )(wx)
    for g, u in zip(grad, unrolled):
        np.testing.assert_allclose(g, u, rtol=1e-7, atol=1e-9)
    # Central finite differences along random directions.
    loss = jax.jit(lambda wx: _tanh_loss(wx, solver, adjoint))
    key = jax.random.PRNGKey(7)
    for _ in range(3):
        key, k1, k2 = jax.random.split(key, 3)
        d = (jax.random.normal(k1, wx[0].shape), jax.random.normal(k2, wx[1].shape))
        h = 1e-5
        plus = loss(jtu.tree_map(lambda p, q: p + h * q, wx, d))
        minus = loss(jtu.tree_map(lambda p, q: p - h * q, wx, d))
        fd = (plus - minus) / (2 * h)
        directional = sum(jnp.vdot(g, q) for g, q in zip(grad, d))
        np.testing.assert_allclose(directional, fd, rtol=1e-6, atol=1e-8)


def test_pytree_against_unrolled():
    """A PyTree state {"u": (3,), "v": (2, 2)} coupled through a PyTree of params."""
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {
        "A": 0.3 * jax.random.normal(k[0], (3, 4)) / 2,
        "B": 0.3 * jax.random.normal(k[1], (4, 3)) / 2,
        "c": jax.random.normal(k[2], (3,)),
        "d": jax.random.normal(k[3], (2, 2)),
    }

    def f(z, p):
        u, v = z["u"], z["v"]
        new_u = jnp.tanh(p["A"] @ v.reshape(-1) + p["c"])
        new_v = jnp.tanh((p["B"] @ u).reshape(2, 2) + p["d"])
        return {"u": new_u, "v": new_v}

    z0 = {"u": jnp.zeros(3), "v": jnp.zeros((2, 2))}

    def loss(p, solver, adjoint, max_steps=500):
        z = optx.fixed_point(f, solver, z0, p, adjoint=adjoint, max_steps=max_steps).value
        return jnp.sum(z["u"] ** 2) + jnp.sum(jnp.cos(z["v"]))

    expected = jax.jit(
        jax.grad(lambda p: loss(p, fp.Neumann(**TOL), optx.RecursiveCheckpointAdjoint(), 2000))
    )(params)
    # Each forward solver with the backward solver of the same method (the full cross
    # product is covered on the flat nonlinear problem above).
    for name in FORWARD:
        got = jax.jit(
            jax.grad(lambda p: loss(p, FORWARD[name], fp.ImplicitAdjoint(BACKWARD[name])))
        )(params)
        for key in params:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-7, atol=1e-9)


def test_vmap_grad_and_backward_stats():
    w, _ = _tanh_problem(n=8)
    xs = jax.random.normal(jax.random.PRNGKey(5), (3, 8), jnp.float64)
    xs = xs * jnp.array([0.0, 1.0, 3.0])[:, None]  # different difficulty per sample
    adjoint = fp.ImplicitAdjoint(fp.linear.Anderson(rtol=1e-10, atol=1e-12))

    def loss(w, x, adjoint):
        z = optx.fixed_point(
            _tanh_fn, FORWARD["anderson"], jnp.zeros(8), (w, x), adjoint=adjoint
        ).value
        return jnp.sum(jnp.sin(z))

    per_sample = eqx.filter_jit(
        eqx.filter_vmap(eqx.filter_grad(lambda wa, x: loss(wa[0], x, wa[1])), in_axes=(None, 0))
    )
    grads_w, grads_adjoint = per_sample((w, adjoint), xs)
    unrolled = jax.grad(
        lambda w, x: _tanh_loss((w, x), fp.Neumann(**TOL), optx.RecursiveCheckpointAdjoint(), 2000)
    )
    expected = jax.jit(jax.vmap(unrolled, in_axes=(None, 0)))(w, xs)
    np.testing.assert_allclose(grads_w, expected, rtol=1e-7, atol=1e-9)
    stats = grads_adjoint.stats
    # linear.Anderson(m=5) to rtol = 1e-10 per sample: at x = 0, z* = 0 and J = W (the
    # full 0.9 contraction) takes 20 steps; tanh saturates on the larger inputs: 14, 8.
    np.testing.assert_array_equal(np.asarray(stats.num_steps), [20, 14, 8])
    assert np.all(stats.failed == 0)
    # Stopped (max norm) at |r_i| < atol + rtol |u_i|, where u = (I - J^T)^-1 cos(z*)
    # has max|u| <= ||cos(z*)||_2 / (1 - 0.9) <= sqrt(8) / 0.1.
    assert np.all(np.asarray(stats.residual_norm) < 1e-12 + 1e-10 * np.sqrt(8) / 0.1)
    # Unbatched adjoint under vmap: the statistics are summed over the batch.
    batch_loss = lambda wa: jnp.sum(jax.vmap(lambda x: loss(wa[0], x, wa[1]))(xs))
    _, summed = eqx.filter_grad(batch_loss)((w, adjoint))
    np.testing.assert_allclose(summed.stats.num_steps, jnp.sum(stats.num_steps))


def test_backward_statistics_match_a_direct_solve():
    a, b, c = _linear_problem()
    n = b.size
    backward = fp.linear.Neumann(rtol=1e-9, atol=1e-12, max_steps=500)
    adjoint = fp.ImplicitAdjoint(backward)

    def loss(ab_adj):
        ab, adj = ab_adj
        return (
            c
            @ optx.fixed_point(
                _linear_fn, FORWARD["anderson"], jnp.zeros(n), ab, adjoint=adj, max_steps=500
            ).value
        )

    _, g_adj = eqx.filter_grad(loss)(((a, b), adjoint))
    # The same backward system solved directly: (A - I)^T lam = c.
    operator = lx.MatrixLinearOperator((a - jnp.eye(n)).T)
    direct = lx.linear_solve(operator, c, backward)
    # linear.Neumann to rtol = 1e-9 on ||A|| = 0.8: 24 terms, in both.
    assert int(direct.stats["num_steps"]) == 24
    assert int(g_adj.stats.num_steps) == int(direct.stats["num_steps"])
    np.testing.assert_allclose(g_adj.stats.residual_norm, direct.stats["residual_norm"], rtol=1e-5)
    assert g_adj.stats.failed == 0


def test_backward_out_of_steps_is_reported():
    a, b, c = _linear_problem(radius=0.95)
    n = b.size
    short = fp.linear.Anderson(rtol=1e-12, atol=1e-14, max_steps=2)

    def loss(ab_adj):
        ab, adj = ab_adj
        return (
            c
            @ optx.fixed_point(
                _linear_fn, FORWARD["anderson"], jnp.zeros(n), ab, adjoint=adj, max_steps=500
            ).value
        )

    grads, g_adj = eqx.filter_grad(loss)(((a, b), fp.ImplicitAdjoint(short, throw=False)))
    assert g_adj.stats.failed == 1
    assert g_adj.stats.num_steps == 2
    assert np.all(np.isfinite(grads[1]))  # an approximation, flagged as such
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(eqx.filter_grad(loss)(((a, b), fp.ImplicitAdjoint(short))))


def test_noncontractive_backward_reports_failure():
    """f(z) = 2 z - 1 has the repelling fixed point z = 1: Broyden finds it, but the
    backward iteration w = v + 2 w diverges: a failure, never a silent garbage gradient."""

    def f(z, s):
        return 2.0 * z - s

    def loss(s_adj):
        s, adj = s_adj
        sol = optx.fixed_point(f, fp.Broyden(**TOL), jnp.zeros(3), s, adjoint=adj, max_steps=100)
        return jnp.sum(sol.value)

    s = jnp.ones(3)
    z = optx.fixed_point(f, fp.Broyden(**TOL), jnp.zeros(3), s, max_steps=100).value
    np.testing.assert_allclose(z, s)
    adjoint = fp.ImplicitAdjoint(fp.linear.Neumann(max_steps=200), throw=False)
    grad_s, g_adj = eqx.filter_grad(loss)((s, adjoint))
    assert g_adj.stats.failed == 1
    assert np.all(np.isnan(grad_s))
    with pytest.raises(Exception):
        jax.block_until_ready(
            eqx.filter_grad(loss)((s, fp.ImplicitAdjoint(fp.linear.Neumann(max_steps=200))))
        )
    # Broyden as the backward solver handles the non-contractive system: exact answer
    # d z*/d s = (I - 2I)^-1 (-1) = 1.
    grad_s, g_adj = eqx.filter_grad(loss)((s, fp.ImplicitAdjoint(fp.linear.Broyden(**TOL))))
    assert g_adj.stats.failed == 0
    np.testing.assert_allclose(grad_s, jnp.ones(3), rtol=1e-9)


def test_phantom_and_jacobian_free():
    a, b, c = _linear_problem(radius=0.6)
    n = b.size
    eye = jnp.eye(n)

    def grad_b(adjoint):
        def loss(b):
            return (
                c
                @ optx.fixed_point(
                    _linear_fn,
                    FORWARD["anderson"],
                    jnp.zeros(n),
                    (a, b),
                    adjoint=adjoint,
                    max_steps=500,
                ).value
            )

        return jax.grad(loss)(b)

    # JFB: (d f / d b)^T c = c.
    np.testing.assert_allclose(grad_b(fp.JacobianFreeAdjoint()), c, rtol=1e-12)
    # Phantom with k steps and damping beta = lam: lam * sum_{i<k} ((1-lam) I + lam A^T)^i c.
    for k, lam in [(3, 0.5), (7, 0.8)]:
        m = (1 - lam) * eye + lam * a.T
        expected = lam * sum(jnp.linalg.matrix_power(m, i) @ c for i in range(k))
        np.testing.assert_allclose(
            grad_b(fp.PhantomAdjoint(steps=k, beta=lam)), expected, rtol=1e-10
        )
    # Many undamped steps converge to the exact implicit gradient.
    exact = jnp.linalg.solve((eye - a).T, c)
    np.testing.assert_allclose(grad_b(fp.PhantomAdjoint(steps=200, beta=1.0)), exact, rtol=1e-9)
    with pytest.raises(ValueError, match="steps"):
        fp.PhantomAdjoint(steps=0)
    with pytest.raises(ValueError, match="beta"):
        fp.PhantomAdjoint(beta=1.5)


def test_approximate_adjoint_statistics_are_per_sample():
    """Under vmap with an unbatched adjoint, steps are summed over the batch for every
    adjoint alike (8 samples x k steps)."""

    def f(z, b):
        return 0.5 * z + b

    def batch_loss(b_adj):
        bs, adj = b_adj

        def one(b):
            return jnp.sum(
                optx.fixed_point(f, FORWARD["anderson"], jnp.zeros(2), b, adjoint=adj).value
            )

        return jnp.sum(jax.vmap(one)(bs))

    bs = jnp.ones((8, 2))
    for adjoint, steps in [(fp.PhantomAdjoint(steps=3), 3), (fp.JacobianFreeAdjoint(), 1)]:
        _, g_adj = eqx.filter_grad(batch_loss)((bs, adjoint))
        assert float(g_adj.stats.num_steps) == 8 * steps
        assert float(g_adj.stats.failed) == 0
