"""torchdeq's anderson, broyden and fixed_point_iter: ``stop_mode="abs", tol =
tol_abs`` (per-state 2-norm of ``f(x) - x`` at the point just evaluated: the common
criterion), ``max_iter = budget``; the torch function is wrapped like SciPy's. Its
anderson and fixed_point_iter return the *image* ``f(x)`` of their best point, so their
final residual is that of ``f(x)``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..harness import Recorder
from ..problems import Problem
from .base import PyAdapter


class TorchDEQ(PyAdapter):
    """torchdeq's anderson / broyden / fixed_point_iter solvers (torch, CPU, float64,
    under `torch.no_grad()`), batched natively: one history per state."""

    library = "torchdeq"
    requires = ("torch", "torchdeq")

    def solve(
        self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder
    ) -> np.ndarray:
        import torch  # pyright: ignore[reportMissingImports]
        from torchdeq.solver import get_solver  # pyright: ignore[reportMissingImports]

        from .. import harness

        if harness.PINNED_THREADS is not None and torch.get_num_threads() != harness.PINNED_THREADS:
            torch.set_num_threads(harness.PINNED_THREADS)
        params = problem.params_in(torch)
        x0 = torch.from_numpy(problem.z0.reshape(problem.batch_size, problem.dim).copy())

        def func(x):
            recorder.check()
            fx = problem.fixed_point_map(x, params, torch)
            if recorder.record:
                recorder.add((fx - x).numpy())
            return fx

        kwargs: dict[str, Any] = dict(max_iter=budget, tol=tol_abs, stop_mode="abs")
        if self.method == "anderson":
            kwargs.update(m=self.history + 1, tau=1.0)
        elif self.method == "broyden":
            # It evaluates g(x0) and then once per iteration: max_iter = budget - 1.
            kwargs.update(max_iter=budget - 1, LBFGS_thres=self.history, ls=False)
        else:
            kwargs.update(tau=1.0)
        kwargs.update(self.kwargs)
        key = {"anderson": "anderson", "broyden": "broyden", "picard": "fixed_point_iter"}[
            self.method
        ]
        with torch.no_grad():
            z, _, _ = get_solver(key)(func, x0, **kwargs)
        return z.numpy().reshape(problem.z0.shape)
