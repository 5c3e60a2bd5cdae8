"""Adapters of every solver compared: ours (`fixedpoint`) and the peers (optimistix,
jaxopt, SciPy, torchdeq).

Every adapter solves a `problems.Problem` to the common tolerance (absolute threshold
``tol * problem.scale`` on the per-state 2-norm of the residual ``F``) within the
common budget of evaluations, and exposes

- `prepare(problem, tol, budget)` -> `Prepared` (compiles JAX solvers),
- `Prepared.run()`: one solve (the timed call; no tracing in it),
- `Prepared.trace()`: the common residual of every point at which the solver
  evaluated the problem function (see `harness.Trace`).

Settings shared for fairness: mixing/damping ``beta = 1`` and initial inverse
Jacobian ``-I`` everywhere (SciPy ``alpha=1``; jaxopt Broyden ``gamma=-1``); Anderson
history is matched in *differences*: our ``m`` differences = SciPy ``M = m`` =
jaxopt ``history_size = m + 1`` and torchdeq ``m + 1`` stored iterates (their
constrained least-squares problem over ``k`` iterates has ``k - 1`` degrees of
freedom); Broyden memory is the number of rank-one updates kept (ours restarts when
full, like SciPy's ``reduction_method="restart"``; jaxopt and torchdeq drop the oldest).

How each is stopped and counted:

- ours: ``rtol=0, atol=tol_abs, norm=optx.two_norm`` is exactly the common criterion;
  f evals = ``stats["num_steps"]``; the trace is ``stats["residual_trace"]`` of the
  timed run itself (``trace_length = budget``).
- optimistix FixedPointIteration/Newton/Chord: ``rtol=0, atol=tol_abs,
  norm=optx.two_norm`` (FixedPointIteration stops on ``||f(y) - y||``, i.e. the common
  criterion; Newton/Chord on ``||F(y)||`` *and* the Newton step). Traced by driving
  the solver's own ``init``/``step``/``terminate`` eagerly, exactly as
  ``optx.root_find`` does, and recording the residual of the point each step
  evaluates. Newton forms one dense Jacobian per step, Chord one at ``y0``.
- jaxopt: ``tol = tol_abs`` (all three stop on the 2-norm of the residual at the
  point just evaluated: the common criterion). Traced by an eager run
  (``jit=False``) of the same solver with a recording wrapper. AndersonAcceleration's
  ``init_state`` evaluates ``f(x0)`` only for ``aux``; XLA removes that call from the
  compiled run, so it is not counted.
- SciPy: ``f_tol = tol_abs`` with ``tol_norm`` = the worst per-state 2-norm: the
  common criterion. The NumPy function is wrapped with a counter (a hard cap at the
  budget) that also records the residual in the trace run. SciPy has no batch mode:
  by default it solves a batch as one system (one history shared by all states);
  ``scipy.anderson(M=5,per_state)`` solves state after state, each with the budget,
  like the vmapped JAX solvers (the slowest state's evaluations are counted).
  newton_krylov's evaluations include those of its finite-difference
  Jacobian-vector products.
- torchdeq: ``stop_mode="abs", tol = tol_abs`` (per-state 2-norm of ``f(x) - x`` at
  the point just evaluated: the common criterion), ``max_iter = budget``; the torch
  function is wrapped like SciPy's. Its anderson and fixed_point_iter return the
  *image* ``f(x)`` of their best point, so their final residual is that of ``f(x)``.

JAX solvers run one state per solve; a batch is `jax.vmap`-ed (as `fixedpoint_deq`
does), so every state stops on its own. Peers that are not installed are skipped with
a note; so is a method that does not apply (dense Newton/Chord above 2,048 unknowns).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import fixedpoint as fp

from .harness import OutOfBudget, Recorder, stack_lanes, Trace
from .problems import Problem


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

    name: str = ""
    library: str = ""
    method: str = ""
    differences: int | None = None
    requires: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)}" if missing else None

    def inapplicable(self, problem: Problem) -> str | None:
        return None

    def prepare(self, problem: Problem, *, tol: float, budget: int) -> Prepared:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# ----------------------------------------------------------------------------------
# JAX solvers.

_COMPILED: dict[tuple, tuple[Any, float]] = {}


def clear_compiled() -> None:
    """Forget the compiled solvers (they are shared between problems of one family)."""
    _COMPILED.clear()
    _STEPPERS.clear()


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
        if key not in _COMPILED:
            single = adapter.solve_fn(problem.fn, problem.kind, budget)
            if problem.batched:
                fn = jax.vmap(single, in_axes=(problem.batch_axes, 0, None))
            else:
                fn = single
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(self.params, self.z0, self.tol_arr).compile()
            _COMPILED[key] = (compiled, time.perf_counter() - t0)
        self.compiled, self.compile_s = _COMPILED[key]
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
    batch); `trace` records its evaluations."""

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
            if key not in _STEPPERS:
                _STEPPERS[key] = self.stepper(problem.fn, problem.kind, prepared.budget)
            rows, n_used, n_jac = _STEPPERS[key](params, z0, tol)
            lanes.append(np.asarray(rows) / problem.scale)
            used, jacs = max(used, n_used), max(jacs, n_jac)
        return Trace(rows=stack_lanes(lanes), evals_used=used, jacobians=jacs)

    def stepper(self, fn: Callable, kind: str, budget: int) -> Callable:
        """Return ``trace_lane(params, z0, tol_abs) -> (residual norms of the evaluated
        points, evaluations, dense Jacobians)`` for one state."""
        raise NotImplementedError


