r"""Everything of this package that depends on optimistix's *private* solve loop.

optimistix runs a solve as `adjoint.apply(primal_fn, rewrite_fn, inputs, tags)`, where
`primal_fn` is its private `optimistix._iterate._iterate` and `inputs` a tuple that an
adjoint extends by the `while_loop` to use (optimistix's own adjoints do the same). This
module names the fields of that tuple and of the tuple `primal_fn` returns
(`IterateInputs`, `IterateResidual`), and holds a re-implementation of the loop for a
batch of solves (`iterate(..., one_loop=True)`). Nothing else in the package unpacks
them by position.

**Batched solves in one loop.** `jax.vmap` of an optimistix solve batches its
`lax.while_loop`. Each sample stops on its own, so the loop's predicate is batched, and
JAX's batching rule for such a loop wraps every step in `select(still_running,
new_carry, old_carry)` over the *whole* carry. For Anderson and Broyden the carry holds
the history (`2 m n` numbers per sample): every step then copies and selects all of
it, whether or not a sample still runs, which costs more than the steps themselves on
a DEQ state. `iterate(primal_fn, inputs, one_loop=True)` runs `primal_fn(inputs)` as
is when it is not batched; under `vmap` it runs the same iterations as one loop over
the batch with an *unbatched* predicate ("some sample is still running"). A sample
that has stopped keeps its iterate and its result, and no buffer is selected or
copied: each step costs one batched evaluation of the function plus the solver's own
work. The per-sample results are those of the per-sample loop (the same iterates, step
counts, result codes and statistics) *provided that the solver leaves a finished state
unchanged in `step`*: the caller opts in for such a solver only (see
`fixedpoint._iterate.keeps_finished_state`).

`check_optimistix()` compares the installed optimistix with the layout this module
expects and raises naming the version when they differ (the test suite calls it).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.custom_batching import custom_vmap


#: The optimistix versions whose private loop this module was written against.
WRITTEN_FOR = "optimistix 0.1.0"


class IterateInputs(NamedTuple):
    """The `inputs` of optimistix's iterate function, by name: the tuple an adjoint's
    `apply` receives, with the adjoint's `while_loop` appended."""

    fn: Any
    solver: Any
    y0: Any
    args: Any
    options: Any
    max_steps: Any
    f_struct: Any
    aux_struct: Any
    tags: Any
    while_loop: Any


class IterateResidual(NamedTuple):
    """The second element of what optimistix's iterate function returns,
    `(y, residual)`, by name."""

    num_steps: Any
    result: Any
    dynamic_final_state: Any
    static_state: Any
    aux: Any
    stats: Any


def _mismatch(what: str) -> RuntimeError:
    return RuntimeError(
        f"fixedpoint (fixedpoint/_optx_compat.py) relies on optimistix's private solve "
        f"loop as in {WRITTEN_FOR}, and the installed optimistix {optx.__version__} "
        f"differs: {what}. Update fixedpoint/_optx_compat.py (and the layout it expects) "
        "for this optimistix version."
    )


def as_inputs(inputs: tuple) -> IterateInputs:
    """`inputs` (as an adjoint passes them to optimistix's iterate function, its
    `while_loop` appended) by name; a `RuntimeError` naming the optimistix version if
    their number is not the expected one."""
    if len(inputs) != len(IterateInputs._fields):
        raise _mismatch(
            f"an adjoint received {len(inputs) - 1} inputs, {len(IterateInputs._fields) - 1} "
            f"expected ({', '.join(IterateInputs._fields[:-1])})"
        )
    return IterateInputs(*inputs)


def as_residual(residual: tuple) -> IterateResidual:
    """The second element of the iterate function's output, by name."""
    if len(residual) != len(IterateResidual._fields):
        raise _mismatch(
            f"the solve loop returned {len(residual)} results besides the solution, "
            f"{len(IterateResidual._fields)} expected ({', '.join(IterateResidual._fields)})"
        )
    return IterateResidual(*residual)


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any, *, max_steps: int | None):
    """A bounded `lax.while_loop`, with the signature optimistix's iterate function
    expects of its `while_loop` input. This package's adjoints never differentiate
    through the loop, so it needs none of `equinox.internal.while_loop`'s machinery
    (whose per-leaf bookkeeping roughly doubled the traced loop body)."""
    if max_steps is None:
        return jax.lax.while_loop(cond_fun, body_fun, init_val)

    def cond(carry):
        step, val = carry
        return (step < max_steps) & cond_fun(val)

    def body(carry):
        step, val = carry
        return step + 1, body_fun(val)

    return jax.lax.while_loop(cond, body, (jnp.array(0), init_val))[1]


