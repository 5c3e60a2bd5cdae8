"""`python -m benchmarks.gpu_check`: the DEQ training step and the forward/backward
costs on a GPU, in one run.

On a machine where JAX sees a GPU (installed with ``pip install -e ".[cuda]"``), it
prints, for the first GPU:

1. the MNIST DEQ training step of `benchmarks.deq_step` (ours; float32, batch 64):
   milliseconds per call of each row (phantom and implicit backward, the forward solve,
   the cell alone);
2. the cost of the backward pass against the forward solve of `benchmarks.figures`
   (``gradient_cost``: the n = 1,000 tanh cell, float32, rtol 1e-5) and the solvers'
   per-step overhead beyond one evaluation of the function (``overhead``, n = 10,000);
3. float32 against float64: the time of a 30-step Anderson solve of the tanh cell
   (n = 4,096) in each, and their ratio.

Without a GPU it prints one line saying so and exits with status 0.

    python -m benchmarks.gpu_check               # everything
    python -m benchmarks.gpu_check --steps 10    # fewer timed calls per DEQ-step row
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def gpus() -> list[Any]:
    """The GPUs JAX can use (none: an empty list; JAX's CUDA or ROCm backend may be
    missing, or find no device)."""
    try:
        return list(jax.devices("gpu"))
    except RuntimeError:
        return []


def precision(n: int = 4096, steps: int = 30, repeats: int = 10) -> dict[str, float]:
    """Milliseconds of one `steps`-step Anderson solve (m = 5, tolerance 0) of the tanh
    cell ``z = tanh(W z + x)`` of size `n`, in float32 and in float64 (the minimum of
    `repeats` warm calls), and their ratio.

    **Arguments:**

    - `n`: the size of the state.
    - `steps`: the solver's steps (every solve takes exactly this many).
    - `repeats`: the timed calls of each.
    """
    import optimistix as optx

    import fixedpoint as fp

    from .figures import _cell, _tanh_problem

    out = {}
    for name, dtype in (("float32", jnp.float32), ("float64", jnp.float64)):
        with jax.enable_x64(dtype == jnp.float64):
            wx = _tanh_problem(n, 0.95, False, dtype)
            solver = fp.Anderson(m=5, rtol=0.0, atol=0.0)
            solve = jax.jit(
                lambda wx: (
                    optx.fixed_point(
                        _cell, solver, jnp.zeros(n, dtype), wx, max_steps=steps, throw=False
                    ).value
                )
            )
            jax.block_until_ready(solve(wx))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(solve(wx))
                times.append(time.perf_counter() - t0)
            out[f"{name} (ms)"] = 1e3 * float(np.min(times))
    out["float64 / float32"] = out["float64 (ms)"] / out["float32 (ms)"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="timed calls per DEQ-step row")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    devices = gpus()
    if not devices:
        print(
            f"benchmarks.gpu_check: no GPU found (JAX's backend: {jax.default_backend()}); "
            "nothing measured"
        )
        return 0
    from fixedpoint_deq.mnist import compile_cache

    from . import deq_step, figures

    compile_cache.enable()
    device = devices[0]
    print(f"# GPU check: {device.device_kind} ({device.platform}), JAX {jax.__version__}\n")
    with jax.default_device(device):
        print("## The MNIST DEQ training step (benchmarks.deq_step), float32, batch 64\n")
        print(deq_step.markdown(deq_step.measure(deq_step.rows(False), args.steps)))
        print("\n## Backward cost / forward cost, n = 1000 tanh cell, float32, rtol 1e-5\n")
        for k, v in figures.gradient_cost().items():
            print(f"- {k}: {v:.3f}")
        print("\n## Per-step overhead beyond one f evaluation, n = 10,000, float32\n")
        for k, v in figures.overhead().items():
            print(f"- {k}: {v:.3f}")
        print("\n## float32 against float64: a 30-step Anderson solve, n = 4096\n")
        for k, v in precision().items():
            print(f"- {k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
