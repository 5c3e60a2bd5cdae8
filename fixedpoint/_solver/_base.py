"""The abstract base of this package's root finders."""

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, TypeVar

import equinox as eqx
import optimistix as optx
from jaxtyping import Array, Bool, Float, PyTree, Scalar

from .._validate import check_callable, check_int, check_real
from ._common import (
    is_done,
    Progress,
    ravel,
    select_output,
    termination_result,
    tree_where,
    unravel_like,
    update_progress,
)


class _HasProgress(Protocol):
    @property
    def progress(self) -> Progress: ...


Y = TypeVar("Y")
Out = TypeVar("Out")
Aux = TypeVar("Aux")
SolverState = TypeVar("SolverState", bound=_HasProgress)

#: The function a root finder is given: ``fn(y, args) -> (g(y), aux)``.
Fn: TypeAlias = Callable[[Y, PyTree], tuple[Out, Aux]]


class AbstractFixedPointRootFinder(optx.AbstractRootFinder[Y, Out, Aux, SolverState]):
    r"""The abstract base of [`fixedpoint.Anderson`][], [`fixedpoint.Broyden`][] and
    [`fixedpoint.Neumann`][]: root finders of $g(y) = 0$ that evaluate $g$ exactly
    once per step and share one stopping rule, one failure detection and one choice of
    what to return (documented on [`fixedpoint.Neumann`][]).

    A subclass declares the fields below and implements `init` and `step`; its solver
    state must hold a `progress` (the bookkeeping the three methods share),
    which `step` updates by evaluating $g$ through `self._evaluate` and which
    `terminate` and `postprocess` (implemented here) read.

    **Fields required of a subclass:**

    - `rtol`, `atol`: tolerances of the stopping rule (>= 0).
    - `norm`: a function `PyTree -> scalar` for the stopping rule and the statistics.
    - `divergence_factor`: (> 1) a residual above this multiple of the best one seen
        counts towards divergence.
    - `divergence_patience`: (1 to 2**20) divergence is declared after this many
        evaluations in a row above `divergence_factor` x the best.
    - `trace_length`: (>= 0) how many residual norms to record.
    """

    rtol: eqx.AbstractVar[float]
    atol: eqx.AbstractVar[float]
    norm: eqx.AbstractVar[Callable[[PyTree], Scalar]]
    divergence_factor: eqx.AbstractVar[float]
    divergence_patience: eqx.AbstractVar[int]
    trace_length: eqx.AbstractVar[int]

    def __check_init__(self) -> None:
        check_real("rtol", self.rtol, low=0.0)
        check_real("atol", self.atol, low=0.0)
        check_callable("norm", self.norm, "PyTree -> scalar")
        check_real("divergence_factor", self.divergence_factor, low=1.0, low_open=True)
        check_int("divergence_patience", self.divergence_patience, low=1, high=2**20)
        check_int("trace_length", self.trace_length, low=0)

    def terminate(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: SolverState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        return termination_result(state.progress)

    def postprocess(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: SolverState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del fn, args, options, tags
        y_out, stats = select_output(y, state.progress, result, self.trace_length)
        return y_out, aux, stats

    def keeps_finished_state(self) -> bool:
        """True: a `step` taken from a finished state leaves the iterate, the state and
        every statistic unchanged (see `is_done`), so a batch of solves may run as one
        loop (`fixedpoint._iterate`)."""
        return True

    def _evaluate(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        progress: Progress,
    ) -> tuple[Float[Array, " n"], Float[Array, " n"], Aux, Progress]:
        """Evaluate g once at y; return (flat y, flat r, aux, updated progress)."""
        r, aux = fn(y, args)
        return self._record(y, r, aux, progress)

    def _record(
        self, y: Y, r: Out, aux: Aux, progress: Progress
    ) -> tuple[Float[Array, " n"], Float[Array, " n"], Aux, Progress]:
        """`_evaluate` given ``r = g(y)``: the flat y and r, aux, updated progress."""
        dtype = progress.y_best.dtype
        y_flat = ravel(y, dtype)
        r_flat = ravel(r, dtype)
        progress = update_progress(
            progress,
            y,
            r,
            y_flat,
            r_flat,
            rtol=self.rtol,
            atol=self.atol,
            norm=self.norm,
            divergence_factor=self.divergence_factor,
            divergence_patience=self.divergence_patience,
        )
        return y_flat, r_flat, aux, progress

    def _next_y(self, y: Y, y_next_flat: Float[Array, " n"], progress: Progress) -> Y:
        """Stay on a converged point (its residual is the one reported), and on the
        last point of a finished solve."""
        return tree_where(is_done(progress), y, unravel_like(y_next_flat, y))
