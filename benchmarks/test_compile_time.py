"""The structure that sets each solver's compile time (`benchmarks.compile_time`),
checked without timing: the number of kernels XLA's CPU backend compiles for a solve
and for its gradient.

XLA's CPU compile time grows with the number of separately compiled kernels (each
fusion, product and reduction; a reduction of a long vector is two), and that number
does not depend on the machine's load. A change that adds kernels to a solver's loop
fails here and says by how many; one that removes some asks for the pin to be lowered,
so that the guard stays tight. (The counts are XLA's: after a jax upgrade that moves
them, check the times with `python -m benchmarks.compile_time` and re-pin.)
"""

import jax
import pytest

from . import compile_time


#: Kernels of the compiled forward solve and gradient (jax 0.10, CPU), tanh cell n = 100.
PINNED = {
    "fp.Anderson": {"forward": 66, "gradient": 142},
    "fp.Broyden": {"forward": 84, "gradient": 164},
    "fp.Neumann": {"forward": 20, "gradient": 100},
    "fp.NewtonKrylov": {"forward": 117, "gradient": 197},
    "fp.Polyalgorithm": {"forward": 189, "gradient": 268},
}
MARGIN = 2


#: The general-system solvers compile the most (their checks run with `-m slow`).
SLOW = {"fp.NewtonKrylov", "fp.Polyalgorithm"}


@pytest.fixture(scope="module")
def counts():
    """``counts(name, kind)``: the compiled kernels, each program compiled once."""
    cache = {}

    def count(name, kind):
        if (name, kind) not in cache:
            with jax.enable_x64(True):
                w, x = compile_time.problem()
                program = compile_time.programs(compile_time.solvers()[name], w)[kind]
                cache[name, kind] = compile_time.count_kernels(program, x)
        return cache[name, kind]

    return count


@pytest.mark.parametrize("kind", ["forward", "gradient"])
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in PINNED]
)
def test_kernels_stay_pinned(counts, name, kind):
    got, pinned = counts(name, kind), PINNED[name][kind]
    assert got <= pinned + MARGIN, (
        f"{name} {kind}: {got} compiled kernels, {got - pinned} more than the {pinned} "
        "pinned: its compile time grows with them (python -m benchmarks.compile_time)"
    )
    assert got >= pinned - MARGIN, (
        f"{name} {kind}: {got} compiled kernels, {pinned - got} fewer than pinned: "
        f"lower PINNED[{name!r}][{kind!r}] to {got}"
    )


def test_kernels_counts_what_xla_compiles():
    """A fused elementwise expression is one kernel; a matrix product is another; the
    reductions of a long vector are two each (XLA's CPU backend splits them)."""
    x = jax.numpy.ones((4, 4))
    assert compile_time.count_kernels(lambda x: x * 2 + 1, x) == 1
    assert compile_time.count_kernels(lambda x: (x @ x) * 2, x) == 2
    v = jax.numpy.ones(100)
    assert compile_time.count_kernels(lambda v: v.sum(), v) == 2
