"""The figures the solver and implicit-differentiation targets ask for, measured in one
run: `python -m benchmarks.figures [--quick]`.

1. f evaluations to rtol 1e-8 (float64) on the tanh cell z = tanh(W z + x), n = 1,000,
   ||W||_2 = 0.95, for Neumann, Anderson (m = 5), Broyden, scipy's `anderson` (M = 5)
   and `broyden1`. Two W: Gaussian (eigenvalues fill a disk of radius ~0.48) and
   symmetric (real spectrum in [-0.95, 0.95]); two input scales, x ~ N(0, 1) (tanh
   saturates, so the map contracts faster) and x ~ 0.1 N(0, 1) (nearly linear).
   Common residual for all: ||f(z) - z||_inf <= 1e-8 -- our solvers use atol = 1e-8,
   rtol = 0 with the max norm; scipy gets f_tol = 1e-8 on ||F||_inf; every returned z
   is re-checked.
2. Per-step overhead beyond the f evaluation at n = 10,000 (float32), as a fraction of
   one f evaluation: (time of k solver steps - time of k f evaluations) / time of k f
   evaluations, each a compiled loop, median of repeats.
3. Gradient cost on the n = 1,000 tanh cell in float32 at rtol 1e-5: time of the
   backward part of a gradient / time of the forward solve, for each backward solver
   and dense LU (how each is timed: `gradient_cost`).
4. Peak temporary memory (XLA's compiled memory analysis) of one gradient with the
   implicit adjoint vs unrolled differentiation at 10, 100 and 1,000 iterations.
"""

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

import fixedpoint as fp


