"""Our solvers (`fixedpoint`): ``rtol=0, atol=tol_abs, norm=optx.two_norm`` is exactly
the common criterion; f evals = ``stats["num_steps"]``; the trace is
``stats["residual_trace"]`` of the timed run itself (``trace_length = budget``)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optimistix as optx

from fixedpoint.internal import check_solver_name, root_finder

from ..harness import stack_lanes, Trace
from .base import JaxAdapter


class Ours(JaxAdapter):
    """`fixedpoint.Anderson` / `Broyden` / `Neumann` (built from the solver names of
    `fixedpoint.internal.SOLVERS`: ``method`` is ``"anderson"``, ``"broyden"`` or
    ``"picard"``) through `optx.fixed_point` (fixed-point problems) or
    `optx.root_find` (root problems). The tolerance is a traced argument of the
    compiled solve, so one compilation serves every tolerance."""

    library = "fixedpoint"

    def __init__(self, name: str, method: str, *args: Any, **kwargs: Any):
        check_solver_name("method", method)
        super().__init__(name, method, *args, **kwargs)

    def solve_fn(self, fn, kind, budget):
        def solver(tol):
            return root_finder(
                self.method,
                rtol=0.0,
                atol=tol,
                norm=optx.two_norm,
                trace_length=budget,
                **self.kwargs,
            )

        def f(z, p):
            return fn(z, p, jnp)

        call = optx.fixed_point if kind == "fixed_point" else optx.root_find

        def solve(params, z0, tol):
            sol = call(f, solver(tol), z0, params, max_steps=budget, throw=False)
            return sol.value, {
                "steps": sol.stats["num_steps"],
                "trace": sol.stats["residual_trace"],
            }

        return solve

    def trace(self, prepared, problem):
        out = prepared.last_out if prepared.last_out is not None else prepared.run()
        steps = np.atleast_1d(np.asarray(out[1]["steps"]))
        norms = np.asarray(out[1]["trace"]).reshape(problem.batch_size, -1)
        used = int(steps.max())
        lanes = [norms[b, : int(steps[b])] / problem.scale for b in range(problem.batch_size)]
        return Trace(rows=stack_lanes(lanes), evals_used=used)
