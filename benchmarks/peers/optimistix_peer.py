"""optimistix's FixedPointIteration, Newton and Chord: ``rtol=0, atol=tol_abs,
norm=optx.two_norm`` (FixedPointIteration stops on ``||f(y) - y||``, i.e. the common
criterion; Newton/Chord on ``||F(y)||`` *and* the Newton step). Traced by driving the
solver's own ``init``/``step``/``terminate`` eagerly, exactly as ``optx.root_find``
does, and recording the residual of the point each step evaluates. Newton forms one
dense Jacobian per step, Chord one at ``y0``."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import optimistix as optx

from .base import _maps, _norm_fn, DENSE_MAX, JaxAdapter


class Optx(JaxAdapter):
    """optimistix's FixedPointIteration (``method="picard"``), Newton and Chord."""

    library = "optimistix"

    def _solver(self, atol):
        common: dict[str, Any] = dict(rtol=0.0, atol=atol, norm=optx.two_norm)
        if self.method == "picard":
            return optx.FixedPointIteration(**common)
        if self.method == "newton":
            return optx.Newton(**common)
        return optx.Chord(**common)

    def inapplicable(self, problem):
        if self.method in ("newton", "chord") and problem.dim > DENSE_MAX:
            return f"dense Jacobian skipped above {DENSE_MAX} unknowns"
        return None

    def solve_fn(self, fn, kind, budget):
        fixed_point_map, residual = _maps(fn, kind)

        def solve(params, z0, tol):
            solver: Any = self._solver(tol)  # FixedPointIteration for "picard"
            if self.method == "picard":
                sol = optx.fixed_point(
                    fixed_point_map, solver, z0, params, max_steps=budget, throw=False
                )
            else:
                sol = optx.root_find(residual, solver, z0, params, max_steps=budget, throw=False)
            return sol.value, {"steps": sol.stats["num_steps"]}

        return solve

    def stepper(self, fn, kind, budget):
        """Drive ``init``/``step``/``terminate`` from Python exactly as
        `optimistix`'s loop does (each jitted once), recording the residual of the point
        that each step evaluates (every step evaluates the function once, at its
        input ``y``; Newton also forms a Jacobian there, Chord once at ``y0``)."""
        fixed_point_map, residual = _maps(fn, kind)
        target = fixed_point_map if self.method == "picard" else residual
        fn_optx = lambda y, args: (target(y, args), None)  # noqa: E731
        tags = frozenset()
        norm = _norm_fn(residual)

        @eqx.filter_jit
        def init(solver, y, args):
            f_struct, aux_struct = jax.eval_shape(lambda: fn_optx(y, args))
            state = solver.init(fn_optx, y, args, {}, f_struct, aux_struct, tags)
            done, result = solver.terminate(fn_optx, y, args, {}, state, tags)
            return state, done, result == optx.RESULTS.successful

        @eqx.filter_jit
        def step(solver, y, state, args):
            new_y, state, _ = solver.step(fn_optx, y, args, {}, state, tags)
            done, result = solver.terminate(fn_optx, y, args, {}, state, tags)
            return new_y, state, done, result == optx.RESULTS.successful

        def trace_lane(params, z0, tol):
            solver = self._solver(tol)
            state, done, ok = init(solver, z0, params)
            y, rows, steps = z0, [], 0
            while not bool(done) and bool(ok) and steps < budget:
                rows.append(float(norm(y, params)))
                y, state, done, ok = step(solver, y, state, params)
                steps += 1
            jacobians = steps if self.method == "newton" else int(self.method == "chord")
            return rows, steps, jacobians

        return trace_lane
