"""jaxopt's AndersonAcceleration, FixedPointIteration and Broyden: ``tol = tol_abs``
(all three stop on the 2-norm of the residual at the point just evaluated: the common
criterion). Traced by an eager run (``jit=False``) of the same solver with a recording
wrapper. AndersonAcceleration's ``init_state`` evaluates ``f(x0)`` only for ``aux``;
XLA removes that call from the compiled run, so it is not counted."""

from __future__ import annotations

from typing import Any

import jax

from .base import _maps, _norm_fn, JaxAdapter


class Jaxopt(JaxAdapter):
    """jaxopt's AndersonAcceleration, FixedPointIteration and Broyden (fixed step 1,
    initial inverse Jacobian ``-I``, no line search: the pure method, like ours)."""

    library = "jaxopt"
    requires = ("jaxopt",)

    def _solver(self, fixed_point_map, residual, budget, tol, jit):
        import jaxopt

        common: dict[str, Any] = dict(
            maxiter=budget, tol=tol, implicit_diff=False, jit=jit, **self.kwargs
        )
        if self.method == "anderson":
            return jaxopt.AndersonAcceleration(
                fixed_point_fun=fixed_point_map,
                history_size=self.history + 1,
                beta=1.0,
                **common,
            )
        if self.method == "picard":
            return jaxopt.FixedPointIteration(fixed_point_fun=fixed_point_map, **common)
        return jaxopt.Broyden(
            fun=residual, stepsize=1.0, gamma=-1.0, history_size=self.history, **common
        )

    def solve_fn(self, fn, kind, budget):
        fixed_point_map, residual = _maps(fn, kind)

        def solve(params, z0, tol):
            # The parameters are closed over, not passed as ``run(z0, *args)``: jaxopt
            # carries ``args`` in its while-loop state, and under `vmap` (a batch) a
            # batched stopping test makes JAX batch every carried value, copying the
            # shared weights once per state and selecting them at every step (5x
            # slower still). Even so, jaxopt's compiled loop under `vmap` still
            # broadcasts the shared W to (B, n, n) (visible in its HLO), so batched
            # jaxopt is 30-80x slower than the other vmapped JAX solvers.
            closed_map = lambda z: fixed_point_map(z, params)  # noqa: E731
            closed_residual = lambda z: residual(z, params)  # noqa: E731
            solver = self._solver(closed_map, closed_residual, budget, tol, jit=True)
            z, state = solver.run(z0)
            return z, {"steps": state.iter_num}

        return solve

    def stepper(self, fn, kind, budget):
        """Drive ``init_state``/``update`` (each jitted once) from Python exactly as
        jaxopt's ``run`` does (one unconditional update, then while ``error > tol``, at
        most ``maxiter`` updates), recording the residual of the point each update
        evaluates: the extrapolated point (AndersonAcceleration, stored in its
        history), the input (FixedPointIteration), the new iterate (Broyden, whose
        ``init_state`` also evaluates ``F(x0)``)."""
        fixed_point_map, residual = _maps(fn, kind)
        norm = _norm_fn(residual)

        def solver_for(p, tol):
            return self._solver(
                lambda z: fixed_point_map(z, p), lambda z: residual(z, p), budget, tol, True
            )

        init = lambda z, p, tol: solver_for(p, tol).init_state(z)  # noqa: E731 (eager: runs once)
        update = jax.jit(lambda z, state, p, tol: solver_for(p, tol).update(z, state))

        def trace_lane(params, z0, tol):
            state = init(z0, params, tol)
            rows = [float(norm(z0, params))] if self.method == "broyden" else []
            z, count = z0, 0
            while count < budget and (count == 0 or float(state.error) > float(tol)):
                if self.method == "anderson":
                    pos = int(state.iter_num) % (self.history + 1)
                    z, state = update(z, state, params, tol)
                    evaluated = state.params_history[pos]
                elif self.method == "picard":
                    evaluated = z
                    z, state = update(z, state, params, tol)
                else:
                    z, state = update(z, state, params, tol)
                    evaluated = z
                rows.append(float(norm(evaluated, params)))
                count += 1
            return rows, len(rows), 0

        return trace_lane
