"""SciPy's anderson, broyden1 (or broyden2) and newton_krylov: ``f_tol = tol_abs`` with ``tol_norm`` =
the worst per-state 2-norm: the common criterion. The NumPy function is wrapped with a
counter (a hard cap at the budget) that also records the residual in the trace run.
SciPy has no batch mode: by default it solves a batch as one system (one history shared
by all states); ``per_state=True`` solves state after state, each with the budget, like
the vmapped JAX solvers (the slowest state's evaluations are counted). newton_krylov's
evaluations include those of its finite-difference Jacobian-vector products."""

from __future__ import annotations

import numpy as np

from ..harness import OutOfBudget, Recorder
from ..problems import Problem
from .base import PyAdapter


class Scipy(PyAdapter):
    """scipy.optimize.anderson / broyden1 (broyden2 with ``bad=True``) / newton_krylov (line search: SciPy's
    default, Armijo, unless `line_search` is given).

    SciPy has no batch mode. By default a batch is solved as ONE system (one history
    shared by all states, one stopping test on the worst state). With
    ``per_state=True`` each state is solved on its own, one after the other, as the
    JAX solvers and torchdeq do (each state stops on its own; the evaluations counted
    are those of the slowest state, the wall time is that of all the solves)."""

    library = "scipy"
    requires = ("scipy",)

    def __init__(
        self,
        name: str,
        method: str,
        differences: int | None = None,
        per_state: bool = False,
        bad: bool = False,
        **kwargs,
    ):
        super().__init__(name, method, differences, **kwargs)
        self.per_state = per_state
        self.bad = bad  # Broyden: broyden2 ("bad" Broyden) instead of broyden1

    def inapplicable(self, problem):
        reason = super().inapplicable(problem)
        if reason or not self.per_state or problem.batched:
            return reason
        return "a single state: the same as the whole-system solve"

    def note(self, problem: Problem) -> str:
        if not problem.batched:
            return ""
        return "each state on its own" if self.per_state else "whole batch as one system"

    def solve(
        self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder
    ) -> np.ndarray:
        if not (self.per_state and problem.batched):
            return self._solve(problem, tol_abs, budget, recorder)
        out, lanes, used = [], [], 0
        for b in range(problem.batch_size):
            lane = problem.lane(b)
            rec = Recorder(lane, budget, recorder.record)
            out.append(self._solve(lane, tol_abs, budget, rec))
            lanes.append(np.asarray(rec.rows).reshape(-1) * lane.scale / problem.scale)
            used = max(used, rec.count)
        recorder.lanes, recorder.count = lanes, used
        return np.stack(out)

    def _solve(
        self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder
    ) -> np.ndarray:
        import scipy.optimize as so

        shape, n, params = problem.z0.shape, problem.dim, problem.params

        def func(x):
            recorder.check()
            z = x.reshape(shape)
            r = problem.residual(z, params, np)
            recorder.last = x
            recorder.add(r)
            return r.ravel()

        def norm(v):
            return float(np.linalg.norm(np.reshape(v, (-1, n)), axis=-1).max())

        kwargs = dict(f_tol=tol_abs, tol_norm=norm, maxiter=budget, **self.kwargs)
        if self.method == "anderson":
            solver = so.anderson
            kwargs.update(M=self.history, alpha=1.0)
        elif self.method == "broyden":
            solver = so.broyden2 if self.bad else so.broyden1
            kwargs.update(alpha=1.0, reduction_method="restart", max_rank=self.history)
        else:
            solver = so.newton_krylov
        try:
            x = solver(func, problem.z0.ravel().copy(), **kwargs)
        except so.NoConvergence as e:
            x = e.args[0]
        except OutOfBudget:
            x = recorder.last
        return np.asarray(x).reshape(shape)
