r"""SHINE (Ramzi et al. 2022; banax's GDEQ): the backward pass of a `fixedpoint.Broyden`
forward solve that reuses Broyden's final inverse-Jacobian estimate. An experiment of
the benchmarks, measured by `benchmarks.shine` and NOT part of the library: on the
trained MNIST cell it does not pay (see the README, "SHINE: measured, not kept").

The forward solve of $g(z) = f(z) - z = 0$ ends with a low-rank estimate
$H = \gamma I + \sum_i u_i v_i^\top \approx J_g(z^*)^{-1}$. The implicit backward pass
needs $\lambda = J_g^{-\top} \bar z$; $H^\top \bar z$ approximates it at the cost of two
products with the factors and no evaluation of $f$. Three ways to use it:

- `mode="shine"`: $\lambda = H^\top \bar z$, no backward solve (SHINE proper). Its
  error is that of $H$ in the direction $\bar z$, which Broyden's secant updates were
  never asked to make small: an approximate gradient, like the phantom or Jacobian-free
  ones (the statistics report the backward residual it leaves, one VJP to measure).
- `mode="warm"`: the implicit backward solve started from $\lambda_0 = H^\top \bar z$
  instead of 0 (exact up to the solver's tolerance).
- `mode="precondition"`: the backward system right-preconditioned by $H$: solve
  $-J_g^\top H^\top \mu = \bar z$ (an operator close to $-I$ when $H$ is good), then
  $\lambda = -H^\top \mu$ (exact up to the tolerance; each step costs one VJP and two
  products with the factors).

The forward solver must be `fixedpoint.Broyden` (possibly wrapped to record the states
of `fixedpoint_deq.FixedPointCorrection`); a `ValueError` says so at trace time.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from equinox.internal import ω
from jax.flatten_util import ravel_pytree

import fixedpoint as fp
from fixedpoint._solver.broyden import _apply_t  # Broyden's private state: an experiment
from fixedpoint.internal import (
    as_inputs,
    as_residual,
    backward_stats_like,
    check_bool,
    check_choice,
    iterate,
    keeps_finished_state,
    while_loop,
)
from fixedpoint_deq._correction import _Recording


MODES = ("shine", "warm", "precondition")


def _broyden_of(solver: Any, state: Any = None) -> tuple[fp.Broyden, Any]:
    """The Broyden solver inside `solver` (possibly wrapped to record fixed-point
    correction states) and its part of the final `state` (if given)."""
    while isinstance(solver, _Recording):
        solver = solver.solver
        state = None if state is None else state.inner
    if not isinstance(solver, fp.Broyden):
        raise ValueError(
            "ShineAdjoint reuses the inverse-Jacobian estimate of the forward solver: the "
            f"forward solver must be fixedpoint.Broyden, got {type(solver).__name__}."
        )
    return solver, state


class ShineAdjoint(optx.AbstractAdjoint):
    r"""The backward pass of a `fixedpoint.Broyden` forward solve that reuses its final
    inverse-Jacobian estimate $H$ (the three modes: see the module documentation).
    Backward statistics come out of the gradient as for `fixedpoint.ImplicitAdjoint`
    (read them with `fixedpoint.backward_stats`); for `mode="shine"` `num_steps` is 0
    and `residual_norm` is the residual $\|J_g^\top \lambda - \bar z\|$ it leaves (one
    VJP to measure it).

    ```python
    deq = fd.DEQ(cell, solver=fp.Broyden(memory=30), adjoint=ShineAdjoint("warm"))
    ```
    """

    mode: str = eqx.field(static=True, default="warm")
    linear_solver: lx.AbstractLinearSolver = fp.linear.Anderson(rtol=1e-4, atol=1e-6)
    throw: bool = True
    stats: fp.BackwardStats = fp.BackwardStats()

    def __check_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_bool("throw", self.throw)

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        del tags
        inputs = inputs + (while_loop,)
        solver = as_inputs(inputs).solver
        _broyden_of(solver)  # refuse another forward solver at trace time
        rule = eqx.tree_at(lambda a: a.stats, self, None)
        root, residual = _solve(
            (self.stats, inputs),
            primal_fn=primal_fn,
            rewrite_fn=rewrite_fn,
            adjoint=rule,
            one_loop=keeps_finished_state(solver),
        )
        dynamic, static = eqx.partition(residual, eqx.is_array)
        residual = eqx.combine(jax.lax.stop_gradient(dynamic), static)
        return root, residual

    def _backward(self, vjp_root, root, cotangent, solver: fp.Broyden, state):
        struct = jax.eval_shape(lambda: root)
        flat, unravel = ravel_pytree(cotangent)
        dtype = flat.dtype
        # H = gamma I + U^T V (or + low_rank, the terms summed on a small state), gamma
        # the solve's (problem-scaled) initial estimate.
        gamma = state.gamma.astype(dtype)
        acc = jnp.promote_types(dtype, jnp.float32)
        u = state.u.astype(dtype)
        v = state.v.astype(dtype)
        valid = jnp.arange(u.shape[0]) < state.count

        def h_t(x):  # H^T x on PyTrees
            return unravel(
                _apply_t(u, v, state.low_rank, valid, gamma, ravel_pytree(x)[0].astype(dtype), acc)
            )

        def jg_t(x):  # J_g^T x
            return vjp_root(x)

        if self.mode == "shine":
            lam = h_t(cotangent)
            residual = (jg_t(lam) ** ω - cotangent**ω).ω
            finite = jnp.all(jnp.isfinite(ravel_pytree(lam)[0]))
            return (-(lam**ω)).ω, (0, optx.rms_norm(residual), jnp.where(finite, 0, 1))
        if self.mode == "warm":
            operator = lx.FunctionLinearOperator(jg_t, struct)
            options = {"y0": h_t(cotangent)}
            post = lambda x: x
        else:
            operator = lx.FunctionLinearOperator(lambda m: (-(jg_t(h_t(m)) ** ω)).ω, struct)
            options = {}
            post = lambda m: (-(h_t(m) ** ω)).ω
        sol = lx.linear_solve(operator, cotangent, self.linear_solver, options=options, throw=False)
        ok = sol.result == lx.RESULTS.successful
        breakdown = ~ok & (sol.result != lx.RESULTS.max_steps_reached)
        lam = jtu.tree_map(lambda x: jnp.where(breakdown, jnp.nan, x), post(sol.value))
        if self.throw:
            lam = sol.result.error_if(lam, ~ok)
        num_steps = sol.stats.get("num_steps", jnp.nan)
        residual_norm = sol.stats.get("residual_norm", jnp.nan)
        return (-(lam**ω)).ω, (num_steps, residual_norm, jnp.where(ok, 0, 1))


ShineAdjoint.__init__.__doc__ = """**Arguments:**

