"""Tolerances given as JAX arrays are traced by `optx.root_find` / `optx.fixed_point`
(equinox's `filter_jit`): a new value runs the compiled solve again instead of
compiling a new one. (Python numbers are part of the compiled program.)"""

import jax.numpy as jnp
import optimistix as optx
import pytest

import fixedpoint as fp


def _counting_map():
    traces = []

    def f(y, a):
        traces.append(None)  # runs once per trace, never per call
        return 0.5 * jnp.cos(y) + a

    return f, traces


@pytest.mark.parametrize(
    "cls", [fp.Anderson, fp.Broyden, fp.Neumann, fp.NewtonKrylov, fp.Polyalgorithm]
)
def test_array_tolerances_compile_nothing_again(cls):
    f, traces = _counting_map()
    y0, a = jnp.zeros(3), jnp.ones(3)

    def solve(rtol, atol):
        solver = cls(rtol=jnp.asarray(rtol), atol=jnp.asarray(atol))
        return int(optx.fixed_point(f, solver, y0, a, throw=False).stats["num_steps"])

    steps = {solve(1e-4, 1e-6)}
    traced = len(traces)
    steps |= {solve(1e-6, 1e-7), solve(1e-2, 1e-3)}
    assert len(traces) == traced
    assert len(steps) > 1  # (the values did reach the solve)
