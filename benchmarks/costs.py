"""Fixed costs against the peers, measured in one run: `python -m benchmarks.costs`.

1. **Compile time** (jit lower + compile, best of `--repeats` fresh compiles, caches
   cleared) of one solve and of its gradient, on a 100-unknown tanh cell
   ``z = tanh(W z + x)``, float64, and the size of the traced program (jaxpr equations,
   counted recursively through sub-jaxprs). Ours with our `fixedpoint.ImplicitAdjoint`
   (the recommended adjoint) and with optimistix's default adjoint (what
   `optx.fixed_point` uses when none is given; its gradient then solves by dense LU);
   `optx.FixedPointIteration` with optimistix's adjoint and a GMRES backward solve;
   jaxopt's `AndersonAcceleration` and `FixedPointIteration` with their implicit
   differentiation.
2. **Fixed cost of a solve**: warm wall time of a whole solve of a 4-unknown contraction
   (``W = 0.3 I``, atol 1e-8), 10th percentile, with the number of steps each solver
   took: back to back (each solve called 4 times in a row, the first call left out, the
   rows interleaved over the solvers) and interleaved call by call (each call follows
   another solver's, so caches are cold). And XLA's flop estimate of each compiled
   solve: XLA's CPU client runs an executable estimated below 1,000 flops on the
   calling thread and any other on a worker thread, a hand-over that costs more than a
   tiny solve.
3. **Per-step cost with a cheap function**: a 64-unknown tanh cell iterated for exactly
   200 steps (tolerance 0) by our Neumann, `optx.FixedPointIteration` and jaxopt's
   `FixedPointIteration`, in microseconds per step (10th percentile of interleaved calls).

jaxopt is optional (``pip install jaxopt``); its rows are left out without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

import fixedpoint as fp


def _cell(z, wx):
    w, x = wx
    return jnp.tanh(w @ z + x)


def _problem(n: int, radius: float, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(k1, (n, n), jnp.float64)
    w = radius * w / jnp.linalg.norm(w, 2)
    return w, jax.random.normal(k2, (n,), jnp.float64)


def count_equations(jaxpr) -> int:
    """Equations of a jaxpr, counted recursively through the jaxprs in its parameters."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_equations(inner)
    return total


def _solvers(n: int, tol: float, max_steps: int) -> dict[str, Callable]:
    """Name -> ``solve(w, x) -> (z, steps)``."""
    z0 = jnp.zeros(n, jnp.float64)
    ours = {"Anderson": fp.Anderson, "Broyden": fp.Broyden, "Neumann": fp.Neumann}
    out: dict[str, Callable] = {}
    for name, cls in ours.items():
        for adjoint_name, adjoint in (
            ("fp.ImplicitAdjoint", fp.ImplicitAdjoint()),
            ("optx default", optx.ImplicitAdjoint()),
        ):

            def solve(w, x, cls=cls, adjoint=adjoint):
                sol = optx.fixed_point(
                    _cell,
                    cls(rtol=0.0, atol=tol),
                    z0,
                    (w, x),
                    max_steps=max_steps,
                    adjoint=adjoint,
                    throw=False,
                )
                return sol.value, sol.stats["num_steps"]

            out[f"fp.{name} ({adjoint_name})"] = solve

    def fpi(w, x):
        sol = optx.fixed_point(
            _cell,
            optx.FixedPointIteration(rtol=0.0, atol=tol),
            z0,
            (w, x),
            max_steps=max_steps,
            adjoint=optx.ImplicitAdjoint(lx.GMRES(rtol=1e-4, atol=1e-6)),
            throw=False,
        )
        return sol.value, sol.stats["num_steps"]

    out["optx.FixedPointIteration"] = fpi
    if importlib.util.find_spec("jaxopt") is not None:
        import jaxopt

        def fixed_point_fun(z, w, x):
            return _cell(z, (w, x))

        def aa(w, x):
            solver = jaxopt.AndersonAcceleration(
                fixed_point_fun=fixed_point_fun, history_size=6, tol=tol, maxiter=max_steps
            )
            params, state = solver.run(z0, w, x)
            return params, state.iter_num

        def jfpi(w, x):
            solver = jaxopt.FixedPointIteration(
                fixed_point_fun=fixed_point_fun, tol=tol, maxiter=max_steps
            )
            params, state = solver.run(z0, w, x)
            return params, state.iter_num

        out["jaxopt.AndersonAcceleration"] = aa
        out["jaxopt.FixedPointIteration"] = jfpi
    return out


def compile_times(n: int = 100, repeats: int = 3) -> list[tuple[str, int, float, int, float]]:
    """``(name, forward equations, forward compile s, gradient equations, gradient
    compile s)`` per solver."""
    w, x = _problem(n, 0.9)
    rows = []
    for name, solve in _solvers(n, 1e-8, 256).items():

        def forward(x, solve=solve):
            return solve(w, x)[0]

        def gradient(x, solve=solve):
            return jax.grad(lambda x: jnp.sum(solve(w, x)[0] ** 2))(x)

        row: list = [name]
        for fn in (forward, gradient):
            equations = count_equations(jax.make_jaxpr(fn)(x).jaxpr)
            best = np.inf
            for _ in range(repeats):
                jax.clear_caches()
                t0 = time.perf_counter()
                jax.jit(fn).lower(x).compile()
                best = min(best, time.perf_counter() - t0)
            row += [equations, best]
        rows.append(tuple(row))
    return rows


