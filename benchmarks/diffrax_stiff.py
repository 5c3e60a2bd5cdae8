r"""Our root finders as the implicit-stage solver of diffrax's Kvaerno5, on two stiff ODEs.

    python -m benchmarks.diffrax_stiff [--problems NAME ...] [--solvers NAME ...]
                                       [--max-steps N] [--repeats R]

Protocol (float64, needs ``pip install diffrax``): ``diffrax.Kvaerno5`` with a
``PIDController(rtol=1e-8, atol=1e-10)`` (its default norm, ``optx.rms_norm``),
``dt0 = 1e-4``, at most ``--max-steps`` (default 100,000) steps, ``throw=False``, on

- ``robertson``: Robertson's chemical kinetics, :math:`y_1' = -0.04 y_1 + 10^4 y_2
  y_3`, :math:`y_3' = 3\cdot 10^7 y_2^2`, :math:`y_2' = -y_1' - y_3'`, from
  :math:`y(0) = (1, 0, 0)` to :math:`t = 10^4`;
- ``vdp``: Van der Pol's oscillator :math:`y_1' = y_2`, :math:`y_2' = \mu (1 - y_1^2)
  y_2 - y_1` with :math:`\mu = 1000`, from :math:`y(0) = (2, 0)` to :math:`t = 3000`
  (a little under two periods of about :math:`1614`).

Each root finder is Kvaerno5's ``root_finder``: diffrax's default ``VeryChord`` and our
solvers, which take the controller's ``rtol``, ``atol`` and ``norm`` through
``diffrax.with_stepsize_controller_tols`` (the polyalgorithm is given them directly, see
`SOLVERS`). The table gives the steps diffrax took (accepted + rejected), their ratio to
VeryChord's, the wall time of a compiled solve (the best of ``--repeats``), and the
largest relative difference of the final state from VeryChord's (componentwise, with
``1e-12`` added to the denominator).
"""

import argparse
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optimistix as optx

import fixedpoint as fp


RTOL, ATOL = 1e-8, 1e-10
DT0 = 1e-4


def robertson(t, y, args):
    del t, args
    y1, y2, y3 = y[0], y[1], y[2]
    d1 = -0.04 * y1 + 1e4 * y2 * y3
    d3 = 3e7 * y2**2
    return jnp.stack([d1, -d1 - d3, d3])


def van_der_pol(t, y, args):
    del t, args
    mu = 1e3
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


# name -> (vector field, y0, t0, t1)
PROBLEMS: dict[str, tuple[Callable, tuple[float, ...], float, float]] = {
    "robertson": (robertson, (1.0, 0.0, 0.0), 0.0, 1e4),
    "vdp": (van_der_pol, (2.0, 0.0), 0.0, 3000.0),
}


def _with_tols(cls, **kwargs) -> optx.AbstractRootFinder:
    import diffrax

    return diffrax.with_stepsize_controller_tols(cls)(**kwargs)


# name -> (factory of Kvaerno5's root finder (None: diffrax's default), Kvaerno5 options)
SOLVERS: dict[str, tuple[Callable[[], optx.AbstractRootFinder] | None, dict]] = {
    "VeryChord (diffrax default)": (None, {}),
    "NewtonKrylov()": (lambda: _with_tols(fp.NewtonKrylov), {}),
    "NewtonKrylov(eta_max=0.9)": (lambda: _with_tols(fp.NewtonKrylov, eta_max=0.9), {}),
    "NewtonKrylov(eta_max=0)": (lambda: _with_tols(fp.NewtonKrylov, eta_max=0.0), {}),
    "Polyalgorithm()": (lambda: _with_tols(fp.Polyalgorithm), {}),
    "Polyalgorithm(stall_steps=2)": (lambda: _with_tols(fp.Polyalgorithm, stall_steps=2), {}),
    "Broyden()": (lambda: _with_tols(fp.Broyden), {}),
    "Anderson()": (lambda: _with_tols(fp.Anderson), {}),
    "Anderson(), root_find_max_steps=20": (
        lambda: _with_tols(fp.Anderson),
        {"root_find_max_steps": 20},
    ),
}


def make_solve(problem: str, solver: str, max_steps: int = 100_000):
    """A jitted ``() -> diffrax.Solution`` of `problem` with Kvaerno5 and `solver`."""
    import diffrax

    vector_field, y0, t0, t1 = PROBLEMS[problem]
    factory, options = SOLVERS[solver]
    kvaerno = (
        diffrax.Kvaerno5(**options)
        if factory is None
        else diffrax.Kvaerno5(root_finder=factory(), **options)
    )
    y0 = jnp.asarray(y0, jnp.float64)

    @jax.jit
    def solve(y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            kvaerno,
            t0,
            t1,
            DT0,
            y0,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=max_steps,
            throw=False,
        )

    return lambda: solve(y0)


def measure(problem: str, solver: str, max_steps: int = 100_000, repeats: int = 3) -> dict:
    """Steps, wall time (compiled, best of `repeats`), final state and status."""
    import diffrax

    solve = make_solve(problem, solver, max_steps)
    sol = jax.block_until_ready(solve())  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sol = jax.block_until_ready(solve())
        best = min(best, time.perf_counter() - start)
    assert sol.ys is not None
    return {
        "num_steps": int(sol.stats["num_steps"]),
        "num_accepted_steps": int(sol.stats["num_accepted_steps"]),
        "num_rejected_steps": int(sol.stats["num_rejected_steps"]),
        "time": best,
        "y1": jnp.asarray(sol.ys[-1]),
        "successful": bool(sol.result == diffrax.RESULTS.successful),
    }


def relative_difference(y: jax.Array, ref: jax.Array) -> float:
    return float(jnp.max(jnp.abs(y - ref) / (jnp.abs(ref) + 1e-12)))


def table(results: dict[str, dict[str, dict]], max_steps: int) -> str:
    reference = "VeryChord (diffrax default)"
    lines = [
        "| problem | root finder | steps | accepted | rejected | steps / VeryChord "
        "| time (s) | final state vs VeryChord |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for problem, rows in results.items():
        ref = rows.get(reference)
        for solver, r in rows.items():
            ratio = f"{r['num_steps'] / ref['num_steps']:.2f}" if ref else "-"
            if not r["successful"]:
                agree = f"failed (step limit {max_steps:,})"
            elif ref and ref["successful"]:
                agree = f"{relative_difference(r['y1'], ref['y1']):.1e}"
            else:
                agree = "-"
            lines.append(
                f"| {problem} | {solver} | {r['num_steps']:,} | {r['num_accepted_steps']:,} "
                f"| {r['num_rejected_steps']:,} | {ratio} | {r['time']:.3f} | {agree} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Our root finders in diffrax's Kvaerno5 on two stiff ODEs."
    )
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    try:
        import diffrax
    except ImportError:
        print("diffrax is not installed: pip install diffrax", file=sys.stderr)
        return 1
    print(
        f"diffrax {diffrax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}; "
        f"Kvaerno5, PIDController(rtol={RTOL:g}, atol={ATOL:g}), dt0={DT0:g}; "
        f"NewtonKrylov's default eta_max={fp.NewtonKrylov().eta_max:g}",
        file=sys.stderr,
    )
    results: dict[str, dict[str, dict]] = {}
    for problem in args.problems:
        results[problem] = {}
        for solver in args.solvers:
            results[problem][solver] = r = measure(problem, solver, args.max_steps, args.repeats)
            print(
                f"{problem:10} {solver:38} {r['num_steps']:7d} steps  {r['time']:.3f}s",
                file=sys.stderr,
                flush=True,
            )
    print(table(results, args.max_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