_STEPPERS: dict[tuple, Callable] = {}


def _shapes(params, z0) -> tuple:
    return (tuple(sorted((k, v.shape, str(v.dtype)) for k, v in params.items())), z0.shape, str(z0.dtype))


def _norm_fn(residual: Callable) -> Callable:
    return jax.jit(lambda z, p: jnp.linalg.norm(residual(z, p)))


def _set_atol(solver, tol):
    """Replace the (static, validated) `atol` of a solver by a traced value, so that
    one compiled solver serves every tolerance."""
    return eqx.tree_at(lambda s: s.atol, solver, tol)


class Ours(JaxAdapter):
    """`fixedpoint.Anderson` / `Broyden` / `Neumann` through `optx.fixed_point`
    (fixed-point problems) or `optx.root_find` (root problems)."""

    library = "fixedpoint"

    def __init__(self, name: str, method: str, cls: type, differences: int | None = None, **kwargs):
        self.name = name
        self.method = method
        self.cls = cls
        self.differences = differences
        self.kwargs = kwargs

    def solve_fn(self, fn, kind, budget):
        base = self.cls(rtol=0.0, atol=1.0, norm=optx.two_norm, trace_length=budget, **self.kwargs)

        def f(z, p):
            return fn(z, p, jnp)

        call = optx.fixed_point if kind == "fixed_point" else optx.root_find

        def solve(params, z0, tol):
            sol = call(f, _set_atol(base, tol), z0, params, max_steps=budget, throw=False)
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


class Optx(JaxAdapter):
    """optimistix's FixedPointIteration (``method="picard"``), Newton and Chord."""

    library = "optimistix"

    def __init__(self, name: str, method: str):
        self.name = name
        self.method = method

    def _solver(self, atol):
        common = dict(rtol=0.0, atol=atol, norm=optx.two_norm)
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
        base = self._solver(1.0)

        def solve(params, z0, tol):
            solver = _set_atol(base, tol)
            if self.method == "picard":
                sol = optx.fixed_point(fixed_point_map, solver, z0, params, max_steps=budget, throw=False)
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
        base = self._solver(1.0)
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
            solver = _set_atol(base, tol)
            state, done, ok = init(solver, z0, params)
            y, rows, steps = z0, [], 0
            while not bool(done) and bool(ok) and steps < budget:
                rows.append(float(norm(y, params)))
                y, state, done, ok = step(solver, y, state, params)
                steps += 1
            jacobians = steps if self.method == "newton" else int(self.method == "chord")
            return rows, steps, jacobians

        return trace_lane


