"""`FixedPointSolver`: solvers configured by name, built on `DEQ`."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import ω
from jaxtyping import Array, PRNGKeyArray, PyTree

import fixedpoint as fp
from fixedpoint.internal import (
    as_int,
    check_choice,
    check_int,
    check_real,
    check_solver_name,
    linear_solver,
    root_finder,
    SEED,
)

from ._layer import DEQ


_INIT = ("zero", "random")


class FixedPointSolver(eqx.Module):
    r"""An implicit fixed-point solver with its solvers configured by name.

    ```python
    solver = FixedPointSolver(
        fwd_solver="anderson", fwd_iterations=50, fwd_init="zero",
        bwd_solver="neumann", bwd_iterations=3, anderson_m=3, anderson_b=0.5,
    )
    x_star, jac_reg, stats = solver(f, x, a, key)
    x_star, jac_reg, stats = solver(f, x, a, key, solver_stats=True)
    ```

    `f(x, a)` takes the state `x` and a PyTree `a` of dynamic parameters; `x` only
    gives the fixed point's shape and dtype. `x_star` is differentiable with respect to
    `a` (implicit differentiation); `jac_reg` is the one-probe Hutchinson estimate of
    $\|J_f(x^*)\|_F^2 / d$ (differentiable, add it to the loss).

    **Solvers.** Forward: `"anderson"` ([`fixedpoint.Anderson`][] with `m =
    anderson_m`, `beta = anderson_b`), `"broyden"`, `"neumann"` (alias `"picard"`: plain
    iteration). Backward: `"anderson"`, `"broyden"`, `"neumann"`, `"picard"` — the
    [`fixedpoint.linear`][] solver of that name on the adjoint system
    $w = v + J_f^\top w$ from $w_0 = 0$. `"neumann"` with
    `bwd_iterations = n` sums the series up to the power $n$ ($n + 1$ terms) and
    `"picard"` runs $n$ iterations ($n$ terms).

    **Iterations.** `fwd_iterations` and `bwd_iterations` are maxima: each solve
    stops when its tolerance (`fwd_tol`, `bwd_tol`, relative, see
    [`fixedpoint.Neumann`][] for the rule) is met. Set the tolerances to 0 for fixed
    iteration counts. The statistics report steps and residuals of both passes.

    **Statistics.** Always: `fwd_steps`, `fwd_residual` (relative, $\|f(x^*) -
    x^*\| / \|x^*\|$ in the max norm) and `fwd_converged`. With `solver_stats=True` a
    backward solve with cotangent $v = 1$ is also run at $x^*$ (one extra backward
    pass, no second forward solve: use it to monitor training, not at every step),
    adding `bwd_steps`, `bwd_residual` (of $w - v - J_f^\top w$, relative to
    $\|v\| = 1$) and `bwd_converged`. That solve is kept out of differentiation: `jax.grad`
    through `x_star` and `jac_reg` is the same with and without `solver_stats`.
    """

    fwd_solver: str = eqx.field(static=True, default="anderson")
    fwd_iterations: int = eqx.field(static=True, default=50, converter=as_int)
    fwd_init: Literal["zero", "random"] = eqx.field(static=True, default="zero")
    bwd_solver: str = eqx.field(static=True, default="neumann")
    bwd_iterations: int = eqx.field(static=True, default=3, converter=as_int)
    anderson_m: int = eqx.field(static=True, default=3, converter=as_int)
    anderson_b: float = eqx.field(static=True, default=0.5)
    fwd_tol: float = eqx.field(static=True, default=SEED.tol)
    bwd_tol: float = eqx.field(static=True, default=SEED.tol)

    def __check_init__(self) -> None:
        check_solver_name("fwd_solver", self.fwd_solver)
        check_solver_name("bwd_solver", self.bwd_solver)
        check_choice("fwd_init", self.fwd_init, _INIT)
        check_int("fwd_iterations", self.fwd_iterations, low=1)
        check_int("bwd_iterations", self.bwd_iterations, low=1)
        check_int("anderson_m", self.anderson_m, low=1)
        check_real("anderson_b", self.anderson_b, low=0.0, high=1.0, low_open=True)
        check_real("fwd_tol", self.fwd_tol, low=0.0)
        check_real("bwd_tol", self.bwd_tol, low=0.0)

    def _forward_solver(self) -> fp.AbstractFixedPointRootFinder:
        # The seed's names: `anderson_m`, `anderson_b` are the library's `m`, `beta`.
        kwargs = SEED(self.fwd_tol)
        if self.fwd_solver == "anderson":
            kwargs.update(m=self.anderson_m, beta=self.anderson_b)
        return root_finder(self.fwd_solver, **kwargs)

    def _backward_solver(self) -> fp.linear.AbstractFixedPointLinearSolver:
        kwargs = SEED(self.bwd_tol)
        n = self.bwd_iterations
        if self.bwd_solver == "anderson":
            kwargs.update(m=self.anderson_m, beta=self.anderson_b)
        # As in the seed, "neumann" with n iterations sums the series up to the power n
        # (n + 1 terms); "picard" runs n iterations (n terms).
        max_steps = n + 1 if self.bwd_solver == "neumann" else n
        return linear_solver(self.bwd_solver, max_steps=max_steps, **kwargs)

    def _deq(self, f: Callable) -> DEQ:
        return DEQ(
            cell=f,
            solver=self._forward_solver(),
            adjoint=fp.ImplicitAdjoint(self._backward_solver(), throw=False),
            max_steps=self.fwd_iterations,
            init=self.fwd_init,
        )

    def __call__(
        self,
        f: Callable[[Array, PyTree], Array],
        x: Array,
        a: PyTree,
        key: PRNGKeyArray,
        solver_stats: bool = False,
    ) -> tuple[Array, Array, dict[str, Array]]:
        """**Arguments:** `f(x, a)`; `x` an array shaped like the fixed point; `a` any
        PyTree of parameters; `key` a PRNG key (random initialisation and the Jacobian
        regularisation probe); `solver_stats` to also run and report a backward solve.

        **Returns:** `(x_star, jac_reg, stats)`.
        """
        init_key, reg_key = jax.random.split(key)
        deq = self._deq(f)
        x = jnp.asarray(x)
        z0 = deq.initial_state(jtu.tree_map(jnp.zeros_like, x), init_key)
        x_star, record = deq(a, z0=z0, key=reg_key, jac_reg=True)
        stats = {
            "fwd_steps": record.num_steps,
            "fwd_residual": record.relative_residual,
            "fwd_converged": record.converged,
        }
        if solver_stats:
            assert isinstance(deq.adjoint, fp.ImplicitAdjoint)  # built by `_deq`
            bwd = _backward_stats(deq.adjoint, f, a, x_star)
            stats["bwd_steps"] = bwd.num_steps
            stats["bwd_residual"] = bwd.residual_norm
            stats["bwd_converged"] = bwd.failed == 0
        return x_star, record.jac_reg, stats


def _backward_stats(
    adjoint: fp.ImplicitAdjoint, f: Callable, a: PyTree, x_star: Array
) -> fp.BackwardStats:
    """The statistics of the backward pass `adjoint` runs at `x_star` for the cotangent
    $v = 1$, computed apart from the differentiated computation.

    The solve runs on stop-gradient'ed copies of `x_star`, `a` and of whatever `f`
    closes over (`eqx.filter_closure_convert` makes those explicit), so no derivative
    flows into it: `jax.grad` of a loss of `x_star` is the same with and without it
    (a `lax.while_loop` with a dynamic trip count cannot be reverse-differentiated, and
    need not be: its results are statistics). It is the backward pass `jax.grad` runs
    through `x_star`, at the same point with the same solver, but needs no second
    forward solve.
    """
    fn = eqx.filter_closure_convert(f, x_star, a)
    dynamic, static = eqx.partition((fn, a, x_star), eqx.is_array)
    fn, a, root = eqx.combine(jax.lax.stop_gradient(dynamic), static)

    def g_root(z):
        # The adjoint's residual function: the root of g(z) = f(z, a) - z is x*.
        return (fn(z, a) ** ω - z**ω).ω

    _, vjp_g = jax.vjp(g_root, root)

    def vjp_root(u):
        return vjp_g(u)[0]

    ones = jtu.tree_map(jnp.ones_like, root)
    _, (num_steps, residual_norm, failed) = adjoint._backward(vjp_root, root, ones)
    return fp.BackwardStats(num_steps=num_steps, residual_norm=residual_norm, failed=failed)


FixedPointSolver.__init__.__doc__ = """**Arguments:**

- `fwd_solver`: `"anderson"`, `"broyden"`, `"neumann"` or `"picard"`.
- `fwd_iterations`: (>= 1) the most forward steps.
- `fwd_init`: `"zero"` or `"random"` (normal noise, from the call's `key`).
- `bwd_solver`: `"anderson"`, `"broyden"`, `"neumann"` or `"picard"`.
- `bwd_iterations`: (>= 1) the most backward steps (for `"neumann"`, the highest power
    of the series).
- `anderson_m`: (>= 1) Anderson's history, forward and backward.
- `anderson_b`: Anderson's mixing parameter in (0, 1].
- `fwd_tol`, `bwd_tol`: (>= 0) the relative tolerances of the two solves; 0 runs the
    full iteration counts.
"""
