r"""The 23 standard nonlinear systems (`benchmarks.problems.mgh`) with every root finder.

    python -m benchmarks.nonlinear [--solvers NAME ...] [--problems NAME ...] [--out FILE]

Protocol (float64): each problem from its standard starting point, each solver with
tolerances ``rtol = atol = 1e-10`` (or its library's equivalent) and at most 10,000
steps (iterations). A problem counts as solved when ``max|g(y)| <= 1e-6`` at the
returned point, recomputed in float64 from that point whatever the solver reports.

Evaluations count evaluations of ``g`` plus Jacobian-vector products:

- ours (``fp.*``): ``stats["num_steps"]`` (one evaluation per step) plus
  ``stats["num_jvps"]`` where a solver reports it;
- optimistix Newton, Dogleg and LevenbergMarquardt form a dense Jacobian by
  forward-mode AD at each step: counted as ``num_steps * (1 + n)`` (one evaluation and
  ``n`` Jacobian-vector products per step);
- SciPy ``optimize.root``: calls of ``g``, counted by a wrapper, so MINPACK's
  finite-difference Jacobian columns (hybr, lm) and the finite-difference
  Jacobian-vector products of krylov count as evaluations.

The table has one row per problem and one column per solver (evaluations, or ``x``
when unsolved), then the solved counts, then each solver's total evaluations over the
problems solved by both it and SciPy's hybr (with how many there are).

Our solvers are `OUR_SOLVERS` (name -> factory of the solver at given tolerances) plus
any other concrete root finder that `fixedpoint` exports, found by `our_solvers`.
"""

import argparse
import dataclasses
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

import fixedpoint as fp

from .problems.mgh import MGH_PROBLEMS, MGHProblem, numpy_fn


TOL = 1e-10  # solver tolerances (rtol = atol)
MAX_STEPS = 10_000
SOLVED = 1e-6  # max|g(y)| at the returned point
REFERENCE = "scipy.hybr"  # the totals compare over the problems this one solves

SolverFactory = Callable[[float, float], optx.AbstractRootFinder | optx.AbstractLeastSquaresSolver]

# Ours, in the table's order: name -> factory(rtol, atol). Extend it here; other root
# finders that `fixedpoint` exports are added by `our_solvers` with their defaults.
OUR_SOLVERS: dict[str, SolverFactory] = {
    "fp.Anderson": lambda rtol, atol: fp.Anderson(rtol=rtol, atol=atol),
    "fp.Broyden": lambda rtol, atol: fp.Broyden(rtol=rtol, atol=atol),
    "fp.Neumann": lambda rtol, atol: fp.Neumann(rtol=rtol, atol=atol),
    "fp.NewtonKrylov": lambda rtol, atol: fp.NewtonKrylov(rtol=rtol, atol=atol),
    "fp.Polyalgorithm": lambda rtol, atol: fp.Polyalgorithm(rtol=rtol, atol=atol),
    "fp.Broyden(jacobian='exact')": lambda rtol, atol: fp.Broyden(
        rtol=rtol, atol=atol, jacobian="exact"
    ),
}

OPTX_SOLVERS: dict[str, SolverFactory] = {
    "optx.Newton": lambda rtol, atol: optx.Newton(rtol=rtol, atol=atol),
    "optx.Dogleg": lambda rtol, atol: optx.Dogleg(rtol=rtol, atol=atol),
    "optx.LevenbergMarquardt": lambda rtol, atol: optx.LevenbergMarquardt(rtol=rtol, atol=atol),
}

SCIPY_METHODS = ("hybr", "lm", "df-sane", "krylov", "broyden1", "anderson")


def our_solvers() -> dict[str, SolverFactory]:
    """`OUR_SOLVERS`, then every other concrete `optx.AbstractRootFinder` subclass that
    `fixedpoint` exports (built as ``cls(rtol=rtol, atol=atol)``), by name."""
    out = dict(OUR_SOLVERS)
    for attr in sorted(dir(fp)):
        obj = getattr(fp, attr)
        name = f"fp.{attr}"
        if (
            name in out
            or attr.startswith(("_", "Abstract"))
            or not inspect.isclass(obj)
            or not issubclass(obj, optx.AbstractRootFinder)
            or inspect.isabstract(obj)
        ):
            continue
        out[name] = lambda rtol, atol, cls=obj: cls(rtol=rtol, atol=atol)  # pyright: ignore[reportCallIssue]
    return out