def _interleaved(fns: dict[str, Callable], args: tuple, calls: int) -> dict[str, float]:
    """10th percentile of the warm wall time of each function, calls interleaved."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.percentile(t, 10)) for name, t in times.items()}


def _back_to_back(fns: dict[str, Callable], args: tuple, rounds: int, calls: int = 4) -> dict:
    """10th percentile of the warm wall time of each function called `calls` times in a
    row (the first call of each row, after the other functions ran, is left out), rows
    interleaved over the functions."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for j in range(calls):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                if j:
                    times[name].append(time.perf_counter() - t0)
    return {name: float(np.percentile(t, 10)) for name, t in times.items()}


def estimated_flops(jitted: Any, *args) -> float:
    """XLA's cost-analysis estimate of a jitted function's floating-point operations
    (a loop body counted once). XLA's CPU client runs an executable whose estimate is
    below 1,000 on the calling thread and any other one on a worker thread, which on a
    tiny problem costs more than the solve itself."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float((analysis or {}).get("flops", float("nan")))


def fixed_costs(calls: int = 300) -> list[tuple[str, float, float, int, float]]:
    """``(name, us per solve interleaved, us per solve back to back, steps, XLA's flop
    estimate)`` on a 4-unknown contraction."""
    n = 4
    w, x = 0.3 * jnp.eye(n, dtype=jnp.float64), jnp.ones(n, jnp.float64)
    solvers = {
        name: jax.jit(solve)
        for name, solve in _solvers(n, 1e-8, 256).items()
        if "optx default" not in name
    }
    interleaved = _interleaved(solvers, (w, x), calls)
    warm = _back_to_back(solvers, (w, x), max(calls // 3, 1))
    return [
        (
            name,
            1e6 * interleaved[name],
            1e6 * warm[name],
            int(solvers[name](w, x)[1]),
            estimated_flops(solvers[name], w, x),
        )
        for name in solvers
    ]


def step_costs(n: int = 64, steps: int = 200, calls: int = 100) -> dict[str, tuple[float, int]]:
    """``(microseconds per step, steps)`` of plain iteration with a cheap function: the
    warm time of a solve of at most `steps` steps divided by the steps it took. (Ours
    and optimistix's run all of them with zero tolerances; jaxopt's stops once its
    error is exactly 0, 33 steps into this problem, which is why each time is divided
    by the solver's own count.)"""
    w, x = _problem(n, 0.5)
    z0 = jnp.zeros(n, jnp.float64)

    def optx_solve(solver, **kwargs):
        def solve(w, x):
            sol = optx.fixed_point(
                _cell, solver, z0, (w, x), max_steps=steps, throw=False, **kwargs
            )
            return sol.value, sol.stats["num_steps"]

        return jax.jit(solve)

    fns = {
        "fp.Neumann": optx_solve(fp.Neumann(rtol=0.0, atol=0.0), adjoint=fp.ImplicitAdjoint()),
        "optx.FixedPointIteration": optx_solve(optx.FixedPointIteration(rtol=0.0, atol=0.0)),
    }
    if importlib.util.find_spec("jaxopt") is not None:
        import jaxopt

        solver = jaxopt.FixedPointIteration(
            fixed_point_fun=lambda z, w, x: _cell(z, (w, x)), tol=0.0, maxiter=steps
        )

        def jaxopt_solve(w, x):
            params, state = solver.run(z0, w, x)
            return params, state.iter_num

        fns["jaxopt.FixedPointIteration"] = jax.jit(jaxopt_solve)
    taken = {name: int(fn(w, x)[1]) for name, fn in fns.items()}
    times = _interleaved(fns, (w, x), calls)
    return {name: (1e6 * t / taken[name], taken[name]) for name, t in times.items()}


def tables(repeats: int = 3) -> str:
    """The three tables, in Markdown (float64 is switched on for their duration)."""
    lines = [
        "## Compile time and traced size, tanh cell n = 100, float64\n",
        "| solver | forward eqns | forward compile [s] | gradient eqns | gradient compile [s] |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    with jax.enable_x64(True):
        for name, fe, ft, ge, gt in compile_times(repeats=repeats):
            lines.append(f"| {name} | {fe} | {ft:.3f} | {ge} | {gt:.3f} |")
        lines += [
            "\n## Fixed cost of a whole solve, 4 unknowns, W = 0.3 I, atol 1e-8\n",
            "| solver | us per solve, back to back | us per solve, interleaved | steps "
            "| XLA flop estimate |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, us, warm_us, evals, flops in fixed_costs():
            lines.append(f"| {name} | {warm_us:.1f} | {us:.1f} | {evals} | {flops:.0f} |")
        lines += [
            "\n## Plain iteration with a cheap function, n = 64, up to 200 steps\n",
            "| solver | us per step (a solve's time / its steps) | steps |",
            "| --- | ---: | ---: |",
        ]
        for name, (us, taken) in step_costs().items():
            lines.append(f"| {name} | {us:.2f} | {taken} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh compiles per entry (>= 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    print(tables(args.repeats), end="")


if __name__ == "__main__":
    main()