- `mode`: `"shine"` (no backward solve), `"warm"` (default: the implicit solve started
    from Broyden's estimate) or `"precondition"` (the implicit solve preconditioned by
    it).
- `linear_solver`: the backward linear solver of the `"warm"` and `"precondition"`
    modes (default `fixedpoint.linear.Anderson(rtol=1e-4, atol=1e-6)`); it must accept
    an initial guess `options["y0"]` for `"warm"` (those of `fixedpoint.linear` do).
- `throw`: raise an error when the backward solve fails, or return and flag it in the
    statistics (`stats.failed`).
- `stats`: the statistics probe; leave it at its default.
"""


@eqx.filter_custom_vjp
def _solve(stats_and_inputs, *, primal_fn, rewrite_fn, adjoint, one_loop):
    _, inputs = stats_and_inputs
    return iterate(primal_fn, inputs, one_loop=one_loop)


@_solve.def_fwd
def _solve_fwd(perturbed, stats_and_inputs, *, primal_fn, rewrite_fn, adjoint, one_loop):
    del perturbed
    _, inputs = stats_and_inputs
    root, residual = iterate(primal_fn, inputs, one_loop=one_loop)
    # The final solver state (its dynamic part): Broyden's factors for the backward pass.
    return (root, residual), (root, as_residual(residual).dynamic_final_state)


def _is_none(x):
    return x is None


@_solve.def_bwd
def _solve_bwd(
    saved, grad_obj, perturbed, stats_and_inputs, *, primal_fn, rewrite_fn, adjoint, one_loop
):
    del perturbed, primal_fn, one_loop
    root, final_state = saved
    stats, inputs = stats_and_inputs
    root_cotangent, _ = grad_obj
    if root_cotangent is None:
        root_cotangent = jtu.tree_map(jnp.zeros_like, root)
    root_cotangent = jtu.tree_map(
        lambda c, r: jnp.zeros_like(r) if c is None else c,
        root_cotangent,
        root,
        is_leaf=_is_none,
    )
    solver, state = _broyden_of(as_inputs(inputs).solver, final_state)
    diff, nondiff = eqx.partition(inputs, eqx.is_inexact_array)

    def g(z, _diff):
        return rewrite_fn(z, None, eqx.combine(_diff, nondiff))

    # As in `fixedpoint`'s adjoints: one linearisation of g at (z*, theta) serves the
    # backward solve and the parameters' cotangent.
    _, vjp_g = jax.vjp(g, root, diff)

    def vjp_root(u):
        return vjp_g(u)[0]

    w, (num_steps, residual_norm, failed) = adjoint._backward(
        vjp_root, root, root_cotangent, solver, state
    )
    diff_cotangent = vjp_g(w)[1]
    return backward_stats_like(stats, num_steps, residual_norm, failed), diff_cotangent
