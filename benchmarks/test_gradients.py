"""Gradient of a fixed point: implicit differentiation with each backward solver and
with dense LU, against unrolled differentiation. Time (pytest-benchmark) and peak
temporary memory (XLA's memory analysis of the compiled gradient, in `extra_info`).

Problem: the DEQ cell z = tanh(W z + x), W symmetric with ||W||_2 = 0.9, float32,
forward solver `fixedpoint.Anderson(m=5)` at rtol = atol = 1e-5 for every method;
backward solvers at the same tolerance. The loss is sum(sin(z*)). In smoke mode
(the default test run, `--benchmark-disable`) each gradient runs once and is checked
against the dense-LU gradient; the n = 1,000 sizes are marked slow.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp


TOL = 1e-5


def _problem(n, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(k1, (n, n))
    w = (w + w.T) / 2
    w = 0.9 * w / jnp.linalg.norm(w, 2)
    x = jax.random.normal(k2, (n,))
    return w, x


def _cell(z, wx):
    w, x = wx
    return jnp.tanh(w @ z + x)


METHODS = {
    "implicit-anderson": lambda: fp.ImplicitAdjoint(fp.linear.Anderson(m=5, rtol=TOL, atol=TOL)),
    "implicit-broyden": lambda: fp.ImplicitAdjoint(fp.linear.Broyden(rtol=TOL, atol=TOL)),
    "implicit-neumann": lambda: fp.ImplicitAdjoint(fp.linear.Neumann(rtol=TOL, atol=TOL)),
    "implicit-dense-LU": lambda: optx.ImplicitAdjoint(lx.AutoLinearSolver(well_posed=True)),
    "unrolled": lambda: optx.RecursiveCheckpointAdjoint(),
}


def _grad_fn(n, adjoint):
    solver = fp.Anderson(m=5, rtol=TOL, atol=TOL)

    def loss(wx):
        z = optx.fixed_point(_cell, solver, jnp.zeros(n), wx, adjoint=adjoint, max_steps=300).value
        return jnp.sum(jnp.sin(z))

    return jax.jit(jax.grad(loss))


_REFERENCE = {}


def _reference(n, wx):
    if n not in _REFERENCE:
        _REFERENCE[n] = _grad_fn(n, METHODS["implicit-dense-LU"]())(wx)
    return _REFERENCE[n]


@pytest.mark.parametrize(
    "n", [128, pytest.param(1000, marks=pytest.mark.slow)], ids=lambda n: f"n{n}"
)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient(benchmark, method, n):
    benchmark.group = f"gradient tanh cell n={n}"
    wx = _problem(n)
    grad = _grad_fn(n, METHODS[method]())
    compiled = grad.lower(wx).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
        benchmark.extra_info["temp_MiB"] = analysis.temp_size_in_bytes / 2**20
    out = benchmark(lambda: jax.block_until_ready(compiled(wx)))
    expected = _reference(n, wx)
    for g, e in zip(out, expected):
        np.testing.assert_allclose(g, e, rtol=2e-2, atol=2e-3 * float(jnp.max(jnp.abs(e))))


@pytest.mark.slow  # (about 9 s; run with -m slow)
def test_memory_does_not_grow_with_iterations():
    """Peak temporary memory of one gradient at 10, 100 and 1,000 forward iterations:
    constant for the implicit adjoint, linear for unrolled differentiation that stores
    every iterate."""
    n = 64
    wx = _problem(n)

    def temp_bytes(adjoint, iterations):
        solver = fp.Neumann(rtol=0.0, atol=0.0)

        def loss(wx):
            sol = optx.fixed_point(
                _cell, solver, jnp.zeros(n), wx, adjoint=adjoint, max_steps=iterations, throw=False
            )
            return jnp.sum(sol.value)

        analysis = jax.jit(jax.grad(loss)).lower(wx).compile().memory_analysis()
        assert analysis is not None, "this backend reports no memory analysis"
        return analysis.temp_size_in_bytes

    implicit = fp.ImplicitAdjoint(fp.linear.Anderson(), throw=False)
    sizes = {}
    for iterations in (10, 100, 1000):
        sizes[iterations] = (
            temp_bytes(implicit, iterations),
            temp_bytes(optx.RecursiveCheckpointAdjoint(checkpoints=iterations), iterations),
        )
    implicit_sizes = {k: v[0] for k, v in sizes.items()}
    assert len(set(implicit_sizes.values())) == 1, implicit_sizes
    for iterations, (_, unrolled) in sizes.items():
        # Storing every iterate of an n-vector in float32: >= iterations * n * 4 bytes.
        assert unrolled >= iterations * n * 4, sizes
