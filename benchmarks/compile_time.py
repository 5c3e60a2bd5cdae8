"""Compile time of each solver against jaxopt's and optimistix's, measured in one run:
`python -m benchmarks.compile_time`.

The problem is the tanh cell ``z = tanh(W z + x)`` with n = 100 unknowns, float64,
``||W||_2 = 0.9``, solved from ``z = 0`` to ``atol = 1e-8`` (at most 256 steps). For
each solver, two functions of `x` are compiled: the solve (**forward**) and the gradient
of ``sum(z^2)`` (**gradient**: implicit differentiation, with this package's
`fixedpoint.ImplicitAdjoint` and its default backward solver for ours, optimistix's
adjoint with a GMRES backward solve for `optx.FixedPointIteration`, jaxopt's implicit
differentiation for jaxopt's). A time is the best of `--repeats` rounds of
``jax.jit(fn).lower(x).compile()`` after `jax.clear_caches()`, split into tracing and
lowering (Python) and XLA's compilation; the rounds interleave the solvers, so that a
busy machine slows them alike. Only ratios measured in one run are comparable.

**Kernels** counts what XLA's CPU backend compiles separately (each fusion, product,
reduction or library call outside a fusion; constants, tuples, copies and control flow
are not counted): its compile time grows with this number, which does not depend on
the machine's load. `benchmarks/test_compile_time.py` pins it per solver.

Add a solver by adding an entry to `solvers()`.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

import fixedpoint as fp


N = 100
TOL = 1e-8
MAX_STEPS = 256

#: Instructions of a compiled module that are no kernel of their own.
_NOT_KERNELS = frozenset(
    {
        "parameter",
        "constant",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "copy",
        "copy-start",
        "copy-done",
        "while",
        "conditional",
        "call",
    }
)


def _cell(z, wx):
    w, x = wx
    return jnp.tanh(w @ z + x)


def problem(n: int = N, radius: float = 0.9, seed: int = 0):
    """``(W, x)`` of the tanh cell (float64: call under `jax.enable_x64`)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(k1, (n, n), jnp.float64)
    w = radius * w / jnp.linalg.norm(w, 2)
    return w, jax.random.normal(k2, (n,), jnp.float64)


def _ours(solver: optx.AbstractRootFinder) -> Callable:
    def solve(w, x):
        z0 = jnp.zeros_like(x)
        sol = optx.fixed_point(
            _cell,
            solver,
            z0,
            (w, x),
            max_steps=MAX_STEPS,
            adjoint=fp.ImplicitAdjoint(),
            throw=False,
        )
        return sol.value

    return solve


def _optx_fpi(w, x):
    sol = optx.fixed_point(
        _cell,
        optx.FixedPointIteration(rtol=0.0, atol=TOL),
        jnp.zeros_like(x),
        (w, x),
        max_steps=MAX_STEPS,
        adjoint=optx.ImplicitAdjoint(lx.GMRES(rtol=1e-4, atol=1e-6)),
        throw=False,
    )
    return sol.value


def _jaxopt_anderson(w, x):
    import jaxopt

    solver = jaxopt.AndersonAcceleration(
        fixed_point_fun=lambda z, w, x: _cell(z, (w, x)),
        history_size=6,
        tol=TOL,
        maxiter=MAX_STEPS,
    )
    return solver.run(jnp.zeros_like(x), w, x).params


def solvers() -> dict[str, Callable]:
    """Name -> ``solve(w, x) -> z``. jaxopt's row is there when jaxopt is installed."""
    out: dict[str, Callable] = {
        "fp.Anderson": _ours(fp.Anderson(rtol=0.0, atol=TOL)),
        "fp.Broyden": _ours(fp.Broyden(rtol=0.0, atol=TOL)),
        "fp.Neumann": _ours(fp.Neumann(rtol=0.0, atol=TOL)),
        "fp.NewtonKrylov": _ours(fp.NewtonKrylov(rtol=0.0, atol=TOL)),
        "fp.Polyalgorithm": _ours(fp.Polyalgorithm(rtol=0.0, atol=TOL)),
        "optx.FixedPointIteration": _optx_fpi,
    }
    if importlib.util.find_spec("jaxopt") is not None:
        out["jaxopt.AndersonAcceleration"] = _jaxopt_anderson
    return out