def _static_value(x: Any) -> Any:
    return x.value if isinstance(x, eqxi.Static) else x


def _is_static(x: Any) -> bool:
    return isinstance(x, eqxi.Static)


def _where(pred: jax.Array, new: Any, old: Any) -> Any:
    """Per-sample select: `pred` has shape (batch,), leaves (batch, ...)."""

    def pick(a, b):
        return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

    return jtu.tree_map(pick, new, old)


def _results_where(pred, a, b):
    """Per-sample `optx.RESULTS.where` (which takes a scalar predicate)."""
    return jax.vmap(optx.RESULTS.where)(pred, a, b)


def _batched_iterate(dynamic: tuple, static: tuple, in_axes: Any, axis_size: int) -> Any:
    """optimistix's iterate function for a batch of independent problems, in one loop
    whose predicate is "any sample still running". `dynamic` holds the array inputs
    (batch axis 0 where `in_axes` says 0), `static` the rest."""
    fixed = as_inputs(static)
    max_steps, tags = fixed.max_steps, fixed.tags
    f_struct = jtu.tree_map(_static_value, fixed.f_struct, is_leaf=_is_static)
    aux_struct = jtu.tree_map(_static_value, fixed.aux_struct, is_leaf=_is_static)

    def vmapped(f: Callable, num_batched: int) -> Callable:
        """`f(inputs, *xs)` per sample -> over the batch (`xs` batched)."""

        def per_sample(d, *xs):
            return f(IterateInputs(*eqx.combine(d, static)), *xs)

        return jax.vmap(per_sample, in_axes=(in_axes,) + (0,) * num_batched, axis_size=axis_size)

    def initial_y(inputs: IterateInputs):
        return inputs.y0

    def init(inputs: IterateInputs, y):
        return inputs.solver.init(
            inputs.fn, y, inputs.args, inputs.options, f_struct, aux_struct, tags
        )

    def terminate_and_result(inputs: IterateInputs, y, state):
        done, result = inputs.solver.terminate(
            inputs.fn, y, inputs.args, inputs.options, state, tags
        )
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(y)]))
        return done, optx.RESULTS.where(finite, result, optx.RESULTS.nonfinite)

    def step(inputs: IterateInputs, y, state):
        return inputs.solver.step(inputs.fn, y, inputs.args, inputs.options, state, tags)

    def postprocess(inputs: IterateInputs, y, aux, state, result):
        return inputs.solver.postprocess(
            inputs.fn, y, aux, inputs.args, inputs.options, state, tags, result
        )

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
        # (the opt-in contract), so neither the history nor the iterate is selected
        # here; its aux, flags and count are kept (cheap).
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
    # (The static part of the state is taken from the unbatched trace, see `iterate`.)
    residual = IterateResidual(
        num_steps=num_steps,
        result=result,
        dynamic_final_state=dynamic_state,
        static_state=None,
        aux=aux,
        stats=stats,
    )
    return y, tuple(residual)


def iterate(primal_fn: Callable, inputs: tuple, *, one_loop: bool) -> Any:
    """`primal_fn(inputs)`: optimistix's iterate function on its inputs (as an
    `optx.AbstractAdjoint.apply` receives them, with its `while_loop` appended).

    **Arguments:**

    - `primal_fn`, `inputs`: as above.
    - `one_loop`: under `jax.vmap`, solve the batch in one loop (see the module
        documentation). Only for a solver whose `step` leaves a finished state and its
        iterate unchanged; with `False` the loop is batched as JAX batches any
        `lax.while_loop`.
    """
    inputs = tuple(as_inputs(inputs))
    if not one_loop:
        return primal_fn(inputs)
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
        out = _batched_iterate(_dynamic, static, in_axes, axis_size)
        # The same leaves in the same order as `run`'s (the static parts have none).
        leaves = jtu.tree_leaves(eqx.partition(out, eqx.is_array)[0])
        return leaves, [True] * len(leaves)

    leaves = run(dynamic)
    treedef, static_out = out_static[-1]
    return eqx.combine(jtu.tree_unflatten(treedef, leaves), static_out)


# ---------------------------------------------------------------------------- checks


