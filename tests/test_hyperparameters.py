"""Tolerances and `beta` are traced: changing them compiles nothing again; a model
holding a solver keeps them out of its trainable leaves."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp
import fixedpoint_deq as fdeq
from fixedpoint.internal import static_hyperparameters, TRACED_HYPERPARAMETERS


#: The root finders whose tolerances and `beta` are traced.
TRACED = [fp.Anderson, fp.Broyden, fp.Neumann]


def _counting_map():
    traces = []

    def f(y, a):
        traces.append(None)  # runs once per trace, never per call
        return 0.5 * jnp.cos(y) + a

    return f, traces


@pytest.mark.parametrize("cls", TRACED)
def test_new_tolerances_and_beta_compile_nothing_again(cls):
    """`optx.fixed_point` is an `eqx.filter_jit`: a Python float among the solver's
    fields would be part of the compiled program, and each new value would trace and
    compile the solve again (seconds each)."""
    f, traces = _counting_map()
    y0, a = jnp.zeros(3), jnp.ones(3)
    first = optx.fixed_point(f, cls(rtol=1e-4, atol=1e-6), y0, a, throw=False)
    traced = len(traces)
    steps = {int(first.stats["num_steps"])}
    for rtol, atol, beta in ((1e-6, 1e-8, 1.0), (1e-2, 1e-3, 0.7), (1e-8, 0.0, 0.5)):
        sol = optx.fixed_point(f, cls(rtol=rtol, atol=atol, beta=beta), y0, a, throw=False)
        steps.add(int(sol.stats["num_steps"]))
    assert len(traces) == traced
    assert len(steps) > 1  # (the values did reach the solve)


@pytest.mark.parametrize("cls", [fp.NewtonKrylov, fp.Polyalgorithm])
def test_new_tolerances_of_the_general_solvers_compile_nothing_again(cls):
    f, traces = _counting_map()
    y0, a = jnp.zeros(3), jnp.ones(3)
    first = optx.fixed_point(f, cls(rtol=1e-4, atol=1e-6), y0, a, throw=False)
    traced = len(traces)
    steps = {int(first.stats["num_steps"])}
    for rtol, atol in ((1e-7, 1e-8), (1e-2, 1e-3)):
        sol = optx.fixed_point(f, cls(rtol=rtol, atol=atol), y0, a, throw=False)
        steps.add(int(sol.stats["num_steps"]))
    assert len(traces) == traced
    assert len(steps) > 1


@pytest.mark.parametrize("cls", [fp.Anderson, fp.Broyden, fp.Neumann])
def test_traced_and_static_hyperparameters_solve_alike(cls):
    """The same iterates whether the tolerances and beta are traced (the default) or
    Python numbers (`static_hyperparameters`): a traced value is taken in the dtype a
    Python number would take, also for a float32 state under 64-bit mode."""
    f, _ = _counting_map()
    solver = cls(rtol=3e-5, atol=1e-7, beta=0.7)
    with jax.enable_x64(True):  # (a float32 state: where a float64 value could leak in)
        _compare(f, solver, jnp.float32)


def _compare(f, solver, dtype):
    y0, a = jnp.zeros(3, dtype), jnp.ones(3, dtype)
    traced = optx.fixed_point(f, solver, y0, a, throw=False)
    static = optx.fixed_point(f, static_hyperparameters(solver), y0, a, throw=False)
    assert traced.value.dtype == dtype
    assert int(traced.stats["num_steps"]) == int(static.stats["num_steps"])
    np.testing.assert_array_equal(traced.value, static.value)


@pytest.mark.parametrize("cls", TRACED)
def test_hyperparameters_are_arrays_that_start_no_backend(cls):
    solver = cls(rtol=1e-3, beta=0.5)
    for name in TRACED_HYPERPARAMETERS:
        value = getattr(solver, name)
        assert isinstance(value, np.ndarray) and value.shape == ()
    assert solver.rtol == 1e-3 and solver.beta == 0.5
    with pytest.raises(ValueError, match="rtol"):
        cls(rtol=-1.0)


def test_static_hyperparameters_reaches_nested_solvers():
    adjoint = fp.ImplicitAdjoint(fp.linear.Anderson(rtol=1e-3, atol=1e-9))
    static = static_hyperparameters({"solver": fp.Anderson(), "adjoint": adjoint})
    assert type(static["solver"].rtol) is float
    assert type(static["adjoint"].linear_solver.root_finder.atol) is float
    assert static["adjoint"].linear_solver.root_finder.atol == 1e-9
    # The backward statistics probe stays an array (its cotangent is the statistics).
    assert isinstance(static["adjoint"].stats.num_steps, np.ndarray)


@pytest.mark.parametrize("solver", ["anderson", "neumann", fp.Anderson(rtol=1e-2)])
def test_deq_trainable_leaves_exclude_solver_hyperparameters(solver):
    """`eqx.filter(model, eqx.is_inexact_array)` (what an optax optimiser is given) holds
    the cell's parameters and the backward-statistics probe, never the tolerances or
    `beta` of the forward or backward solver (weight decay would shrink them)."""
    cell = eqx.nn.Linear(4, 4, key=jax.random.PRNGKey(0))

    def fn(z, x):
        return jnp.tanh(0.5 * cell(z) + x)

    deq = fdeq.DEQ(fn, solver=solver, eval_solver=fp.Neumann())
    adjoint = deq.adjoint
    assert isinstance(adjoint, fp.ImplicitAdjoint)
    trainable = jtu.tree_leaves(eqx.filter(deq, eqx.is_inexact_array))
    stats = jtu.tree_leaves(adjoint.stats)
    assert len(trainable) == len(stats)  # (the cell is closed over here)
    finders = [deq.solver, deq.eval_solver, adjoint.linear_solver.root_finder]  # pyright: ignore[reportAttributeAccessIssue]
    for finder in finders:
        for name in TRACED_HYPERPARAMETERS:
            assert type(getattr(finder, name)) is float
