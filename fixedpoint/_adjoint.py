r"""Adjoints (backward passes) for fixed points and roots, with backward statistics.

A fixed point $z^* = f(z^*, \theta)$ is found by optimistix as the root of
$g(z, \theta) = f(z, \theta) - z$ (for `optx.root_find`, $g$ is the user's function).
The implicit function theorem gives, for a cotangent $\bar z$ of $z^*$,

$$\bar\theta = -\Big(\frac{\partial g}{\partial \theta}\Big)^{\!\top} \lambda,
\qquad \Big(\frac{\partial g}{\partial z}\Big)^{\!\top} \lambda = \bar z,$$

which for a fixed point is $\bar\theta = (\partial f/\partial\theta)^\top w$ with
$w = \bar z + J_f^\top w$ ($w = -\lambda$).

All adjoints here are `optx.AbstractAdjoint`s (pass them as `adjoint=` to
`optx.fixed_point` / `optx.root_find`) built on one reverse-mode rule
(`eqx.filter_custom_vjp`). They carry a field `stats`, a [`fixedpoint.BackwardStats`][]
of zeros that the solve does not use: its *cotangent* is the statistics of the backward
pass. So the statistics come out of `jax.grad` like any other gradient, under `jit` and
`vmap`, with no second solve:

```python
adjoint = fixedpoint.ImplicitAdjoint()
def loss(theta, adjoint):
    sol = optx.fixed_point(f, fixedpoint.Anderson(), z0, theta, adjoint=adjoint)
    return jnp.sum(sol.value ** 2)
g_theta, g_adjoint = jax.grad(loss, argnums=(0, 1))(theta, adjoint)
g_adjoint.stats.num_steps, g_adjoint.stats.residual_norm, g_adjoint.stats.failed
```

Statistics are cotangents, so they add up: a solve inside `vmap` with an unbatched
adjoint reports the *sums* over the batch (divide by the batch size for means), and an
adjoint used by several solves reports the sum over them. (When the adjoint lives
inside an equinox model, `eqx.filter_grad(loss)(model)` returns the statistics inside
the model's gradient; keep them out of the optimiser, e.g. with `eqx.partition`.)

These adjoints support reverse mode (`jax.grad`, `jax.vjp`, `jax.jacrev`) only. For
forward mode (`jax.jvp`, `jax.jacfwd`) use `optx.ImplicitAdjoint(linear_solver=...)`
with a solver from [`fixedpoint.linear`][] (no backward statistics there).
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from equinox.internal import ω
from jaxtyping import Array, Float, PyTree

from . import linear
from ._iterate import iterate, keeps_finished_state, while_loop
from ._optx_compat import as_inputs
from ._validate import as_int, check_int, check_real


def _float32(x) -> Array:
    if isinstance(x, (int, float)):
        # A NumPy scalar for a Python number (the defaults below): importing fixedpoint
        # must create no JAX array, which would start JAX's backend before a user can
        # call `jax.distributed.initialize` (refused once the backend runs).
        return np.asarray(x, dtype=np.float32)  # pyright: ignore[reportReturnType]
    return jnp.asarray(x, dtype=jnp.float32)


class BackwardStats(eqx.Module):
    """Statistics of a backward pass, read as the cotangent of an adjoint's `stats`.

    - `num_steps`: backward solver steps (matrix-vector products, i.e. VJPs of `f`;
      for [`fixedpoint.PhantomAdjoint`][] its `steps`, which take one VJP fewer).
    - `residual_norm`: `norm` of the backward linear residual at the returned solution
      (0 for the approximate adjoints, which solve nothing).
    - `failed`: 1 if the backward solve failed (did not converge, diverged or produced
      non-finite values), else 0.

    As cotangents they are summed over batched (`vmap`) and repeated uses. They are
    float32 whether or not 64-bit types are enabled, so that a model holding an adjoint
    has the same structure (and serialises the same way) in both modes.
    """

    num_steps: Float[Array, ""] = eqx.field(converter=_float32, default=0.0)
    residual_norm: Float[Array, ""] = eqx.field(converter=_float32, default=0.0)
    failed: Float[Array, ""] = eqx.field(converter=_float32, default=0.0)


def _stats_like(stats: BackwardStats, num_steps, residual_norm, failed) -> BackwardStats:
    def cast(x, like):
        return jnp.asarray(x).astype(like.dtype).reshape(like.shape)

    return BackwardStats(
        num_steps=cast(num_steps, stats.num_steps),
        residual_norm=cast(residual_norm, stats.residual_norm),
        failed=cast(failed, stats.failed),
    )


class _AbstractStatsAdjoint(optx.AbstractAdjoint):
    """Runs the solve forward with a plain `lax.while_loop` and applies
    `self._backward` as the reverse-mode rule."""

    # An abstract property rather than an `eqx.AbstractVar`: type checkers order an
    # AbstractVar before the subclass's own fields, which would make `stats` the first
    # positional argument of `ImplicitAdjoint(linear_solver)` in their eyes.
    @property
    @abc.abstractmethod
    def stats(self) -> BackwardStats:
        """The statistics probe (a field of every concrete adjoint)."""

    @abc.abstractmethod
    def _backward(
        self, vjp_root, root: PyTree[Array], cotangent: PyTree[Array]
    ) -> tuple[PyTree[Array], tuple[Any, Any, Any]]:
        """The backward rule. `vjp_root(u)` = `u^T (dg/dz)` at `root` = z* and the
        current parameters, `cotangent` = the cotangent of z*. Returns `(w,
        (num_steps, residual_norm, failed))`, where the parameters' cotangent is
        `VJP_theta(g at z*)(w)`.
        """

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        del tags
        inputs = inputs + (while_loop,)
        # The probe travels as the differentiated argument; the rule gets the adjoint
        # without it (keyword arguments of a custom VJP must not be differentiated).
        rule = eqx.tree_at(lambda a: a.stats, self, None)
        root, residual = _solve(
            (self.stats, inputs),
            primal_fn=primal_fn,
            rewrite_fn=rewrite_fn,
            adjoint=rule,
            one_loop=keeps_finished_state(as_inputs(inputs).solver),
        )
        # Step counts, result codes and solver state carry no derivative; detach them
        # so that e.g. `throw=True`'s error check is never differentiated.
        dynamic, static = eqx.partition(residual, eqx.is_array)
        residual = eqx.combine(jax.lax.stop_gradient(dynamic), static)
        return root, residual


@eqx.filter_custom_vjp
def _solve(stats_and_inputs, *, primal_fn, rewrite_fn, adjoint, one_loop):
    _, inputs = stats_and_inputs
    return iterate(primal_fn, inputs, one_loop=one_loop)


@_solve.def_fwd
def _solve_fwd(perturbed, stats_and_inputs, *, primal_fn, rewrite_fn, adjoint, one_loop):
    del perturbed
    _, inputs = stats_and_inputs
    root, residual = iterate(primal_fn, inputs, one_loop=one_loop)
    return (root, residual), root


def _is_none(x):
    return x is None


@_solve.def_bwd
def _solve_bwd(
    root, grad_obj, perturbed, stats_and_inputs, *, primal_fn, rewrite_fn, adjoint, one_loop
):
    del perturbed, primal_fn, one_loop
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
    diff, nondiff = eqx.partition(inputs, eqx.is_inexact_array)

    def g(z, _diff):
        return rewrite_fn(z, None, eqx.combine(_diff, nondiff))

    # One linearisation of g at (z*, theta) serves both the backward solve (the z part;
    # XLA drops the unused theta part inside the solver's loop) and the final
    # parameter cotangent: g is evaluated at z* once, not twice.
    _, vjp_g = jax.vjp(g, root, diff)

    def vjp_root(u):
        return vjp_g(u)[0]

    w, (num_steps, residual_norm, failed) = adjoint._backward(vjp_root, root, root_cotangent)
    diff_cotangent = vjp_g(w)[1]
    return _stats_like(stats, num_steps, residual_norm, failed), diff_cotangent


class ImplicitAdjoint(_AbstractStatsAdjoint):
    r"""Implicit differentiation with an iterative, matrix-free backward solve and
    backward statistics.

    The backward pass solves $(\partial g/\partial z)^\top \lambda = \bar z$ at the
    solution with `linear_solver` (default [`fixedpoint.linear.Anderson`][], never a
    dense factorisation), each step costing one VJP of $f$, and returns
    $\bar\theta = -(\partial g / \partial\theta)^\top \lambda$. For a fixed point the
    backward iteration is $w \mapsto (1-\beta) w + \beta(\bar z + J_f^\top w)$, which
    contracts whenever the forward problem does.

    Statistics are the cotangent of `stats` (see the module documentation). On a failed
    backward solve: with `throw=True` an error is raised; with `throw=False` a solve that
    ran out of steps returns its (approximate) gradient, one that diverged or produced
    non-finite values returns NaN gradients; `stats.failed` says so either way.

    Memory does not depend on the number of forward iterations: only the root is
    stored for the backward pass.
    """

    linear_solver: lx.AbstractLinearSolver = linear.Anderson(rtol=1e-4, atol=1e-6)
    throw: bool = True
    stats: BackwardStats = BackwardStats()

    def _backward(self, vjp_root, root, cotangent):
        operator = lx.FunctionLinearOperator(vjp_root, jax.eval_shape(lambda: root))
        sol = lx.linear_solve(operator, cotangent, self.linear_solver, throw=False)
        ok = sol.result == lx.RESULTS.successful
        breakdown = (sol.result != lx.RESULTS.successful) & (
            sol.result != lx.RESULTS.max_steps_reached
        )
        lam = jtu.tree_map(lambda x: jnp.where(breakdown, jnp.nan, x), sol.value)
        if self.throw:
            lam = sol.result.error_if(lam, ~ok)
        num_steps = sol.stats.get("num_steps", jnp.nan)
        residual_norm = sol.stats.get("residual_norm", jnp.nan)
        if "residual_norm" not in sol.stats:
            residual = (operator.mv(sol.value) ** ω - cotangent**ω).ω
            residual_norm = optx.max_norm(residual)
        return (-(lam**ω)).ω, (num_steps, residual_norm, jnp.where(ok, 0, 1))


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: any `lx.AbstractLinearSolver` for the backward system; default
    `fixedpoint.linear.Anderson(rtol=1e-4, atol=1e-6)`. Solvers from
    [`fixedpoint.linear`][] report their steps and residual; others report what their
    `stats` hold (lineax's iterative solvers: `num_steps`).
- `throw`: raise an error when the backward solve fails (default), or return and flag
    it in the statistics.
- `stats`: the statistics probe; leave it at its default.
"""


