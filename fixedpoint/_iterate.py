r"""Batched solves in one loop: the `vmap` rule of this package's solves.

`jax.vmap` of an optimistix solve batches its `lax.while_loop`. Each sample stops on
its own, so the loop's predicate is batched, and JAX's batching rule for such a loop
wraps every step in `select(still_running, new_carry, old_carry)` over the *whole*
carry. For Anderson and Broyden the carry holds the history (`2 m n` numbers per
sample): every step then copies and selects all of it, whether or not a sample still
runs, which costs more than the steps themselves on a DEQ state.

`batch_aware(primal_fn, inputs)` runs `primal_fn(inputs)` (optimistix's iterate
function) as is when it is not batched; under `vmap` it runs the same iterations as one
loop over the batch with an *unbatched* predicate ("some sample is still running"). A
sample that has stopped keeps its iterate and its result, and the solvers of this
package leave a finished state unchanged in `step` (see
[`fixedpoint.AbstractFixedPointRootFinder`][]), so no buffer is selected or copied:
each step costs one batched evaluation of the function plus the solver's own work. The
per-sample results are those of the per-sample loop: the same iterates, step counts,
result codes and statistics.

Solvers that are not of this package fall back to the plain batched loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.custom_batching import custom_vmap


def _static_value(x: Any) -> Any:
    return x.value if isinstance(x, eqxi.Static) else x


def _is_static(x: Any) -> bool:
    return isinstance(x, eqxi.Static)


def _zero(struct: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.zeros(struct.shape, struct.dtype)


def _where(pred: jax.Array, new: Any, old: Any) -> Any:
    """Per-sample select: `pred` has shape (batch,), leaves (batch, ...)."""

    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jtu.tree_map(pick, new, old)


def _results_where(pred, a, b):
    """Per-sample `optx.RESULTS.where` (which takes a scalar predicate)."""
    return jax.vmap(optx.RESULTS.where)(pred, a, b)


def _batched_iterate(dynamic: tuple, static: tuple, in_axes: Any, axis_size: int) -> Any:
    """optimistix's `_iterate` for a batch of independent problems, in one loop whose
    predicate is "any sample still running". `dynamic` holds the array inputs (batch
    axis 0 where `in_axes` says 0), `static` the rest."""
    _, _, _, _, _, max_steps, f_struct, aux_struct, tags, _ = static
    f_struct = jtu.tree_map(_static_value, f_struct, is_leaf=_is_static)
    aux_struct = jtu.tree_map(_static_value, aux_struct, is_leaf=_is_static)

    def vmapped(f: Callable, num_batched: int) -> Callable:
        """`f(inputs, *xs)` per sample -> over the batch (`xs` batched)."""

        def per_sample(d, *xs):
            return f(eqx.combine(d, static), *xs)

        return jax.vmap(per_sample, in_axes=(in_axes,) + (0,) * num_batched, axis_size=axis_size)

    def initial_y(inputs):
        return inputs[2]

    def init(inputs, y):
        fn, solver, _, args, options = inputs[:5]
        return solver.init(fn, y, args, options, f_struct, aux_struct, tags)

    def terminate_and_result(inputs, y, state):
        fn, solver, _, args, options = inputs[:5]
        done, result = solver.terminate(fn, y, args, options, state, tags)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(y)]))
        return done, optx.RESULTS.where(finite, result, optx.RESULTS.nonfinite)

    def step(inputs, y, state):
        fn, solver, _, args, options = inputs[:5]
        return solver.step(fn, y, args, options, state, tags)

    def postprocess(inputs, y, aux, state, result):
        fn, solver, _, args, options = inputs[:5]
        return solver.postprocess(fn, y, aux, args, options, state, tags, result)

    y = vmapped(initial_y, 0)(dynamic)
    state = vmapped(init, 1)(dynamic, y)
    done, result = vmapped(terminate_and_result, 2)(dynamic, y, state)
    aux = jtu.tree_map(lambda s: jnp.zeros((axis_size,) + s.shape, s.dtype), aux_struct)
    num_steps = jnp.zeros(axis_size, jnp.asarray(0).dtype)

    def running(done, result):
        return jnp.invert(done) & (result == optx.RESULTS.successful)

    def cond_fun(carry):
        _, _, _, _, done, result, k = carry
        keep_going = jnp.any(running(done, result))
        if max_steps is not None:
            keep_going = keep_going & (k < max_steps)
        return keep_going

    def body_fun(carry):
        y, num_steps, state, aux, done, result, k = carry
        active = running(done, result)
        new_y, new_state, new_aux = vmapped(step, 2)(dynamic, y, state)
        new_done, new_result = vmapped(terminate_and_result, 2)(dynamic, y, new_state)
        # A finished sample: the solver left its state and its iterate as they were
        # (the `step` contract of this package's solvers), so neither the history nor
        # the iterate is selected here; its aux, flags and count are kept (cheap).
        return (
            new_y,
            num_steps + active.astype(num_steps.dtype),
            new_state,
            _where(active, new_aux, aux),
            jnp.where(active, new_done, done),
            _results_where(active, new_result, result),
            k + 1,
        )

    carry = (y, num_steps, state, aux, done, result, jnp.array(0))
    y, num_steps, state, aux, done, result, _ = jax.lax.while_loop(cond_fun, body_fun, carry)
    result = _results_where(
        (result == optx.RESULTS.successful) & jnp.invert(done),
        jax.vmap(lambda _: optx.RESULTS.nonlinear_max_steps_reached)(done),
        result,
    )
    y, aux, stats = vmapped(postprocess, 4)(dynamic, y, aux, state, result)
    dynamic_state = eqx.partition(state, eqx.is_array)[0]
    return y, (num_steps, result, dynamic_state, None, aux, stats)


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any, *, max_steps: int | None):
    """A bounded `lax.while_loop`, with the signature optimistix's iterate function
    expects of its `while_loop` argument. Our adjoints never differentiate through the
    loop, so it needs none of `equinox.internal.while_loop`'s machinery (whose per-leaf
    bookkeeping roughly doubled the traced loop body)."""
    if max_steps is None:
        return jax.lax.while_loop(cond_fun, body_fun, init_val)

    def cond(carry):
        step, val = carry
        return (step < max_steps) & cond_fun(val)

    def body(carry):
        step, val = carry
        return step + 1, body_fun(val)

    return jax.lax.while_loop(cond, body, (jnp.array(0), init_val))[1]


def _supports_batching(solver: Any) -> bool:
    from ._solver._base import AbstractFixedPointRootFinder

    return isinstance(solver, AbstractFixedPointRootFinder)


def batch_aware(primal_fn: Callable, inputs: tuple) -> Any:
    """`primal_fn(inputs)`, with a `vmap` rule that solves a batch in one loop (see the
    module docstring). `primal_fn` is optimistix's iterate function and `inputs` its
    arguments, as an `optx.AbstractAdjoint.apply` receives them."""
    dynamic, static = eqx.partition(inputs, eqx.is_array)
    # The non-array parts of the output (the solver state's static part, wrapped by
    # optimistix) do not depend on batching: they are taken from the unbatched trace.
    out_static: list = []

    @custom_vmap
    def run(_dynamic):
        out = primal_fn(eqx.combine(_dynamic, static))
        out_dynamic, _out_static = eqx.partition(out, eqx.is_array)
        leaves, treedef = jtu.tree_flatten(out_dynamic)
        out_static.append((treedef, _out_static))
        return leaves

    @run.def_vmap
    def rule(axis_size, in_batched, _dynamic):
        (in_batched,) = in_batched
        in_axes = jtu.tree_map(lambda b: 0 if b else None, in_batched)
        solver = eqx.combine(_dynamic[1], static[1])
        if _supports_batching(solver):
            out = _batched_iterate(_dynamic, static, in_axes, axis_size)
        else:
            out = jax.vmap(
                lambda d: primal_fn(eqx.combine(d, static)),
                in_axes=(in_axes,),
                axis_size=axis_size,
            )(_dynamic)
        # The same leaves in the same order as `run`'s (the static parts have none).
        leaves = jtu.tree_leaves(eqx.partition(out, eqx.is_array)[0])
        return leaves, [True] * len(leaves)

    leaves = run(dynamic)
    treedef, static_out = out_static[-1]
    return eqx.combine(jtu.tree_unflatten(treedef, leaves), static_out)