def _tanh_problem(n, radius, symmetric, dtype, seed=0, x_scale=1.0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(k1, (n, n), dtype)
    if symmetric:
        w = (w + w.T) / 2
    w = radius * w / jnp.linalg.norm(w, 2)
    x = x_scale * jax.random.normal(k2, (n,), dtype)
    return w, x


def _cell(z, wx):
    w, x = wx
    return jnp.tanh(w @ z + x)


def _time(fn, *args, repeats=5):
    """Minimum wall time of `repeats` warm calls (the least noisy estimate)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def evaluations(n=1000, tol=1e-8):
    import scipy.optimize as so

    rows = []
    with jax.enable_x64(True):
        for symmetric, x_scale in ((False, 1.0), (False, 0.1), (True, 1.0), (True, 0.1)):
            wx = _tanh_problem(n, 0.95, symmetric, jnp.float64, x_scale=x_scale)
            w_np, x_np = (np.asarray(a) for a in wx)

            def check(z):
                r = np.tanh(w_np @ z + x_np) - z
                return np.max(np.abs(r)) <= tol

            counts = {}
            for name, solver in [
                ("Neumann", fp.Neumann(rtol=0.0, atol=tol)),
                ("Anderson(m=5)", fp.Anderson(m=5, rtol=0.0, atol=tol)),
                ("Broyden", fp.Broyden(rtol=0.0, atol=tol)),
            ]:
                sol = optx.fixed_point(_cell, solver, jnp.zeros(n), wx, max_steps=5000, throw=False)
                ok = bool(sol.result == optx.RESULTS.successful) and check(np.asarray(sol.value))
                counts[name] = (int(sol.stats["num_steps"]), ok)
            for name, method, kw in [
                ("scipy anderson(M=5)", so.anderson, dict(M=5)),
                ("scipy broyden1", so.broyden1, {}),
            ]:
                calls = [0]

                def F(z):
                    calls[0] += 1
                    return np.tanh(w_np @ z + x_np) - z

                try:
                    z = method(F, np.zeros(n), f_tol=tol, maxiter=5000, **kw)
                    ok = check(z)
                except Exception:  # noqa: BLE001 - scipy raises NoConvergence
                    ok = False
                counts[name] = (calls[0], ok)
            label = ("symmetric W" if symmetric else "Gaussian W") + f", x scale {x_scale}"
            rows.append((label, counts))
    return rows


def overhead(n=10000, steps=20):
    wx = _tanh_problem(n, 0.95, False, jnp.float32)
    z0 = jnp.zeros(n)

    @jax.jit
    def f_loop(wx):
        return jax.lax.fori_loop(0, steps, lambda i, z: _cell(z, wx), z0)

    runs = {"f evaluations only": f_loop}
    for name, solver in [
        ("Neumann", fp.Neumann(rtol=0.0, atol=0.0)),
        ("Anderson(m=5)", fp.Anderson(m=5, rtol=0.0, atol=0.0)),
        ("Broyden(memory=30)", fp.Broyden(rtol=0.0, atol=0.0)),
    ]:
        runs[name] = jax.jit(
            lambda wx, solver=solver: (
                optx.fixed_point(_cell, solver, z0, wx, max_steps=steps, throw=False).value
            )
        )
    # Interleave the runs (3 rounds) so that machine noise hits all alike.
    best = {name: np.inf for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            best[name] = min(best[name], _time(run, wx, repeats=2) / steps)
    t_f = best.pop("f evaluations only")
    out = {"f evaluation (ms)": 1e3 * t_f}
    for name, t in best.items():
        out[name] = (t - t_f) / t_f
    return out


def gradient_cost(n=1000, tol=1e-5, copies=6, rounds=30):
    """The backward part of a gradient against the forward solve: ``time(backward) /
    time(forward)`` for each backward solver, and for dense LU.

    For our iterative solvers the backward part is timed on its own: the pullback of
    `jax.vjp` (computed once, under `jit`) applied to a cotangent runs the backward
    linear solve and the vector-Jacobian product with the parameters, and nothing of
    the forward solve. (Timing value-and-grad less the forward solve divides a
    difference of two noisy times by one of them: for `linear.Anderson` it gave
    0.84-2.15 in eight runs on 2026-12-01, this 1.23-1.47 in eight.) Dense LU forms
    and factorises the Jacobian before it sees the cotangent, so that `jax.vjp` does
    that work and its pullback only back-substitutes: it is timed as value-and-grad
    less the forward solve.

    On this machine the time of a solve also depends on where its 4 MB matrix lies in
    memory (up to 2x between two copies of the same data in one process): each time
    is the minimum over interleaved rounds for each of `copies` separately allocated
    copies of the problem, summed over the copies."""
    wx = _tanh_problem(n, 0.95, True, jnp.float32)
    z0 = jnp.zeros(n)
    solver = fp.Anderson(m=5, rtol=tol, atol=tol)
    data = [jax.tree_util.tree_map(lambda a: jnp.array(np.asarray(a)), wx) for _ in range(copies)]

    def solve(wx, adjoint):
        return optx.fixed_point(_cell, solver, z0, wx, max_steps=500, adjoint=adjoint).value

    forward = jax.jit(lambda wx: solve(wx, optx.ImplicitAdjoint()))  # (optx's default)
    apply = jax.jit(lambda pullback, cotangent: pullback(cotangent))
    iterative = {
        "linear.Anderson": fp.linear.Anderson(m=5, rtol=tol, atol=tol),
        "linear.Broyden": fp.linear.Broyden(rtol=tol, atol=tol),
        "linear.Neumann": fp.linear.Neumann(rtol=tol, atol=tol),
    }
    calls: dict[tuple[str, int], tuple[Callable, tuple]] = {
        ("forward", i): (forward, (d,)) for i, d in enumerate(data)
    }
    for name, linear_solver in iterative.items():
        adjoint = fp.ImplicitAdjoint(linear_solver)
        vjp = jax.jit(lambda wx, adjoint=adjoint: jax.vjp(lambda wx: solve(wx, adjoint), wx))
        for i, d in enumerate(data):
            z, pullback = vjp(d)
            calls[(name, i)] = (apply, (pullback, jnp.ones_like(z)))
    best = _best_interleaved(calls, rounds)
    total = {name: sum(best[(name, i)] for i in range(copies)) for name in ["forward", *iterative]}
    out = {"forward solve (ms)": 1e3 * total["forward"] / copies}
    for name in iterative:
        out[name] = total[name] / total["forward"]  # backward cost / forward cost
    # Dense LU (~15x a forward solve) is timed on its own: interleaved, the heavy call
    # perturbs the timing of the call after it.
    lu = optx.ImplicitAdjoint(lx.AutoLinearSolver(well_posed=True))
    gradient = jax.jit(jax.value_and_grad(lambda wx: jnp.sum(solve(wx, lu))))
    lu_calls: dict[tuple[str, int], tuple[Callable, tuple]] = {
        ("lu", i): (gradient, (d,)) for i, d in enumerate(data)
    }
    lu_best = _best_interleaved(lu_calls, 5)
    lu_total = sum(lu_best.values())
    out["dense LU (lx.AutoLinearSolver)"] = (lu_total - total["forward"]) / total["forward"]
    return out


def _best_interleaved(calls: dict, rounds: int) -> dict:
    """Minimum wall time of each ``fn(*args)`` of `calls`, over interleaved rounds."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    best = {key: np.inf for key in calls}
    for _ in range(rounds):
        for key, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def memory(n=256):
    wx = _tanh_problem(n, 0.5, True, jnp.float32)
    z0 = jnp.zeros(n)
    rows = []
    for iters in (10, 100, 1000):
        solver = fp.Neumann(rtol=0.0, atol=0.0)
        row = {}
        for name, adjoint in [
            ("implicit (linear.Anderson)", fp.ImplicitAdjoint(fp.linear.Anderson(), throw=False)),
            ("unrolled, all steps stored", optx.RecursiveCheckpointAdjoint(checkpoints=iters)),
            ("unrolled, log checkpoints", optx.RecursiveCheckpointAdjoint()),
        ]:
            grad = jax.jit(
                jax.grad(
                    lambda wx, adjoint=adjoint: jnp.sum(
                        optx.fixed_point(
                            _cell, solver, z0, wx, max_steps=iters, adjoint=adjoint, throw=False
                        ).value
                    )
                )
            )
            analysis = grad.lower(wx).compile().memory_analysis()
            assert analysis is not None  # the CPU backend reports it
            row[name] = analysis.temp_size_in_bytes / 2**20
        rows.append((iters, row))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    from fixedpoint_deq.mnist import compile_cache

    compile_cache.enable()  # ($FIXEDPOINT_COMPILATION_CACHE: another directory, or off)
    print("## f evaluations to rtol 1e-8, tanh cell n = 1000, ||W|| = 0.95, float64\n")
    for label, counts in evaluations():
        print(
            f"- {label}: "
            + ", ".join(f"{k} {v[0]}{'' if v[1] else ' (FAILED)'}" for k, v in counts.items())
        )
        base = counts["Neumann"][0]
        print(
            f"  ratio to Neumann: Anderson {counts['Anderson(m=5)'][0] / base:.2f}, "
            f"Broyden {counts['Broyden'][0] / base:.2f}"
        )
    print("\n## Per-step overhead beyond one f evaluation, n = 10,000, float32\n")
    for k, v in overhead().items():
        print(f"- {k}: {v:.3f}")
    print("\n## Backward cost / forward cost, n = 1000 tanh cell, float32, rtol 1e-5\n")
    for k, v in gradient_cost().items():
        print(f"- {k}: {v:.3f}")
    print("\n## Peak temporary memory of one gradient (MiB), n = 256\n")
    for iters, row in memory():
        print(f"- {iters} iterations: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