def programs(solve: Callable, w) -> dict[str, Callable]:
    """The two functions of `x` that are compiled: ``forward`` and ``gradient``."""

    def forward(x):
        return solve(w, x)

    def gradient(x):
        return jax.grad(lambda x: jnp.sum(solve(w, x) ** 2))(x)

    return {"forward": forward, "gradient": gradient}


def kernels(hlo_text: str) -> int:
    """The kernels of a compiled module (`compiled.as_text()`): the instructions of
    every computation that is not the body of a fusion or a reduction's operator,
    less those that compile to no code of their own (`_NOT_KERNELS`)."""
    inner = set(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", hlo_text))
    total = 0
    for name, body in re.findall(
        r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S
    ):
        if name in inner:
            continue
        for opcode in re.findall(r"= \S+ ([\w\-]+)\(", body):
            total += opcode not in _NOT_KERNELS
    return total


def count_kernels(fn: Callable, *args) -> int:
    """`kernels` of `jax.jit(fn)` compiled for `args`."""
    return kernels(jax.jit(fn).lower(*args).compile().as_text() or "")


def measure(names: list[str] | None = None, repeats: int = 3) -> dict[tuple[str, str], dict]:
    """``(solver, "forward" | "gradient") -> {"trace": s, "compile": s, "total": s,
    "kernels": k}``, the times the best of `repeats` interleaved rounds (float64 is
    switched on for the duration)."""
    with jax.enable_x64(True):
        w, x = problem()
        table = solvers()
        names = list(table) if names is None else names
        fns = {(n, kind): f for n in names for kind, f in programs(table[n], w).items()}
        best: dict[tuple[str, str], dict] = {
            key: {"trace": np.inf, "compile": np.inf, "total": np.inf} for key in fns
        }
        for _ in range(repeats):
            for key, fn in fns.items():
                jax.clear_caches()
                t0 = time.perf_counter()
                lowered = jax.jit(fn).lower(x)
                t1 = time.perf_counter()
                lowered.compile()
                t2 = time.perf_counter()
                row = best[key]
                row["trace"] = min(row["trace"], t1 - t0)
                row["compile"] = min(row["compile"], t2 - t1)
                row["total"] = min(row["total"], t2 - t0)
        for key, fn in fns.items():
            best[key]["kernels"] = count_kernels(fn, x)
    return best


def table(results: dict[tuple[str, str], dict]) -> str:
    """The results in Markdown, with each total's ratio to jaxopt's Anderson and to
    `optx.FixedPointIteration` (where measured)."""
    names = list(dict.fromkeys(name for name, _ in results))
    refs = [r for r in ("jaxopt.AndersonAcceleration", "optx.FixedPointIteration") if r in names]
    short = {"jaxopt.AndersonAcceleration": "jaxopt AA", "optx.FixedPointIteration": "optx FPI"}
    head = "| solver | pass | trace + lower [s] | XLA compile [s] | total [s] | kernels |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: |"
    for ref in refs:
        head += f" / {short[ref]} |"
        rule += " ---: |"
    lines = [head, rule]
    for name in names:
        for kind in ("forward", "gradient"):
            row = results[(name, kind)]
            line = (
                f"| {name} | {kind} | {row['trace']:.2f} | {row['compile']:.2f} "
                f"| {row['total']:.2f} | {row['kernels']} |"
            )
            for ref in refs:
                line += f" {row['total'] / results[(ref, kind)]['total']:.2f} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compile_time",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per entry (>= 1)")
    parser.add_argument(
        "--solvers", nargs="+", default=None, help=f"names (default: all of {list(solvers())})"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    unknown = sorted(set(args.solvers or ()) - set(solvers()))
    if unknown:
        parser.error(f"unknown solvers {unknown}; known: {list(solvers())}")
    print(table(measure(args.solvers, args.repeats)), end="")


if __name__ == "__main__":
    main()