class Jaxopt(JaxAdapter):
    """jaxopt's AndersonAcceleration, FixedPointIteration and Broyden (fixed step 1,
    initial inverse Jacobian ``-I``, no line search: the pure method, like ours)."""

    library = "jaxopt"
    requires = ("jaxopt",)

    def __init__(self, name: str, method: str, differences: int | None = None, **kwargs):
        self.name = name
        self.method = method
        self.differences = differences
        self.kwargs = kwargs  # further jaxopt options (e.g. ridge)

    def _solver(self, fixed_point_map, residual, budget, tol, jit):
        import jaxopt

        common = dict(maxiter=budget, tol=tol, implicit_diff=False, jit=jit, **self.kwargs)
        if self.method == "anderson":
            return jaxopt.AndersonAcceleration(
                fixed_point_fun=fixed_point_map, history_size=self.differences + 1, beta=1.0, **common
            )
        if self.method == "picard":
            return jaxopt.FixedPointIteration(fixed_point_fun=fixed_point_map, **common)
        return jaxopt.Broyden(
            fun=residual, stepsize=1.0, gamma=-1.0, history_size=self.differences, **common
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
                    pos = int(state.iter_num) % (self.differences + 1)
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


# ----------------------------------------------------------------------------------
# SciPy.


class Scipy(Adapter):
    """scipy.optimize.anderson / broyden1 / newton_krylov (line search: SciPy's
    default, Armijo, unless `line_search` is given).

    SciPy has no batch mode. By default a batch is solved as ONE system (one history
    shared by all states, one stopping test on the worst state). With
    ``per_state=True`` each state is solved on its own, one after the other, as the
    JAX solvers and torchdeq do (each state stops on its own; the evaluations counted
    are those of the slowest state, the wall time is that of all the solves)."""

    library = "scipy"
    requires = ("scipy",)

    def __init__(
        self, name: str, method: str, differences: int | None = None, per_state: bool = False, **kwargs
    ):
        self.name = name
        self.method = method
        self.differences = differences
        self.per_state = per_state
        self.kwargs = kwargs

    def inapplicable(self, problem):
        reason = super().inapplicable(problem)
        if reason or not self.per_state or problem.batched:
            return reason
        return "a single state: the same as the whole-system solve"

    def prepare(self, problem, *, tol, budget):
        return _PyPrepared(self, problem, tol, budget)

    def solve(self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder) -> np.ndarray:
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

    def _solve(self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder) -> np.ndarray:
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
            kwargs.update(M=self.differences, alpha=1.0)
        elif self.method == "broyden":
            solver = so.broyden1
            kwargs.update(alpha=1.0, reduction_method="restart", max_rank=self.differences)
        else:
            solver = so.newton_krylov
        try:
            x = solver(func, problem.z0.ravel().copy(), **kwargs)
        except so.NoConvergence as e:
            x = e.args[0]
        except OutOfBudget:
            x = recorder.last
        return np.asarray(x).reshape(shape)


# ----------------------------------------------------------------------------------
# torchdeq.


class TorchDEQ(Adapter):
    """torchdeq's anderson / broyden / fixed_point_iter solvers (torch, CPU, float64,
    under `torch.no_grad()`), batched natively: one history per state."""

    library = "torchdeq"
    requires = ("torch", "torchdeq")

    def __init__(self, name: str, method: str, differences: int | None = None, **kwargs):
        self.name = name
        self.method = method
        self.differences = differences
        self.kwargs = kwargs  # further solver options (e.g. lam)

    def prepare(self, problem, *, tol, budget):
        return _PyPrepared(self, problem, tol, budget)

    def solve(self, problem: Problem, tol_abs: float, budget: int, recorder: Recorder) -> np.ndarray:
        import torch
        from torchdeq.solver import get_solver

        from . import harness

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

        kwargs = dict(max_iter=budget, tol=tol_abs, stop_mode="abs")
        if self.method == "anderson":
            kwargs.update(m=self.differences + 1, tau=1.0)
        elif self.method == "broyden":
            # It evaluates g(x0) and then once per iteration: max_iter = budget - 1.
            kwargs.update(max_iter=budget - 1, LBFGS_thres=self.differences, ls=False)
        else:
            kwargs.update(tau=1.0)
        kwargs.update(self.kwargs)
        key = {"anderson": "anderson", "broyden": "broyden", "picard": "fixed_point_iter"}[self.method]
        with torch.no_grad():
            z, _, _ = get_solver(key)(func, x0, **kwargs)
        return z.numpy().reshape(problem.z0.shape)


class _PyPrepared(Prepared):
    def __init__(self, adapter, problem: Problem, tol: float, budget: int):
        self.adapter = adapter
        self.problem = problem
        self.tol_abs = tol * problem.scale
        self.budget = budget
        if problem.batched and adapter.library == "scipy":
            self.note = "each state on its own" if adapter.per_state else "whole batch as one system"

    def run(self):
        return self.adapter.solve(self.problem, self.tol_abs, self.budget, Recorder(self.problem, self.budget, False))

    def solution(self, out):
        return out

    def trace(self) -> Trace:
        recorder = Recorder(self.problem, self.budget, True)
        self.adapter.solve(self.problem, self.tol_abs, self.budget, recorder)
        if recorder.lanes is not None:  # solved state by state
            return Trace(rows=stack_lanes(recorder.lanes), evals_used=recorder.count)
        return recorder.trace()


# ----------------------------------------------------------------------------------
# The solvers of each grid.


def solvers(grid: str = "default") -> list[Adapter]:
    """The solver configurations compared (``grid="full"`` adds more settings)."""
    full = grid == "full"
    ours: list[Adapter] = [
        Ours("fp.Anderson(m=5)", "anderson", fp.Anderson, differences=5, m=5),
        Ours("fp.Broyden(memory=30)", "broyden", fp.Broyden, differences=30, memory=30),
        Ours("fp.Neumann", "picard", fp.Neumann),
    ]
    if full:
        ours += [
            Ours("fp.Anderson(m=10)", "anderson", fp.Anderson, differences=10, m=10),
            Ours("fp.Anderson(m=5,beta=0.5)", "anderson", fp.Anderson, differences=5, m=5, beta=0.5),
            Ours("fp.Anderson(m=20)", "anderson", fp.Anderson, differences=20, m=20),
            Ours("fp.Broyden(memory=10)", "broyden", fp.Broyden, differences=10, memory=10),
            Ours(
                "fp.Broyden(memory=30,line_search)", "broyden", fp.Broyden,
                differences=30, memory=30, line_search=True,
            ),
            Ours("fp.Neumann(beta=0.5)", "picard", fp.Neumann, beta=0.5),
        ]
    peers: list[Adapter] = [
        Optx("optx.FixedPointIteration", "picard"),
        Optx("optx.Newton", "newton"),
        Optx("optx.Chord", "chord"),
        Jaxopt("jaxopt.AndersonAcceleration(history_size=6)", "anderson", differences=5),
        Jaxopt("jaxopt.FixedPointIteration", "picard"),
        Jaxopt("jaxopt.Broyden(history_size=30)", "broyden", differences=30),
        Scipy("scipy.anderson(M=5)", "anderson", differences=5),
        Scipy("scipy.anderson(M=5,per_state)", "anderson", differences=5, per_state=True),
        Scipy("scipy.broyden1(max_rank=30)", "broyden", differences=30),
        Scipy("scipy.newton_krylov", "newton-krylov"),
        TorchDEQ("torchdeq.anderson(m=6)", "anderson", differences=5),
        TorchDEQ("torchdeq.broyden(LBFGS_thres=30)", "broyden", differences=30),
        TorchDEQ("torchdeq.fixed_point_iter", "picard"),
    ]
    if full:
        peers += [
            Jaxopt("jaxopt.AndersonAcceleration(history_size=11)", "anderson", differences=10),
            Scipy("scipy.anderson(M=10)", "anderson", differences=10),
            Scipy("scipy.anderson(M=5,line_search=None)", "anderson", differences=5, line_search=None),
            Scipy("scipy.broyden1(max_rank=30,line_search=None)", "broyden", differences=30, line_search=None),
            TorchDEQ("torchdeq.anderson(m=11)", "anderson", differences=10),
            # Their default regularisation is absolute (ridge 1e-5 on the Gram matrix of
            # residuals, lam 1e-4): near convergence it dominates and the mixing decays
            # to plain iteration. With a tiny one they need far fewer evaluations.
            Jaxopt("jaxopt.AndersonAcceleration(history_size=6,ridge=1e-14)", "anderson", differences=5, ridge=1e-14),
            TorchDEQ("torchdeq.anderson(m=6,lam=1e-10)", "anderson", differences=5, lam=1e-10),
        ]
    return ours + peers


def availability() -> dict[str, str]:
    """Which optional peers are installed (library -> "available" or why not)."""
    out = {}
    for lib, mods in {"jaxopt": ("jaxopt",), "scipy": ("scipy",), "torchdeq": ("torch", "torchdeq")}.items():
        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        out[lib] = "available" if not missing else f"not installed ({', '.join(missing)})"
    return out
