"""`FixedPointSolver`: solvers configured by name, built on `DEQ`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, PRNGKeyArray, PyTree

import fixedpoint as fp

from ._layer import DEQ


_FWD = ("anderson", "broyden", "neumann", "picard")
_BWD = ("anderson", "broyden", "neumann", "picard")
_INIT = ("zero", "random")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(allowed)}; got {value!r}.")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


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
    backward solve with cotangent $v = 1$ is also run (one extra forward and backward
    pass: use it to monitor training, not at every step), adding
    `bwd_steps`, `bwd_residual` (of $w - v - J_f^\top w$, relative to $\|v\| = 1$) and
    `bwd_converged`.
    """

    fwd_solver: str = eqx.field(static=True, default="anderson")
    fwd_iterations: int = eqx.field(static=True, default=50)
    fwd_init: str = eqx.field(static=True, default="zero")
    bwd_solver: str = eqx.field(static=True, default="neumann")
    bwd_iterations: int = eqx.field(static=True, default=3)
    anderson_m: int = eqx.field(static=True, default=3)
    anderson_b: float = eqx.field(static=True, default=0.5)
    fwd_tol: float = eqx.field(static=True, default=1e-4)
    bwd_tol: float = eqx.field(static=True, default=1e-4)

    def __check_init__(self):
        _check_choice("fwd_solver", self.fwd_solver, _FWD)
        _check_choice("bwd_solver", self.bwd_solver, _BWD)
        _check_choice("fwd_init", self.fwd_init, _INIT)
        _check_int("fwd_iterations", self.fwd_iterations, 1)
        _check_int("bwd_iterations", self.bwd_iterations, 1)
        _check_int("anderson_m", self.anderson_m, 1)
        b = self.anderson_b
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
            raise ValueError(f"`anderson_b` must lie in (0, 1], got {b!r}.")
        for name in ("fwd_tol", "bwd_tol"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {t!r}.")

    def _forward_solver(self) -> optx.AbstractRootFinder:
        tol = dict(rtol=self.fwd_tol, atol=self.fwd_tol * 1e-2)
        if self.fwd_solver == "anderson":
            return fp.Anderson(m=self.anderson_m, beta=self.anderson_b, **tol)
        if self.fwd_solver == "broyden":
            return fp.Broyden(**tol)
        return fp.Neumann(**tol)

    def _backward_solver(self):
        tol = dict(rtol=self.bwd_tol, atol=self.bwd_tol * 1e-2)
        n = self.bwd_iterations
        if self.bwd_solver == "anderson":
            return fp.linear.Anderson(
                m=self.anderson_m, beta=self.anderson_b, max_steps=n, **tol
            )
        if self.bwd_solver == "broyden":
            return fp.linear.Broyden(max_steps=n, **tol)
        if self.bwd_solver == "neumann":
            return fp.linear.Neumann(max_steps=n + 1, **tol)
        return fp.linear.Neumann(max_steps=n, **tol)

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
        if solver_stats:

            def solve(a_and_adjoint):
                _a, _adjoint = a_and_adjoint
                _deq = eqx.tree_at(lambda d: d.adjoint, deq, _adjoint)
                return _deq(_a, z0=z0, key=reg_key, jac_reg=True)

            (x_star, record), vjp = eqx.filter_vjp(solve, (a, deq.adjoint))
            ones = jtu.tree_map(jnp.ones_like, x_star)
            zero_record = jtu.tree_map(
                lambda r: jnp.zeros_like(r) if eqx.is_inexact_array(r) else None, record
            )
            ((_, adjoint_ct),) = vjp((ones, zero_record))
            bwd = adjoint_ct.stats
        else:
            x_star, record = deq(a, z0=z0, key=reg_key, jac_reg=True)
        stats = {
            "fwd_steps": record.num_steps,
            "fwd_residual": record.relative_residual,
            "fwd_converged": record.converged,
        }
        if solver_stats:
            stats["bwd_steps"] = bwd.num_steps
            stats["bwd_residual"] = bwd.residual_norm
            stats["bwd_converged"] = bwd.failed == 0
        return x_star, record.jac_reg, stats


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
