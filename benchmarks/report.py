"""Run the comparison and write a markdown report with plots.

    python -m benchmarks.report            # default grid, a few minutes on 2 CPU cores
    python -m benchmarks.report --full     # the bigger grid of the issue (long)
    python -m benchmarks.report --out DIR --problems 'hequation*' --solvers '*Anderson*'
    python -m benchmarks.report --costs    # and the fixed-cost tables of benchmarks.costs

Writes ``<out>/report.md`` (the tables: targets, then one per problem), ``<out>/
results.json`` (every measurement, with the residual traces) and ``<out>/plots/
<problem>.png`` (common residual against f evaluations, one curve per solver).
Needs ``pip install -e ".[bench]"``; torch/torchdeq are picked up when installed.
What is measured and how each library is counted: `benchmarks.harness` and
`benchmarks.peers`.

Exit status: 0 when target checks ran (the report and the last line say how many
failed); 1 when none could run (nothing was compared, which is not a success); 2 for
invalid options (``--tol`` must be in (0, 1), ``--budget`` >= 1, ``--threads`` >= 0,
``--out`` a directory or a path where one can be made) or when ``--problems`` or
``--solvers`` matches nothing in the grid (the error lists the names there are).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from pathlib import Path


def _number(kind, low, high=math.inf, *, low_open=False, high_open=False, what="a number"):
    """An argparse `type`: a finite `kind` (int or float) from `low` to `high`."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        ok = math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=(__doc__ or "").split("\n\n")[0]
    )
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument(
        "--full", action="store_true", help="run the full grid (problems and solver settings)"
    )
    grid.add_argument(
        "--smoke", action="store_true", help="run the tiny smoke grid (a quick check of the set-up)"
    )
    parser.add_argument("--out", default="reports", help="output directory (default: reports/)")
    parser.add_argument(
        "--problems", default="*", help="glob on problem names (default: all of the grid)"
    )
    parser.add_argument(
        "--solvers", default="*", help="glob on solver names (default: all of the grid)"
    )
    parser.add_argument(
        "--tol",
        type=_number(float, 0.0, 1.0, low_open=True, high_open=True, what="a number in (0, 1)"),
        default=None,
        help="common tolerance, a number in (0, 1) (default: harness.TOL)",
    )
    parser.add_argument(
        "--budget",
        type=_number(int, 1, what="an integer >= 1"),
        default=None,
        help="f-evaluation budget, >= 1 (default: harness.BUDGET)",
    )
    parser.add_argument(
        "--threads",
        type=_number(int, 0, what="an integer >= 0"),
        default=1,
        help="BLAS/OpenMP threads of NumPy/SciPy/torch (default 1, see harness.pin_threads; 0 leaves them alone)",
    )
    parser.add_argument(
        "--mnist-checkpoint",
        metavar="DIR",
        help="checkpoint directory of the trained MNIST DEQ (default: $FIXEDPOINT_MNIST_CHECKPOINT, "
        "else runs/mnist-full/ckpt, the default full run's, else runs/mnist/ckpt, which the "
        "README's main command writes); without one the "
        "mnist-deq-trained problems are listed as not run",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--costs",
        action="store_true",
        help="append the fixed-cost tables of benchmarks.costs (compile time and traced size, "
        "cost of a tiny solve, per-step cost of plain iteration: about 2 more minutes; "
        "their timings want an idle machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _parse(argv):
    parser = _parser()
    args = parser.parse_args(argv)
    # The nearest existing path of --out must be a directory (mkdir would fail later).
    out = Path(args.out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" (in the path {args.out!r})"
                parser.error(
                    f"argument --out: {str(path)!r}{where} is an existing file, not a "
                    "directory; name a directory (it is created if missing)"
                )
            break
    return args


def _no_match(option, pattern, what, example, grid, names, other_grids) -> str:
    """The error for a `--problems` / `--solvers` glob that matches nothing: the names
    of the grid, and the other grids where the glob does match."""
    message = (
        f"argument {option}: {pattern!r} matches no {what} of the {grid} grid (a glob on the "
        f"whole name, e.g. {example!r}); its {what}s are: {', '.join(names)}"
    )
    flags = {"smoke": "--smoke", "default": "neither --smoke nor --full", "full": "--full"}
    elsewhere = [f"the {g} grid ({flags[g]})" for g, hits in other_grids.items() if hits]
    if elsewhere:
        message += f". It matches in {' and '.join(elsewhere)}"
    return message


def _fmt(x, spec="{:.3g}", none="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return spec.format(x)


def _versions() -> str:
    out = []
    for dist in ("jax", "optimistix", "lineax", "jaxopt", "scipy", "numpy", "torch", "torchdeq"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


# ----------------------------------------------------------------------------------
# Target checks.


def _targets(results, adapters, problems_by_name):
    """Rows of the target table: for each problem, each of our Anderson/Broyden
    settings against the peers of the same method and history (in differences)."""
    by_key = {(r.problem, r.solver): r for r in results}
    ours = [
        a for a in adapters if a.library == "fixedpoint" and a.method in ("anderson", "broyden")
    ]
    ours = [
        a
        for a in ours
        if a.kwargs.get("beta", 1.0) == 1.0 and not a.kwargs.get("line_search", False)
    ]
    rows = []
    for pname in problems_by_name:
        for a in ours:
            mine = by_key.get((pname, a.name))
            if mine is None or mine.status == "skipped":
                continue
            peer_libs = (
                ("jaxopt", "scipy", "torchdeq") if a.method == "anderson" else ("scipy", "torchdeq")
            )
            for b in adapters:
                if (
                    b.library not in peer_libs
                    or b.method != a.method
                    or b.differences != a.differences
                ):
                    continue
                if getattr(b, "kwargs", {}):
                    continue  # the targets are against the peers' default settings
                theirs = by_key.get((pname, b.name))
                if theirs is None or theirs.status == "skipped":
                    continue
                rows.append(_target_row(pname, mine, theirs, time_too=(b.library == "jaxopt")))
    return rows


def _target_row(pname, mine, theirs, time_too):
    me, them = mine.evals_to_tol, theirs.evals_to_tol
    if me is None and them is None:
        evals_ok = None  # neither reaches the tolerance: the target does not apply
    elif me is None:
        evals_ok = False
    else:
        evals_ok = them is None or me <= them
    time_ok = None  # time to solution: only defined when both reach tol
    if (
        time_too
        and mine.success
        and theirs.success
        and mine.wall_s is not None
        and theirs.wall_s is not None
    ):
        time_ok = mine.wall_s <= theirs.wall_s
    return dict(
        problem=pname,
        ours=mine.solver,
        peer=theirs.solver,
        time_checked=time_too,
        ours_evals=me,
        peer_evals=them,
        evals_ok=evals_ok,
        ours_ms=None if mine.wall_s is None else 1e3 * mine.wall_s,
        peer_ms=None if theirs.wall_s is None else 1e3 * theirs.wall_s,
        time_ok=time_ok,
    )


_NOTHING_CHECKED = (
    "no pair of our Anderson/Broyden and a peer of the same method and history both ran on a "
    "problem with a result to compare (select more problems or solvers, or raise --budget)."
)


def _count_checks(targets):
    """``(failed, checked)`` target checks (a check that does not apply is not counted)."""
    failed = sum(t["evals_ok"] is False for t in targets) + sum(
        t["time_ok"] is False for t in targets
    )
    checked = sum(t["evals_ok"] is not None for t in targets) + sum(
        t["time_ok"] is not None for t in targets
    )
    return failed, checked


def _mark(ok):
    return "n/a" if ok is None else ("✓" if ok else "✗ **LOSS**")


# ----------------------------------------------------------------------------------
# Writing.


def _write_markdown(path, results, problems_list, adapters, targets, meta):
    lines = [
        "# fixedpoint benchmark report",
        "",
        f"- Date: {meta['date']}; grid: `{meta['grid']}`; total run time {meta['runtime_s']:.0f} s.",
        f"- Machine: {meta['machine']}.",
        f"- Versions: {meta['versions']}.",
        f"- Peers: {meta['peers']}.",
        f"- BLAS/OpenMP threads of NumPy/SciPy/torch: {meta['threads']}.",
        f"- **Common tolerance** `tol = {meta['tol']:g}` and **budget** {meta['budget']} f evaluations, "
        "the same for every solver.",
        "- **Common residual** (one definition for all, recomputed with NumPy on each solver's returned point): "
        "`||F(z)||_2 / ||F(z0)||_2` with `F(z) = f(z) - z` (fixed-point problems) or `F = g` (root problems); "
        "for a batch, the worst state: `max_b ||F(z_b)||_2 / max_b ||F(z0_b)||_2`.",
        "- **success**: final residual <= tol. **f evals to tol**: evaluations until an evaluated point first "
        "met tol (from each solver's evaluation trace; batch: until every state had). **f evals used**: "
        "evaluations made under the solver's own stopping rule (set to the common criterion where possible). "
        "**J**: dense Jacobians formed (each costs n JVPs). **compile**: JAX only, shared by the problems "
        "of one family and size. **warm wall**: best of a few runs after a warm-up, without tracing. "
        "How each library is stopped, traced and counted: `benchmarks/peers/`.",
        "- Anderson histories are matched in differences: our `m` = SciPy `M` = jaxopt `history_size - 1` "
        "= torchdeq `m - 1`; mixing `beta = 1` and initial inverse Jacobian `-I` everywhere.",
        "",
        "## Targets",
        "",
        "Our Anderson needs no more f evaluations than jaxopt's AndersonAcceleration, SciPy's anderson and "
        "torchdeq's anderson (same history, same tolerance), and its warm wall time is no worse than "
        "jaxopt's; our Broyden needs no more f evaluations than SciPy's broyden1 and torchdeq's broyden. "
        "`–` = did not reach tol within the budget; n/a = neither did (f evals) or not both did (time).",
        "",
        "| problem | ours | peer | ours f evals | peer f evals | evals | ours wall [ms] | peer wall [ms] | time |",
        "|---|---|---|---:|---:|:---:|---:|---:|:---:|",
    ]
    for t in targets:
        lines.append(
            f"| {t['problem']} | {t['ours']} | {t['peer']} | {_fmt(t['ours_evals'], '{}')} | "
            f"{_fmt(t['peer_evals'], '{}')} | {_mark(t['evals_ok'])} | {_fmt(t['ours_ms'], '{:.3g}')} | "
            f"{_fmt(t['peer_ms'], '{:.3g}')} | {_mark(t['time_ok']) if t['time_checked'] else ''} |"
        )
    n_fail, n_checked = _count_checks(targets)
    if n_checked:
        lines += ["", f"Target checks failed: **{n_fail}** of {n_checked}.", ""]
    else:
        lines += ["", f"**No target was checked**: {_NOTHING_CHECKED}", ""]

    losses = _losses(results, adapters)
    lines += [
        "## Where our solvers lose",
        "",
        "Against every peer of the same method and history (not only the targets): more f evaluations "
        "to tol, or a longer warm wall time when both succeed.",
        "",
    ]
    if losses:
        lines += [f"- {x}" for x in losses]
    else:
        lines.append(
            "- Nowhere: each of our methods needs no more f evaluations and no more time than every peer of the same method and history."
        )
    lines.append("")

    lines += ["## Results by problem", ""]
    if meta.get("unavailable"):
        lines += ["Problems not run (their inputs are not on this machine):", ""]
        lines += [f"- **{name}**: {why}" for name, why in meta["unavailable"].items()]
        lines.append("")
    by_problem = {}
    for r in results:
        by_problem.setdefault(r.problem, []).append(r)
    for p in problems_list:
        lines += [
            f"### {p.name}",
            "",
            f"{p.description}. *Source:* {p.source}. *Solution:* {p.solution}.",
            "",
            f"![{p.name}](plots/{p.name}.png)" if meta["plots"] else "",
            "",
            "| solver | success | f evals to tol | f evals used | J | final residual | compile [s] | warm wall [ms] | wall / f eval [µs] | note |",
            "|---|:---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in by_problem.get(p.name, []):
            if r.status == "skipped":
                lines.append(f"| {r.solver} | skipped | | | | | | | | {r.note} |")
                continue
            if r.status == "error":
                lines.append(f"| {r.solver} | error | | | | | | | | {r.note} |")
                continue
            lines.append(
                f"| {r.solver} | {'✓' if r.success else '✗'} | {_fmt(r.evals_to_tol, '{}')} | "
                f"{_fmt(r.evals_used, '{}')} | {r.jacobians or ''} | {_fmt(r.final_residual, '{:.1e}')} | "
                f"{_fmt(r.compile_s, '{:.2f}')} | {_fmt(None if r.wall_s is None else 1e3 * r.wall_s, '{:.3g}')} | "
                f"{_fmt(None if not (r.wall_s and r.evals_used) else 1e6 * r.wall_s / r.evals_used, '{:.3g}')} | {r.note} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def _losses(results, adapters):
    """Every (problem, our solver, peer) of the same method and history (Anderson
    differences / Broyden memory; none for Picard) where ours needs more f
    evaluations to tol, fails where the peer succeeds, or is slower (warm wall time,
    both successful)."""
    history = {a.name: a.differences for a in adapters}
    out = []
    by_problem = {}
    for r in results:
        by_problem.setdefault(r.problem, []).append(r)
    for pname, rs in by_problem.items():
        for mine in rs:
            if mine.library != "fixedpoint" or mine.status != "ok":
                continue
            for theirs in rs:
                if (
                    theirs.library == "fixedpoint"
                    or theirs.status != "ok"
                    or theirs.method != mine.method
                ):
                    continue
                if history.get(theirs.solver) != history.get(mine.solver):
                    continue
                if theirs.evals_to_tol is not None and (
                    mine.evals_to_tol is None or mine.evals_to_tol > theirs.evals_to_tol
                ):
                    out.append(
                        f"{pname}: **f evals** {mine.solver} "
                        f"{_fmt(mine.evals_to_tol, '{}', 'more than the budget')} vs {theirs.solver} "
                        f"{theirs.evals_to_tol}."
                    )
                if (
                    mine.success
                    and theirs.success
                    and mine.wall_s is not None
                    and theirs.wall_s is not None
                    and mine.wall_s > theirs.wall_s
                ):
                    out.append(
                        f"{pname}: **wall time** {mine.solver} {1e3 * mine.wall_s:.3g} ms "
                        f"({_fmt(mine.evals_to_tol, '{}')} f evals) vs {theirs.solver} "
                        f"{1e3 * theirs.wall_s:.3g} ms ({_fmt(theirs.evals_to_tol, '{}')} f evals)."
                    )
    return out


def _plot(path, problem, results, tol):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "fixedpoint": "-",
        "optimistix": "--",
        "jaxopt": "-.",
        "scipy": ":",
        "torchdeq": (0, (3, 1, 1, 1, 1, 1)),
    }
    fig, ax = plt.subplots(figsize=(11, 5.5))
    lowest = tol
    for r in results:
        if r.curve is None or len(r.curve) == 0:
            continue
        x = range(1, len(r.curve) + 1)
        lw = 2.2 if r.library == "fixedpoint" else 1.3
        ax.semilogy(x, r.curve, linestyle=styles.get(r.library, "-"), linewidth=lw, label=r.solver)
        finite = r.curve[(r.curve > 0) & (r.curve < float("inf"))]
        if finite.size:
            lowest = min(lowest, float(finite.min()))
    ax.axhline(tol, color="k", linewidth=0.8, alpha=0.6)
    # Diverging peers would stretch the axis over hundreds of decades: clip at 1e3.
    ax.set_ylim(max(lowest, 1e-17) / 3, 1e3)
    ax.set_xlabel("f evaluations")
    ax.set_ylabel("||F(z)||_2 / ||F(z0)||_2" + (" (worst state)" if problem.batched else ""))
    ax.set_title(problem.name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------


def _next_signature(specs, spec):
    """The signature of the problem after `spec` (None: last, or not available)."""
    from . import problems

    if spec is specs[-1]:
        return None
    try:
        return specs[specs.index(spec) + 1].make().signature()
    except problems.Unavailable:
        return None


def main(argv=None) -> int:
    args = _parse(argv)
    t_start = time.perf_counter()

    from . import harness

    if args.threads > 0:
        harness.pin_threads(args.threads)
    if args.mnist_checkpoint:
        from .problems import ENV_MNIST_CHECKPOINT

        os.environ[ENV_MNIST_CHECKPOINT] = os.path.abspath(args.mnist_checkpoint)

    import jax

    with jax.enable_x64(True):  # float64 throughout, without changing the global default
        return _run(args, t_start)


def _run(args, t_start) -> int:
    import jax
    from tqdm import tqdm

    from . import harness, peers, problems

    grid = "full" if args.full else ("smoke" if args.smoke else "default")
    tol = args.tol if args.tol is not None else harness.TOL
    budget = args.budget if args.budget is not None else harness.BUDGET
    specs = [s for s in problems.specs(grid) if fnmatch.fnmatchcase(s.name, args.problems)]
    cache = peers.CompileCache()
    adapters = [
        a for a in peers.solvers(grid, cache=cache) if fnmatch.fnmatchcase(a.name, args.solvers)
    ]
    others = [g for g in problems.GRIDS if g != grid]
    errors = []
    if not specs:
        errors.append(
            _no_match(
                "--problems",
                args.problems,
                "problem",
                "linear-*",
                grid,
                [s.name for s in problems.specs(grid)],
                {
                    g: [s for s in problems.specs(g) if fnmatch.fnmatchcase(s.name, args.problems)]
                    for g in others
                },
            )
        )
    if not adapters:
        errors.append(
            _no_match(
                "--solvers",
                args.solvers,
                "solver",
                "*Anderson*",
                grid,
                [a.name for a in peers.solvers(grid, cache=cache)],
                {
                    g: [a for a in peers.solvers(g) if fnmatch.fnmatchcase(a.name, args.solvers)]
                    for g in others
                },
            )
        )
    if errors:
        _parser().error("\n".join(errors))

    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    availability = peers.availability()
    print("peers: " + "; ".join(f"{k} {v}" for k, v in availability.items()))

    results, problems_list = [], []
    bar = tqdm(
        total=len(specs) * len(adapters), unit="solve", dynamic_ncols=True, disable=args.quiet
    )
    unavailable = {}
    for spec in specs:
        bar.set_description(f"building {spec.name}")
        try:
            problem = spec.make()
        except problems.Unavailable as e:
            unavailable[spec.name] = str(e)
            bar.write(f"skipped {spec.name}: {e}")
            bar.update(len(adapters))
            continue
        problems_list.append(problem)
        mine = []
        for adapter in adapters:
            bar.set_description(f"{spec.name} | {adapter.name}")
            r = harness.evaluate(problem, adapter, tol=tol, budget=budget)
            mine.append(r)
            bar.set_postfix_str(
                f"evals={_fmt(r.evals_to_tol, '{}')} res={_fmt(r.final_residual, '{:.0e}')}"
                if r.status == "ok"
                else r.status
            )
            bar.update()
        results += mine
        if not args.no_plots:
            _plot(out / "plots" / f"{problem.name}.png", problem, mine, tol)
        # Free the compiled solvers of a family once its last problem is done.
        if _next_signature(specs, spec) != problem.signature():
            cache.clear()
    bar.close()

    targets = _targets(results, adapters, {p.name: p for p in problems_list})
    runtime = time.perf_counter() - t_start
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        grid=grid,
        runtime_s=runtime,
        machine=f"{platform.platform()}, {os.cpu_count()} CPU cores, JAX backend {jax.default_backend()}",
        versions=_versions(),
        peers="; ".join(f"{k}: {v}" for k, v in availability.items()),
        threads=args.threads if args.threads > 0 else "library defaults",
        tol=tol,
        budget=budget,
        plots=not args.no_plots,
        unavailable=unavailable,
    )
    _write_markdown(out / "report.md", results, problems_list, adapters, targets, meta)
    if args.costs:
        from . import costs

        with (out / "report.md").open("a") as f:
            f.write("\n# Fixed costs (`python -m benchmarks.costs`)\n\n" + costs.tables())
    payload = dict(
        meta=meta,
        targets=targets,
        results=[
            dict(
                r.row(),
                curve=None
                if r.curve is None
                else [None if not math.isfinite(v) else v for v in r.curve.tolist()],
            )
            for r in results
        ],
    )
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    n_fail, n_checked = _count_checks(targets)
    print(f"wrote {out / 'report.md'} ({len(results)} results) in {runtime:.0f} s")
    if not n_checked:
        print(f"error: no target was checked: {_NOTHING_CHECKED}", file=sys.stderr)
        return 1
    print(f"target checks: {n_fail} failed of {n_checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