@dataclasses.dataclass(frozen=True)
class Cell:
    """One solve: `evaluations` (None if the solver raised), `residual` (max|g| at the
    returned point, inf if none or not finite), `solved` (residual <= `SOLVED`),
    `seconds` (wall time of the call, compilation included) and `error` (the
    exception's message, if one was raised)."""

    evaluations: int | None
    residual: float
    solved: bool
    seconds: float
    error: str = ""


def _cell(problem: MGHProblem, y, evaluations: int | None, seconds: float) -> Cell:
    residual = math.inf if y is None else problem.residual(y)
    return Cell(evaluations, residual, residual <= SOLVED, seconds)


def jax_solve(
    problem: MGHProblem,
    solver: optx.AbstractRootFinder | optx.AbstractLeastSquaresSolver,
    max_steps: int = MAX_STEPS,
) -> Callable[[], optx.Solution]:
    """``() -> optx.Solution``: `optx.root_find` of `problem` from its `y0` with
    `solver` (``throw=False``), compiled on its first call (one compilation)."""

    def fn(y, args):
        return problem.fn(y)

    @eqx.filter_jit
    def solve(solver, y0):
        return optx.root_find(fn, solver, y0, max_steps=max_steps, throw=False)

    y0 = jnp.asarray(problem.y0)
    return lambda: solve(solver, y0)


def our_evaluations(sol: optx.Solution) -> int:
    """Evaluations of one of our solves: ``num_steps`` + ``num_jvps`` (if reported)."""
    return int(sol.stats["num_steps"]) + int(sol.stats.get("num_jvps", 0))


def optx_evaluations(sol: optx.Solution, n: int) -> int:
    """Evaluations of an optimistix solve with a dense AD Jacobian per step:
    ``num_steps * (1 + n)``."""
    return int(sol.stats["num_steps"]) * (1 + n)


def run_ours(problem: MGHProblem, factory: SolverFactory) -> Cell:
    """One of our solvers (see `our_evaluations`)."""
    start = time.perf_counter()
    sol = jax_solve(problem, factory(TOL, TOL))()
    y = np.asarray(sol.value)
    return _cell(problem, y, our_evaluations(sol), time.perf_counter() - start)


def run_optx(problem: MGHProblem, factory: SolverFactory) -> Cell:
    """An optimistix solver (see `optx_evaluations`)."""
    start = time.perf_counter()
    sol = jax_solve(problem, factory(TOL, TOL))()
    y = np.asarray(sol.value)
    return _cell(problem, y, optx_evaluations(sol, problem.n), time.perf_counter() - start)


def scipy_options(method: str, n: int) -> dict:
    """`scipy.optimize.root` options of `method` for `TOL` and `MAX_STEPS`."""
    if method == "hybr":  # MINPACK hybrd: relative step tolerance
        return dict(xtol=TOL, maxfev=MAX_STEPS * (n + 1))
    if method == "lm":  # MINPACK lmdif
        return dict(xtol=TOL, ftol=TOL, maxiter=MAX_STEPS * (n + 1))
    if method == "df-sane":  # ||g|| <= fatol + ftol ||g(y0)||
        return dict(fatol=TOL, ftol=TOL, maxfev=MAX_STEPS)
    # scipy.optimize.nonlin: max|g| <= fatol
    return dict(fatol=TOL, maxiter=MAX_STEPS)


def scipy_solve(
    problem: MGHProblem, method: str, fn: Callable | None = None
) -> Callable[[], tuple[np.ndarray, int]]:
    """``() -> (y, evaluations)``: `scipy.optimize.root` of `problem` with `method`
    (`scipy_options`), counting the calls of ``g``. `fn` is ``numpy_fn(problem)`` by
    default (compiled on its first call); call inside ``jax.enable_x64(True)``."""
    from scipy import optimize

    fn = numpy_fn(problem) if fn is None else fn
    options = scipy_options(method, problem.n)

    def solve():
        calls = [0]

        def counted(y):
            calls[0] += 1
            return fn(y)

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = optimize.root(counted, problem.y0.copy(), method=method, options=options)
        return np.asarray(res.x), calls[0]

    return solve


def run_scipy(problem: MGHProblem, method: str) -> Cell:
    """`scipy.optimize.root` with `method`: evaluations = calls of ``g``."""
    start = time.perf_counter()
    y, evaluations = scipy_solve(problem, method)()
    return _cell(problem, y, evaluations, time.perf_counter() - start)