class PhantomAdjoint(_AbstractStatsAdjoint):
    r"""The phantom gradient (Geng et al. 2021): differentiate $k$ damped unrolled
    steps started at the solution instead of solving the implicit system.

    With $z_0 = \operatorname{stop\_gradient}(z^*)$ and
    $z_{i+1} = z_i + \beta\, g(z_i, \theta)$ (for a fixed point,
    $z_{i+1} = (1-\beta) z_i + \beta f(z_i, \theta)$), the gradient is that of
    $z_k$. Equivalently it replaces $(I - J_f)^{-1}$ by
    $\beta \sum_{i<k} ((1-\beta) I + \beta J_f)^i$ (frozen at $z^*$ for the
    linear part), a truncated, damped Neumann series. The damping $\beta$ is the `beta`
    of this package's solvers (the weight of the new map value; optimistix's `damp` is
    the weight of the old iterate, $1 - \beta$).

    **Cost:** $k - 1$ VJPs of $f$ with respect to $z$ (the last term of the sum
    needs none; $k = 1$ is the Jacobian-free gradient) and one with respect to
    $\theta$; no linear solve. **Bias:** the truncation error
    $((1-\beta) I + \beta J_f)^k$; it vanishes as $k \to \infty$ when the map
    contracts, and the direction stays a descent direction for small $\|J_f\|$. Often
    good enough for training, much cheaper than an exact solve.
    """

    steps: int = eqx.field(default=5, converter=as_int)
    beta: float = 0.5
    stats: BackwardStats = BackwardStats()

    def __check_init__(self) -> None:
        check_int("steps", self.steps, low=1)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)

    def _backward(self, vjp_root, root, cotangent):
        return _unrolled(vjp_root, cotangent, self.steps, self.beta)


