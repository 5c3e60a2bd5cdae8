"""The shared base of the solver adapters: `Adapter` (one solver configuration),
`Prepared` (a solver set up for one problem), the JAX adapter's compile-once machinery
(`JaxAdapter`, with its compilations held by an explicit `CompileCache`) and the
Python-side adapter for NumPy/torch solvers (`PyAdapter`). How each library is run,
stopped and counted is described in `benchmarks.peers` and on each adapter."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..harness import Recorder, stack_lanes, Trace
from ..problems import Problem


DENSE_MAX = 2048  # largest system for which a dense Jacobian is formed


def _maps(fn: Callable, kind: str):
    """The fixed-point map ``T`` and the residual ``F`` of a problem function, in JAX."""

    def fixed_point_map(z, p):
        out = fn(z, p, jnp)
        return out if kind == "fixed_point" else z + out

    def residual(z, p):
        out = fn(z, p, jnp)
        return out - z if kind == "fixed_point" else out

    return fixed_point_map, residual


class Prepared:
    """A solver set up for one problem: `run()` solves, `solution(out)` extracts the
    returned point, `trace()` records the residual of every evaluation."""

    compile_s: float | None = None
    note: str = ""

    def run(self) -> Any:
        raise NotImplementedError

    def solution(self, out: Any) -> np.ndarray:
        raise NotImplementedError

    def trace(self) -> Trace:
        raise NotImplementedError


class Adapter:
    """One solver configuration. `name` is its display name; `method` its family
    (``anderson``, ``broyden``, ``picard``, ``newton``, ``chord``, ``newton-krylov``);
    `differences` the Anderson history / Broyden memory in our units (for matching)."""

    library: str = ""
    requires: tuple[str, ...] = ()

    def __init__(self, name: str, method: str, differences: int | None = None, **kwargs: Any):
        self.name = name
        self.method = method
        self.differences = differences
        self.kwargs = kwargs  # further options of the solver (e.g. ridge, line_search)

    @property
    def history(self) -> int:
        """`differences`, for a method that keeps a history (Anderson, Broyden)."""
        if self.differences is None:
            raise ValueError(f"{self.name}: a {self.method} adapter needs `differences`")
        return self.differences

    def unavailable(self) -> str | None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)}" if missing else None

    def inapplicable(self, problem: Problem) -> str | None:
        return None

    def prepare(self, problem: Problem, *, tol: float, budget: int) -> Prepared:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class CompileCache:
    """The compiled solvers and tracers of JAX adapters, shared between the problems of
    one family (same function and shapes) and between adapters of the same name. Pass
    one to `benchmarks.peers.solvers` (the test session and the report each hold one);
    `clear()` frees the compilations (the report does so after each family)."""

    def __init__(self) -> None:
        self.compiled: dict[tuple, tuple[Any, float]] = {}
        self.steppers: dict[tuple, Callable] = {}

    def clear(self) -> None:
        self.compiled.clear()
        self.steppers.clear()


class _JaxPrepared(Prepared):
    def __init__(self, adapter: "JaxAdapter", problem: Problem, tol: float, budget: int):
        self.adapter = adapter
        self.problem = problem
        self.budget = budget
        self.tol_abs = tol * problem.scale
        self.params = problem.params_in(jnp)
        self.z0 = jnp.asarray(problem.z0)
        self.tol_arr = jnp.asarray(self.tol_abs, dtype=self.z0.dtype)
        key = (adapter.name, problem.signature(), budget, str(self.z0.dtype))
        cache = adapter.cache
        if key not in cache.compiled:
            single = adapter.solve_fn(problem.fn, problem.kind, budget)
            if problem.batched:
                fn = jax.vmap(single, in_axes=(problem.batch_axes, 0, None))
            else:
                fn = single
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(self.params, self.z0, self.tol_arr).compile()
            cache.compiled[key] = (compiled, time.perf_counter() - t0)
        self.compiled, self.compile_s = cache.compiled[key]
        self.last_out = None
        self.note = adapter.note(problem)

    def run(self):
        out = self.compiled(self.params, self.z0, self.tol_arr)
        jax.block_until_ready(out)
        self.last_out = out
        return out

    def solution(self, out):
        return np.asarray(out[0])

    def trace(self) -> Trace:
        return self.adapter.trace(self, self.problem)


class JaxAdapter(Adapter):
    """A JAX solver: `solve_fn` returns ``solve(params, z0, tol_abs) -> (z, aux)`` for
    one state (jitted and compiled once per problem signature; `vmap`-ed for a
    batch); `trace` records its evaluations. Compilations are kept in `cache`."""

    def __init__(
        self,
        name: str,
        method: str,
        differences: int | None = None,
        *,
        cache: CompileCache | None = None,
        **kwargs: Any,
    ):
        super().__init__(name, method, differences, **kwargs)
        self.cache = CompileCache() if cache is None else cache

    def solve_fn(self, fn: Callable, kind: str, budget: int) -> Callable:
        raise NotImplementedError

    def note(self, problem: Problem) -> str:
        return ""

    def prepare(self, problem, *, tol, budget):
        return _JaxPrepared(self, problem, tol, budget)

    def trace(self, prepared: _JaxPrepared, problem: Problem) -> Trace:
        """Default: trace each state of a batch separately with `trace_lane`, which
        drives the solver's own (jitted) step function from Python and recomputes the
        residual of each point the step evaluates."""
        lanes, used, jacs = [], 0, 0
        tol = jnp.asarray(prepared.tol_abs, dtype=prepared.z0.dtype)
        for b in range(problem.batch_size):
            if problem.batched:
                params_np, z0 = problem.lane_params(b), problem.z0[b]
            else:
                params_np, z0 = problem.params, problem.z0
            params = {k: jnp.asarray(v) for k, v in params_np.items()}
            z0 = jnp.asarray(z0)
            key = (self.name, problem.fn, problem.kind, prepared.budget, _shapes(params, z0))
            steppers = self.cache.steppers
            if key not in steppers:
                steppers[key] = self.stepper(problem.fn, problem.kind, prepared.budget)
            rows, n_used, n_jac = steppers[key](params, z0, tol)
            lanes.append(np.asarray(rows) / problem.scale)
            used, jacs = max(used, n_used), max(jacs, n_jac)
        return Trace(rows=stack_lanes(lanes), evals_used=used, jacobians=jacs)

    def stepper(self, fn: Callable, kind: str, budget: int) -> Callable:
        """Return ``trace_lane(params, z0, tol_abs) -> (residual norms of the evaluated
        points, evaluations, dense Jacobians)`` for one state."""
        raise NotImplementedError


def _shapes(params, z0) -> tuple:
    return (
        tuple(sorted((k, v.shape, str(v.dtype)) for k, v in params.items())),
        z0.shape,
        str(z0.dtype),
    )


def _norm_fn(residual: Callable) -> Callable:
    return jax.jit(lambda z, p: jnp.linalg.norm(residual(z, p)))


class PyAdapter(Adapter):
    """A solver run from Python on NumPy or torch arrays (SciPy, torchdeq):
    `solve(problem, tol_abs, budget, recorder)` solves once, counting (and, when
    tracing, recording) every evaluation through `recorder`."""

    def prepare(self, problem, *, tol, budget):
        return _PyPrepared(self, problem, tol, budget)

    def note(self, problem: Problem) -> str:
        return ""

    def solve(
        self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder
    ) -> np.ndarray:
        raise NotImplementedError


class _PyPrepared(Prepared):
    def __init__(self, adapter: PyAdapter, problem: Problem, tol: float, budget: int):
        self.adapter = adapter
        self.problem = problem
        self.tol_abs = tol * problem.scale
        self.budget = budget
        self.note = adapter.note(problem)

    def run(self):
        return self.adapter.solve(
            self.problem, self.tol_abs, self.budget, Recorder(self.problem, self.budget, False)
        )

    def solution(self, out):
        return out

    def trace(self) -> Trace:
        recorder = Recorder(self.problem, self.budget, True)
        self.adapter.solve(self.problem, self.tol_abs, self.budget, recorder)
        if recorder.lanes is not None:  # solved state by state
            return Trace(rows=stack_lanes(recorder.lanes), evals_used=recorder.count)
        return recorder.trace()


# ----------------------------------------------------------------------------------
