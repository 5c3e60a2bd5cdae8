"""`benchmarks.figures` runs end to end on small sizes (its figures are timings, so
only their presence and sign are checked)."""

import math

from . import figures


def test_gradient_cost_times_each_backward_part():
    out = figures.gradient_cost(n=50, copies=2, rounds=2)
    assert set(out) == {
        "forward solve (ms)",
        "linear.Anderson",
        "linear.Broyden",
        "linear.Neumann",
        "dense LU (lx.AutoLinearSolver)",
    }
    assert all(math.isfinite(v) for v in out.values())
    assert out["forward solve (ms)"] > 0
    assert all(out[k] > 0 for k in ("linear.Anderson", "linear.Broyden", "linear.Neumann"))