def _unrolled(vjp_root, cotangent, steps: int, beta: float):
    """Reverse mode through z_{i+1} = z_i + beta * g(z_i), z_0 = z*, i < steps.

    Since z* is a root the iterates stay at z*, so every step has the same Jacobian:
    the input cotangent is VJP_theta(g at z*) applied to
    w = beta * sum_{i<steps} (I + beta J_g^T)^i zbar: `steps - 1` VJPs with respect
    to z (the term of the last step needs none).
    """

    def body(_, carry):
        c, acc = carry
        acc = (acc**ω + beta * c**ω).ω
        c = (c**ω + beta * vjp_root(c) ** ω).ω
        return c, acc

    c, acc = cotangent, jtu.tree_map(jnp.zeros_like, cotangent)
    if steps > 1:  # (steps = 1, Jacobian-free: no VJP with respect to z at all)
        c, acc = jax.lax.fori_loop(0, steps - 1, body, (c, acc))
    w = (acc**ω + beta * c**ω).ω
    # A zero with the batch structure of the cotangent, so that under `vmap` the
    # statistics are per sample (and summed for an unbatched probe), as for the
    # implicit adjoint; a Python constant would be counted once per batch.
    leaf = jtu.tree_leaves(cotangent)[0]
    zero = 0 * jnp.isfinite(jnp.sum(leaf)).astype(leaf.dtype)
    return w, (steps + zero, zero, zero)


