import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixedpoint as fp


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


def _cell(z, p):
    w, x = p
    return jnp.tanh(w @ z + x)


def _setup(n=6, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = jax.random.normal(k1, (n, n)) / jnp.sqrt(n)
    x = jax.random.normal(k2, (n,))
    z = jax.random.normal(k3, (n,))
    return (w, x), z


def _exact(p, z):
    jac = jax.jacfwd(lambda zz: _cell(zz, p))(z)
    return jnp.sum(jac**2) / z.size


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_unbiased(probe):
    """One probe's estimate is v^T M v / d with M = J^T J: its mean is ||J||_F^2 / d and
    its variance 2 tr(M^2) / d^2 for Gaussian probes, 2 (tr(M^2) - sum_i M_ii^2) / d^2
    for Rademacher ones. Over 4000 probes (a fixed key: deterministic) the mean is
    within five standard errors of the exact value, and the spread is the probe's own
    (the two differ by 40% here)."""
    p, z = _setup()
    exact = _exact(p, z)
    jac = np.asarray(jax.jacfwd(lambda zz: _cell(zz, p))(z), np.float64)
    m = jac.T @ jac
    square = np.trace(m @ m) - (np.sum(np.diag(m) ** 2) if probe == "rademacher" else 0.0)
    std = np.sqrt(2 * square) / z.size
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    est = jax.vmap(lambda k: fp.jacobian_regularisation(_cell, z, p, key=k, probe=probe))(keys)
    est = np.asarray(est, np.float64)
    assert np.all(est >= 0)
    assert abs(np.mean(est) - float(exact)) < 5 * std / np.sqrt(est.size)
    # (The sample standard deviation of 4000 such quadratic forms is within ~3%.)
    np.testing.assert_allclose(np.std(est), std, rtol=0.1)


def test_samples_average_and_gradient():
    p, z = _setup()
    many = fp.jacobian_regularisation(
        _cell, z, p, key=jax.random.PRNGKey(2), samples=20000, probe="rademacher"
    )
    np.testing.assert_allclose(many, _exact(p, z), rtol=0.03)
    # Differentiable with respect to the parameters of f: matches the exact gradient.
    grad_est = jax.grad(
        lambda p: fp.jacobian_regularisation(
            _cell, z, p, key=jax.random.PRNGKey(3), samples=20000, probe="rademacher"
        )
    )(p)
    grad_exact = jax.grad(lambda p: _exact(p, z))(p)
    for g, e in zip(grad_est, grad_exact):
        np.testing.assert_allclose(g, e, rtol=0.1, atol=0.02 * float(jnp.max(jnp.abs(e))))


def test_pytree_state_and_linear_map():
    """For f(z) = A z on a PyTree, Rademacher probes on a diagonal A are exact."""
    diag = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}

    def f(z, d):
        return {"a": d["a"] * z["a"], "b": d["b"] * z["b"]}

    z = {"a": jnp.zeros(2), "b": jnp.zeros((1, 1))}
    est = fp.jacobian_regularisation(f, z, diag, key=jax.random.PRNGKey(0), probe="rademacher")
    np.testing.assert_allclose(est, (1 + 4 + 9) / 3, rtol=1e-6)


def test_bad_arguments():
    p, z = _setup()
    with pytest.raises(ValueError, match="samples"):
        fp.jacobian_regularisation(_cell, z, p, key=jax.random.PRNGKey(0), samples=0)
    with pytest.raises(ValueError, match="probe"):
        fp.jacobian_regularisation(_cell, z, p, key=jax.random.PRNGKey(0), probe="uniform")  # pyright: ignore[reportArgumentType]