def _function_def(fn: Callable) -> ast.FunctionDef:
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def _names(node: ast.AST) -> tuple[str, ...] | None:
    """The names of a tuple of plain names (`a, b, c`), else None."""
    if not isinstance(node, ast.Tuple) or not all(isinstance(e, ast.Name) for e in node.elts):
        return None
    return tuple(e.id for e in node.elts)  # pyright: ignore[reportAttributeAccessIssue]


def _assignments(fn: ast.FunctionDef) -> list[ast.Assign]:
    return [n for n in fn.body if isinstance(n, ast.Assign) and len(n.targets) == 1]


def optimistix_mismatches() -> list[str]:
    """How the installed optimistix differs from the layout of its private solve loop
    that this module expects (empty: it does not):

    - `AbstractAdjoint.apply(self, primal_fn, rewrite_fn, inputs, tags)`;
    - `optimistix._iterate._iterate(inputs)`, unpacking `inputs` into the fields of
      `IterateInputs`, calling `while_loop(cond, body, init, max_steps=...)`, and
      returning `(y, residual)` with a residual of as many fields as `IterateResidual`;
    - `optimistix._iterate.iterative_solve` building `inputs` from the first nine of
      those fields and unpacking the residual into the fields of `IterateResidual`.
    """
    try:
        from optimistix import _iterate as optx_iterate
    except ImportError as e:  # pragma: no cover
        return [f"`optimistix._iterate` cannot be imported ({e})"]
    problems: list[str] = []
    params = list(inspect.signature(optx.AbstractAdjoint.apply).parameters)
    if params != ["self", "primal_fn", "rewrite_fn", "inputs", "tags"]:
        problems.append(f"`AbstractAdjoint.apply` takes {params}")
    loop = getattr(optx_iterate, "_iterate", None)
    solve = getattr(optx_iterate, "iterative_solve", None)
    if loop is None or solve is None:
        return problems + ["`optimistix._iterate` has no `_iterate` or `iterative_solve`"]
    params = list(inspect.signature(loop).parameters)
    if params != ["inputs"]:
        problems.append(f"`optimistix._iterate._iterate` takes {params}, not `(inputs)`")
    try:
        loop_def, solve_def = _function_def(loop), _function_def(solve)
    except (OSError, TypeError) as e:
        return problems + [f"the source of `optimistix._iterate` is not available ({e})"]

    expected = IterateInputs._fields
    unpacked = [
        _names(a.targets[0])
        for a in _assignments(loop_def)
        if isinstance(a.value, ast.Name) and a.value.id == "inputs"
    ]
    if unpacked != [expected]:
        problems.append(f"`_iterate` unpacks its inputs as {unpacked}, not {[expected]}")
    calls = [
        n
        for n in ast.walk(loop_def)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "while_loop"
    ]
    if [(len(c.args), [k.arg for k in c.keywords]) for c in calls] != [(3, ["max_steps"])]:
        problems.append("`_iterate` does not call `while_loop(cond, body, init, max_steps=...)`")
    returns = [n for n in loop_def.body if isinstance(n, ast.Return)]
    shape = [
        len(r.value.elts[1].elts)
        if isinstance(r.value, ast.Tuple)
        and len(r.value.elts) == 2
        and isinstance(r.value.elts[1], ast.Tuple)
        else None
        for r in returns
    ]
    if shape != [len(IterateResidual._fields)]:
        problems.append(
            f"`_iterate` returns (y, residual) with residuals of {shape} fields, not "
            f"[{len(IterateResidual._fields)}]"
        )

    built = [
        _names(a.value)
        for a in _assignments(solve_def)
        if isinstance(a.targets[0], ast.Name) and a.targets[0].id == "inputs"
    ]
    if built != [expected[:-1]]:
        problems.append(f"`iterative_solve` builds inputs {built}, not {[expected[:-1]]}")
    received = []
    for a in _assignments(solve_def):
        call = a.value
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "apply"
            and isinstance(a.targets[0], ast.Tuple)
            and len(a.targets[0].elts) == 2
        ):
            received.append(_names(a.targets[0].elts[1]))
    if received != [IterateResidual._fields]:
        problems.append(
            f"`iterative_solve` unpacks the residual as {received}, not {[IterateResidual._fields]}"
        )
    return problems


def check_optimistix() -> None:
    """Raise a `RuntimeError` naming the installed optimistix version if its private
    solve loop differs from what this module expects (see `optimistix_mismatches`)."""
    problems = optimistix_mismatches()
    if problems:
        raise _mismatch("; ".join(problems))