PhantomAdjoint.__init__.__doc__ = """**Arguments:**

- `steps`: (>= 1) the number of unrolled steps $k$.
- `beta`: the damping $\\beta$ in (0, 1] (1: undamped steps). Called `damping` before
    version 0.2.
- `stats`: the statistics probe; leave it at its default.
"""


class JacobianFreeAdjoint(_AbstractStatsAdjoint):
    r"""Jacobian-free backpropagation (Fung et al. 2022): one step through $f$ at the
    solution, $\bar\theta = (\partial f/\partial\theta)^\top \bar z$.

    It replaces $(I - J_f)^{-1}$ by $I$: the phantom gradient with one undamped step.
    **Cost:** one VJP of $f$ (with respect to the parameters only). **Bias:** drops
    every power of $J_f$; the result is a descent direction when $\|J_f\| < 1$ is small
    enough (Fung et al., Thm. 3.1) and is exact only when $J_f = 0$.
    """

    stats: BackwardStats = BackwardStats()

    def _backward(self, vjp_root, root, cotangent):
        return _unrolled(vjp_root, cotangent, 1, 1.0)


JacobianFreeAdjoint.__init__.__doc__ = """**Arguments:**

- `stats`: the statistics probe; leave it at its default.
"""


def _is_stats(x: Any) -> bool:
    return isinstance(x, BackwardStats)


def backward_stats(grads: PyTree) -> BackwardStats | None:
    """Collect the backward statistics from a gradient.

    Differentiating a loss with respect to anything holding one of this module's
    adjoints (a [`fixedpoint_deq.DEQ`][] layer in a model, or the adjoint itself, e.g.
    `eqx.filter_grad(loss)(model)`) puts the statistics of each backward solve into the
    gradient, as the cotangent of the adjoint's `stats` probe. This returns their sum
    over every [`fixedpoint.BackwardStats`][] in `grads` (so, for a solve `vmap`ped over
    a batch, the totals over the batch), or `None` if there are none.
    """
    found = [s for s in jtu.tree_leaves(grads, is_leaf=_is_stats) if _is_stats(s)]
    if not found:
        return None
    return jtu.tree_map(lambda *xs: sum(xs), *found)


def without_backward_stats(grads: PyTree) -> PyTree:
    """`grads` with every backward-statistics probe set to zero (e.g. before an
    optimiser update, so that the statistics never move a parameter)."""
    return jtu.tree_map(
        lambda x: jtu.tree_map(jnp.zeros_like, x) if _is_stats(x) else x,
        grads,
        is_leaf=_is_stats,
    )
