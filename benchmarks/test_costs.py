"""What `benchmarks.costs` reports and the docs rely on, checked without timing."""

import math

import jax
import jax.numpy as jnp
import pytest

from . import costs


pytestmark = pytest.mark.usefixtures("x64")


@pytest.mark.parametrize("name", ["fp.Anderson", "fp.Broyden", "fp.Neumann"])
def test_tiny_solves_stay_under_the_inline_threshold(name):
    """XLA's CPU client runs an executable estimated below 1,000 flops on the calling
    thread and any other one on a worker thread, a hand-over that costs more than a
    4-unknown solve (see `costs.estimated_flops`). The tiny solves of all three are
    below it (jax 0.10.2: Anderson 994, Broyden 955 since it sums its rank-one terms
    on small states, Neumann 169); a change that pushes one over multiplies its fixed
    cost (Broyden's was 5x, at 2,000). (Both the estimate and the threshold are XLA's:
    after a jax upgrade that fails this, measure the fixed cost with `benchmarks.costs`
    before changing the bound.)"""
    n = 4
    w, x = 0.3 * jnp.eye(n, dtype=jnp.float64), jnp.ones(n, jnp.float64)
    solve = jax.jit(costs._solvers(n, 1e-8, 256)[f"{name} (fp.ImplicitAdjoint)"])
    assert costs.estimated_flops(solve, w, x) < 1000


def test_count_equations_recurses_into_inner_jaxprs():
    """sin, the inner jit, and the inner jit's mul and add: 4 (the top level has 2)."""
    inner = jax.jit(lambda y: y * 2 + 1)
    jaxpr = jax.make_jaxpr(lambda x: inner(jnp.sin(x)))(1.0).jaxpr
    assert len(jaxpr.eqns) == 2
    assert costs.count_equations(jaxpr) == 4


def test_step_costs_divide_by_the_steps_each_solver_took():
    """Ours and optimistix's run every step with zero tolerances; jaxopt's stops once its
    error is exactly 0, so each time is divided by the solver's own count (dividing by
    the requested steps once made jaxopt look four times faster per step)."""
    out = costs.step_costs(n=8, steps=60, calls=2)
    assert out["fp.Neumann"][1] == 60 and out["optx.FixedPointIteration"][1] == 60
    if "jaxopt.FixedPointIteration" in out:
        # Plain iteration of the 0.5-contraction reaches its floating-point fixed point
        # (an error of exactly 0) in 22 steps with fused multiply-adds, 23 without
        # (`XLA_FLAGS=--xla_cpu_max_isa=AVX`): where exactly depends on rounding.
        assert 21 <= out["jaxopt.FixedPointIteration"][1] <= 24
    assert all(math.isfinite(us) and us > 0 for us, _ in out.values())
