r"""The names of this package's solvers, and the stopping rules built from one tolerance.

One table, `SOLVERS`, says what each name stands for: the root finder
(`fixedpoint.Anderson`, ...) and the backward linear solver of the same method
(`fixedpoint.linear.Anderson`, ...). Every API that takes a solver by name (the
DEQ layer, the seed-compatible `FixedPointSolver`, the MNIST trainer's configuration,
the benchmarks) takes its names from here, and `StoppingRule`s say how each of them
turns its tolerance into `rtol`, `atol` and `norm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import optimistix as optx

from ._solver import AbstractFixedPointRootFinder, Anderson, Broyden, Neumann
from ._validate import check_choice
from .linear import (
    AbstractFixedPointLinearSolver,
    AndersonLinearSolver,
    BroydenLinearSolver,
    NeumannLinearSolver,
)


@dataclasses.dataclass(frozen=True)
class SolverName:
    """What a solver name stands for.

    - `root_finder`: the class of the forward root finder.
    - `linear_solver`: the class of the `fixedpoint.linear` solver of the same
        method (the backward pass of implicit differentiation).
    - `alias_of`: the name this one is another name of (`"picard"` for `"neumann"`),
        or `None`.
    """

    root_finder: type[AbstractFixedPointRootFinder]
    linear_solver: type[AbstractFixedPointLinearSolver]
    alias_of: str | None = None


#: Every solver name, in the order error messages list them.
SOLVERS: Mapping[str, SolverName] = MappingProxyType(
    {
        "anderson": SolverName(Anderson, AndersonLinearSolver),
        "broyden": SolverName(Broyden, BroydenLinearSolver),
        "neumann": SolverName(Neumann, NeumannLinearSolver),
        # Plain (damped) fixed-point iteration: Neumann's method on g(y) = f(y) - y.
        "picard": SolverName(Neumann, NeumannLinearSolver, alias_of="neumann"),
    }
)


def solver_names(*, aliases: bool = True) -> tuple[str, ...]:
    """The solver names, in the order of `SOLVERS`; without `aliases`, only the names
    that are no other name's alias."""
    return tuple(k for k, v in SOLVERS.items() if aliases or v.alias_of is None)


def check_solver_name(name: str, value: Any, *, aliases: bool = True) -> None:
    """Raise `ValueError` naming the parameter `name` unless `value` is a solver name
    (one of `solver_names(aliases=aliases)`)."""
    check_choice(name, value, solver_names(aliases=aliases))


def root_finder(name: str, **kwargs: Any) -> AbstractFixedPointRootFinder:
    """The root finder called `name`, built with `kwargs` (`ValueError` naming `name`
    for an unknown name)."""
    check_solver_name("name", name)
    return SOLVERS[name].root_finder(**kwargs)


def linear_solver(name: str, **kwargs: Any) -> AbstractFixedPointLinearSolver:
    """The `fixedpoint.linear` solver called `name`, built with `kwargs`
    (`ValueError` naming `name` for an unknown name)."""
    check_solver_name("name", name)
    return SOLVERS[name].linear_solver(**kwargs)


@dataclasses.dataclass(frozen=True)
class StoppingRule:
    """How an API turns one tolerance `tol` into the stopping rule of a solver,
    ``norm(r / (atol + rtol * |y|)) < 1``: `rtol = tol`, and

    - `atol`: a fixed absolute tolerance; if `None`, `atol_ratio * tol`, or `tol`
        itself when `atol_ratio` is `None` too;
    - `norm`: the norm, or `None` for the solver's default;
    - `tol`: the API's default tolerance.
    """

    tol: float
    atol: float | None = None
    atol_ratio: float | None = None
    norm: Callable[[Any], Any] | None = None

    def __call__(self, tol: float | None = None) -> dict[str, Any]:
        """The keyword arguments `rtol`, `atol` and (when the rule sets one) `norm` of
        a solver, for `tol` (default: the rule's `tol`)."""
        tol = self.tol if tol is None else tol
        if self.atol is not None:
            atol = self.atol
        elif self.atol_ratio is not None:
            atol = tol * self.atol_ratio
        else:
            atol = tol
        kwargs: dict[str, Any] = dict(rtol=tol, atol=atol)
        if self.norm is not None:
            kwargs["norm"] = self.norm
        return kwargs


#: The DEQ layer's forward solver (its default, and a solver given by name): RMS norm
#: (the max norm over thousands of state elements is needlessly strict for a layer).
DEQ_FORWARD = StoppingRule(tol=1e-3, atol=1e-5, norm=optx.rms_norm)
#: The backward solve of the DEQ layer's default adjoint: a purely relative rule (the
#: cotangent's scale depends on the loss, e.g. 1 / batch size), RMS norm.
DEQ_BACKWARD = StoppingRule(tol=1e-3, atol=1e-9, norm=optx.rms_norm)
#: The seed-compatible `FixedPointSolver` (`fwd_tol`, `bwd_tol`), both directions:
#: `atol = tol / 100`, the solvers' default norm.
SEED = StoppingRule(tol=1e-4, atol_ratio=1e-2)
#: The MNIST trainer's forward solver (`--fwd-tol`): ``rms(r / (tol + tol |z|)) < 1``.
TRAINER_FORWARD = StoppingRule(tol=1e-2, norm=optx.rms_norm)
#: The MNIST trainer's backward solve (`--backward-tol`), purely relative as the DEQ
#: layer's: ``rms(r / (1e-9 + tol |w|)) < 1``.
TRAINER_BACKWARD = StoppingRule(tol=1e-2, atol=1e-9, norm=optx.rms_norm)