def solvers(names: Sequence[str] | None = None) -> dict[str, Callable[[MGHProblem], Cell]]:
    """Every solver of the table (name -> ``problem -> Cell``), or those in `names`."""
    out: dict[str, Callable[[MGHProblem], Cell]] = {}
    for name, factory in our_solvers().items():
        out[name] = lambda p, f=factory: run_ours(p, f)
    for name, factory in OPTX_SOLVERS.items():
        out[name] = lambda p, f=factory: run_optx(p, f)
    for method in SCIPY_METHODS:
        out[f"scipy.{method}"] = lambda p, m=method: run_scipy(p, m)
    if names is None:
        return out
    unknown = [n for n in names if n not in out]
    if unknown:
        raise ValueError(f"unknown solvers {unknown}; known: {list(out)}")
    return {n: out[n] for n in names}


def run(
    solver_names: Sequence[str] | None = None,
    problems: Sequence[MGHProblem] = MGH_PROBLEMS,
    log=None,
) -> dict[str, dict[str, Cell]]:
    """Every problem with every solver, in float64: ``{solver: {problem name: Cell}}``.
    An exception in one solve is caught and counts as unsolved."""
    table: dict[str, dict[str, Cell]] = {}
    with jax.enable_x64(True):
        for name, solve in solvers(solver_names).items():
            column = table[name] = {}
            start = time.perf_counter()
            for problem in problems:
                t0 = time.perf_counter()
                try:
                    column[problem.name] = solve(problem)
                except Exception as e:  # noqa: BLE001 (a failed solve is a result)
                    message = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    column[problem.name] = Cell(
                        None, math.inf, False, time.perf_counter() - t0, message
                    )
            if log is not None:
                solved = sum(c.solved for c in column.values())
                print(
                    f"{name}: {solved}/{len(problems)} solved in "
                    f"{time.perf_counter() - start:.1f} s",
                    file=log,
                    flush=True,
                )
    return table


def markdown(
    table: dict[str, dict[str, Cell]], problems: Sequence[MGHProblem] = MGH_PROBLEMS
) -> str:
    """The table: evaluations per problem and solver (``x`` unsolved), the solved
    counts, and the totals over the problems that the solver and `REFERENCE` both
    solve (``total (k)`` over ``k`` problems; omitted without the reference)."""
    names = list(table)
    lines = [
        "| problem | n | " + " | ".join(names) + " |",
        "|---|--:|" + "--:|" * len(names),
    ]
    for p in problems:
        cells = [
            str(table[s][p.name].evaluations) if table[s][p.name].solved else "x" for s in names
        ]
        lines.append(f"| {p.number}. {p.title} | {p.n} | " + " | ".join(cells) + " |")
    counts = [str(sum(table[s][p.name].solved for p in problems)) for s in names]
    lines.append(f"| **solved (of {len(problems)})** | | " + " | ".join(counts) + " |")
    if REFERENCE in table:
        totals = []
        for s in names:
            both = [
                p for p in problems if table[s][p.name].solved and table[REFERENCE][p.name].solved
            ]
            total = sum(table[s][p.name].evaluations or 0 for p in both)
            totals.append(f"{total} ({len(both)})")
        lines.append(
            f"| **evaluations where {REFERENCE} also solves (problems)** | | "
            + " | ".join(totals)
            + " |"
        )
    return "\n".join(lines) + "\n"


def failures(table: dict[str, dict[str, Cell]]) -> dict[str, list[str]]:
    """The problems each solver leaves unsolved, by name."""
    return {s: [p for p, c in column.items() if not c.solved] for s, column in table.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.nonlinear", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--solvers", nargs="+", help="solver names (default: all)")
    parser.add_argument("--problems", nargs="+", help="problem names (default: all 23)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    problems = MGH_PROBLEMS
    if args.problems:
        known = {p.name: p for p in MGH_PROBLEMS}
        unknown = [n for n in args.problems if n not in known]
        if unknown:
            parser.error(f"unknown problems {unknown}; known: {list(known)}")
        problems = tuple(known[n] for n in args.problems)
    try:
        names = solvers(args.solvers)
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    table = run(list(names), problems, log=sys.stderr)
    text = markdown(table, problems)
    print(text)
    for name, failed in failures(table).items():
        errors = [f"{p} ({table[name][p].error})" for p in failed if table[name][p].error]
        print(
            f"{name} fails: {', '.join(failed) or '-'}" + (f"; raised: {errors}" if errors else "")
        )
    print(f"\n{time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
