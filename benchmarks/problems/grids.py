"""The grids: which problems the smoke test run, the default report (and the timed
benchmarks) and the full report use.

The registry is an immutable tuple of `Spec`s, built once from `spec(...)` entries;
`registry` refuses duplicate names. To add a problem, add a `spec(...)` line below (or
build your own tuple with `registry` and pass it to `specs`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable

from .base import Problem, Unavailable
from .families import bratu2d, broyden_tridiagonal, h_equation, linear_contraction, tanh_cell
from .mnist import INPUT_VARIABLES, mnist_deq_cell


GRIDS = ("smoke", "default", "full")
SMOKE = ("smoke",)
DEFAULT = ("default", "full")
FULL = ("full",)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered problem: its `name` (known without building it), the `grids` it
    belongs to, and `make()`, which builds it once (cached; raises `Unavailable`,
    also cached, when its inputs are not on this machine)."""

    name: str
    grids: tuple[str, ...]
    make: Callable[[], Problem]


def spec(factory: Callable[..., Problem], /, *, grids: Iterable[str], **kwargs) -> Spec:
    """The `Spec` of ``factory(**kwargs)`` in the given grids (a subset of `GRIDS`).

    `factory` must have a ``problem_name(**kwargs)`` attribute (see `named`) giving
    the name of the problem it builds; the factory itself only runs when the problem
    is used, and its result is cached, so expensive set-up (large matrices, loading
    trained weights...) costs nothing until then.
    """
    grids = tuple(grids)
    unknown = set(grids) - set(GRIDS)
    if unknown:
        raise ValueError(f"unknown grids {sorted(unknown)}; use a subset of {GRIDS}")
    name = factory.problem_name(**kwargs)
    return Spec(name, grids, _cached(functools.partial(factory, **kwargs)))


def registry(entries: Iterable[Spec]) -> tuple[Spec, ...]:
    """`entries` as a tuple, in order; raises `ValueError` on a repeated name."""
    out: list[Spec] = []
    for entry in entries:
        if any(s.name == entry.name for s in out):
            raise ValueError(f"a problem named {entry.name!r} is already registered")
        out.append(entry)
    return tuple(out)


def _cached(build: Callable[[], Problem]) -> Callable[[], Problem]:
    """`build`, run once per setting of `INPUT_VARIABLES`: its problem, or its
    `Unavailable`, is remembered."""

    @functools.cache
    def outcome(inputs):
        try:
            return build()
        except Unavailable as e:
            return e

    def make() -> Problem:
        out = outcome(tuple(os.environ.get(v) for v in INPUT_VARIABLES))
        if isinstance(out, Unavailable):
            raise out
        return out

    return make


def specs(grid: str = "default", entries: tuple[Spec, ...] | None = None) -> list[Spec]:
    """The problems of one grid (of `entries`, default `REGISTRY`), in order, not built."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; use one of {GRIDS}")
    return [s for s in (REGISTRY if entries is None else entries) if grid in s.grids]


def problems(grid: str = "default") -> list[Problem]:
    """The problems of one grid, built."""
    return [s.make() for s in specs(grid)]


def _entries() -> list[Spec]:
    out: list[Spec] = []
    # Smoke: tiny versions of every family, run once by the default test run.
    out.append(spec(linear_contraction, grids=SMOKE, n=50, rho=0.9))
    out.append(spec(tanh_cell, grids=SMOKE, n=32, s=0.9, variant="gauss"))
    out.append(spec(tanh_cell, grids=SMOKE, n=32, s=0.9, variant="sym"))
    out.append(spec(tanh_cell, grids=SMOKE, n=32, s=0.9, variant="sym", batch=4))
    out.append(spec(h_equation, grids=SMOKE, n=100, c=0.9))
    out.append(spec(bratu2d, grids=SMOKE, grid=12, lam=6.0))
    out.append(spec(broyden_tridiagonal, grids=SMOKE, n=100))
    out.append(spec(mnist_deq_cell, grids=SMOKE, weights="random", batch=2, width=4))
    out.append(spec(mnist_deq_cell, grids=SMOKE, weights="trained", batch=2))

    # Default: the report's default and the timed benchmarks (a few minutes on 2 cores).
    for rho in (0.5, 0.9, 0.99):
        out.append(spec(linear_contraction, grids=DEFAULT, n=100, rho=rho))
    out.append(spec(tanh_cell, grids=DEFAULT, n=64, s=0.9, variant="gauss"))
    out.append(spec(tanh_cell, grids=DEFAULT, n=64, s=0.9, variant="sym"))
    out.append(spec(tanh_cell, grids=DEFAULT, n=64, s=0.99, variant="sym"))
    out.append(spec(tanh_cell, grids=DEFAULT, n=64, s=0.9, variant="sym", batch=8))
    for c in (0.5, 0.9, 0.99):
        out.append(spec(h_equation, grids=DEFAULT, n=500, c=c))
    out.append(spec(bratu2d, grids=DEFAULT, grid=32, lam=6.0))
    out.append(spec(broyden_tridiagonal, grids=DEFAULT, n=1000))
    out.append(spec(mnist_deq_cell, grids=DEFAULT, weights="random", batch=4, width=48))
    out.append(spec(mnist_deq_cell, grids=DEFAULT, weights="trained", batch=4))

    # Full: the bigger grid of the issue (report --full; `slow` in the tests).
    for rho in (0.5, 0.9, 0.99):
        out.append(spec(linear_contraction, grids=FULL, n=1000, rho=rho))
    for n in (64, 512, 4096):
        for s in (0.5, 0.9, 0.99):
            for variant in ("gauss", "sym"):
                if (n, s, variant) in {(64, 0.9, "gauss"), (64, 0.9, "sym"), (64, 0.99, "sym")}:
                    continue  # already in the default grid
                out.append(spec(tanh_cell, grids=FULL, n=n, s=s, variant=variant))
    out.append(spec(tanh_cell, grids=FULL, n=512, s=0.9, variant="gauss", batch=16))
    out.append(spec(tanh_cell, grids=FULL, n=512, s=0.99, variant="sym", batch=16))
    out.append(spec(bratu2d, grids=FULL, grid=32, lam=1.0))
    out.append(spec(bratu2d, grids=FULL, grid=64, lam=6.5))
    out.append(spec(broyden_tridiagonal, grids=FULL, n=10000))
    out.append(spec(mnist_deq_cell, grids=FULL, weights="random", batch=32, width=48))
    out.append(spec(mnist_deq_cell, grids=FULL, weights="trained", batch=32))
    return out


#: Every registered problem, in order.
REGISTRY = registry(_entries())
