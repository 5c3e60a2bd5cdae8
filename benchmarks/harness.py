"""Measurement: run one solver on one problem and record what the issue asks for.

For every (problem, solver):

- **success**: the common residual (see `problems.Problem.relative_residual`),
  *recomputed here with NumPy on the point the solver returns*, is <= `TOL`. No
  library's own convergence flag is trusted.
- **f evals to tol**: the number of evaluations of the problem function after which
  an evaluated point first had common residual <= `TOL`. Every solver is traced: the
  residual of every point at which it evaluates the function is recorded, in call
  order (how each library is traced is documented on its adapter in `benchmarks.peers`). For
  a batch, each state's first hit is found and the latest one counts (the number of
  batched evaluations until every state has met the tolerance).
- **f evals used**: the evaluations the solver made with its own stopping rule, set
  to the common criterion where the library allows it (all of them but Newton/Chord,
  which stop on their step size).
- **Jacobians**: dense Jacobians formed (Newton: one per step, Chord: one).
- **final residual**: the common residual at the returned point.
- **compile time**: JAX solvers only: `jax.jit(...).lower(...).compile()` of the
  timed function. Problems of one family with equal shapes share it (the tolerance
  and the parameters are arguments), so it is paid once per family and size.
- **warm wall time**: the best of a few timed runs after a warm-up run (the timed run
  does no tracing or recording).

Tolerance and budget are the same for every solver: `TOL` on the common residual and
at most `BUDGET` evaluations of the function.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .problems import Problem


TOL = 1e-8
BUDGET = 500

# Threads of the BLAS/OpenMP pools of NumPy/SciPy (OpenBLAS) and torch (MKL/OpenMP),
# once `pin_threads` has run (None: left alone).
PINNED_THREADS: int | None = None

_OPENBLAS_SETTERS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "openblas_set_num_threads64_",
)


def pin_threads(n: int = 1) -> None:
    """Run the BLAS/OpenMP thread pools of NumPy, SciPy and torch with `n` threads.

    On small problems (n <= a few thousand) one thread is the fast setting, and on a
    small shared machine multi-threaded OpenBLAS/MKL can be pathologically slow (on
    the 2-core machine this suite was written on, a 144 x 144 LU factorisation took
    0.3 s with 2 OpenBLAS threads instead of 0.3 ms, and torchdeq's batched Anderson
    was 35x slower with 2 torch threads). JAX's own (XLA/Eigen) threads are left
    alone; they do not show the problem. Sets the environment variables for libraries
    loaded later and, through ctypes, the OpenBLAS libraries already loaded;
    torch is set when it is imported by its adapter (`peers.TorchDEQ`).
    """
    global PINNED_THREADS
    PINNED_THREADS = n
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:  # not Linux: the environment variables are all we can do
        paths = set()
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _OPENBLAS_SETTERS:
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(n))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


class OutOfBudget(Exception):
    """Raised by a counting wrapper when a solver asks for more than the budget."""


@dataclasses.dataclass
class Trace:
    """The common residual of every evaluated point: ``rows[k, b]`` is the residual of
    state ``b`` at the ``k``-th evaluation (NaN where a state did not run that far).
    `evals_used` is the number of evaluations made, `jacobians` the dense Jacobians."""

    rows: np.ndarray
    evals_used: int
    jacobians: int = 0


def stack_lanes(lanes: Sequence[Sequence[float] | np.ndarray]) -> np.ndarray:
    """Pad per-state traces of different lengths with NaN into one ``(K, B)`` array."""
    length = max((len(x) for x in lanes), default=0)
    out = np.full((length, len(lanes)), np.nan)
    for b, x in enumerate(lanes):
        out[: len(x), b] = np.asarray(x, dtype=np.float64).reshape(-1)
    return out


def evals_to_tol(rows: np.ndarray, tol: float) -> int | None:
    """First evaluation count at which every state had met `tol` (None if never)."""
    if rows.size == 0:
        return None
    worst = 0
    for b in range(rows.shape[1]):
        with np.errstate(invalid="ignore"):
            hit = np.flatnonzero(rows[:, b] <= tol)
        if hit.size == 0:
            return None
        worst = max(worst, int(hit[0]) + 1)
    return worst


def curve(rows: np.ndarray, tol: float) -> np.ndarray:
    """The residual against evaluations, for the plots: the raw residual of a single
    state; for a batch, the worst state, each state frozen at its value once it has
    met `tol` (or run out)."""
    if rows.size == 0:
        return np.zeros(0)
    if rows.shape[1] == 1:
        return rows[:, 0]
    frozen = rows.copy()
    for b in range(rows.shape[1]):
        col = frozen[:, b]
        with np.errstate(invalid="ignore"):
            hit = np.flatnonzero(col <= tol)
        if hit.size:
            col[hit[0] :] = col[hit[0]]
        last = np.flatnonzero(np.isfinite(col))
        if last.size:
            col[last[-1] + 1 :] = col[last[-1]]
    return np.nanmax(frozen, axis=1)


class Recorder:
    """Counts the evaluations of a wrapped function and, when `record` is set, the
    common residual of each evaluated point (per state). Raises `OutOfBudget` when
    asked for more than `budget` evaluations."""

    def __init__(self, problem: Problem, budget: int, record: bool):
        self.problem = problem
        self.budget = budget
        self.record = record
        self.count = 0
        self.rows: list[np.ndarray] = []
        self.lanes: list[np.ndarray] | None = None  # per-state traces of a state-by-state solve
        self.last: Any = None

    def check(self):
        if self.count >= self.budget:
            raise OutOfBudget
        self.count += 1

    def add(self, residual) -> None:
        if self.record:
            self.rows.append(self.problem.lane_norms(residual) / self.problem.scale)

    def trace(self, skip: int = 0, jacobians: int = 0) -> Trace:
        rows = np.array(self.rows[skip:]).reshape(-1, self.problem.batch_size)
        return Trace(rows=rows, evals_used=self.count - skip, jacobians=jacobians)


@dataclasses.dataclass
class Result:
    """One (problem, solver) measurement. `status` is ``"ok"`` (it ran; see `success`),
    ``"skipped"`` (not installed / does not apply: `note` says why) or ``"error"``."""

    problem: str
    solver: str
    library: str
    method: str
    status: str
    note: str = ""
    success: bool = False
    evals_to_tol: int | None = None
    evals_used: int | None = None
    jacobians: int = 0
    final_residual: float = math.nan
    compile_s: float | None = None
    wall_s: float | None = None
    curve: np.ndarray | None = None

    def row(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("curve")
        return d


def time_best(
    fn: Callable[[], Any], min_time: float = 0.05, max_reps: int = 100, min_reps: int = 3
) -> float:
    """Best wall time of `fn()` over repeated runs: as many as fit in `min_time`
    seconds, at least `min_reps` (one if a single run takes over a second), at most
    `max_reps`. Fast JAX solves get many repetitions, which makes the best time robust
    to the noise of a small shared machine."""
    best = math.inf
    total = 0.0
    reps = 0
    while reps < max_reps and (total < min_time or reps < (1 if best > 1.0 else min_reps)):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        total += dt
        reps += 1
    return best


def evaluate(
    problem: Problem,
    adapter,
    *,
    tol: float = TOL,
    budget: int = BUDGET,
    timing: bool = True,
    trace: bool = True,
) -> Result:
    """Measure `adapter` (see `peers.Adapter`) on `problem`."""
    base: dict[str, Any] = dict(
        problem=problem.name, solver=adapter.name, library=adapter.library, method=adapter.method
    )
    reason = adapter.unavailable() or adapter.inapplicable(problem)
    if reason:
        return Result(**base, status="skipped", note=reason)
    try:
        prepared = adapter.prepare(problem, tol=tol, budget=budget)
        out = prepared.run()  # warm-up (JAX: the first call after compiling)
        final = problem.relative_residual(prepared.solution(out))
        wall = time_best(prepared.run) if timing else None
        tr = prepared.trace() if trace else None
    except Exception as e:  # a peer crashing is a result, not a harness failure
        note = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if os.environ.get("BENCHMARKS_DEBUG"):
            traceback.print_exc()
        return Result(**base, status="error", note=note)
    result = Result(
        **base,
        status="ok",
        note=prepared.note,
        success=bool(final <= tol),
        final_residual=final,
        compile_s=prepared.compile_s,
        wall_s=wall,
    )
    if tr is not None:
        result.evals_to_tol = evals_to_tol(tr.rows, tol)
        result.evals_used = tr.evals_used
        result.jacobians = tr.jacobians
        result.curve = curve(tr.rows, tol)
    return result
