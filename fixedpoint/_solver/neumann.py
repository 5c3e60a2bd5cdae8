from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._validate import as_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import flatten_initial, init_progress, Progress


class _NeumannState(eqx.Module):
    progress: Progress


class Neumann(AbstractFixedPointRootFinder[Y, Out, Aux, _NeumannState]):
    r"""Damped Picard (Krasnosel'skii-Mann) iteration, as a root finder.

    For the root problem $g(y) = 0$ each step is

    $$y_{k+1} = y_k + \beta\, g(y_k),$$

    which for a fixed-point problem (`optx.fixed_point`, where $g(y) = f(y) - y$) is
    $y_{k+1} = (1 - \beta) y_k + \beta f(y_k)$: plain fixed-point iteration when
    $\beta = 1$. It converges when $y \mapsto y + \beta g(y)$ is a contraction.

    On a linear problem $f(y) = A y + b$ with $\beta = 1$ and $y_0 = 0$ the iterates are
    the partial sums of the Neumann series, $y_k = \sum_{i<k} A^i b \to (I - A)^{-1} b$;
    hence the name. It is the cheapest method per step (no memory beyond the best
    iterate) and the slowest to converge: prefer [`fixedpoint.Anderson`][] unless
    evaluations of $f$ are almost free or memory is tight.

    **Stopping rule** (shared by all solvers of this package): stop at the first
    evaluated $y_k$ with `norm(g(y_k) / (atol + rtol * |y_k|)) < 1`, and return that
    $y_k$. One evaluation of $g$ per step, so `sol.stats["num_steps"]` counts them.
    (For `optx.max_norm` it is evaluated as `|g_i| < atol + rtol |y_i|` for every
    element, without dividing: the same decision.)

    **Failures:** a non-finite residual gives `RESULTS.nonfinite` (a NaN anywhere in it,
    also with `optx.max_norm`, whose reduction on XLA's CPU backend skips NaN in arrays
    of 4,096 or more elements: the solvers map NaN to infinity before it); a residual norm
    larger than `divergence_factor` times the best one so far at `divergence_patience`
    evaluations in a row gives `RESULTS.nonlinear_divergence` (a single rise is not
    failure; the other methods' safeguards act in between); running out of steps gives
    `RESULTS.nonlinear_max_steps_reached`. After non-finite values or divergence the best
    iterate evaluated is returned (y0 itself if the very first evaluation is
    non-finite; `sol.aux` is then still that of the last evaluation); after running out
    of steps, the final iterate (so `rtol = atol = 0` runs exactly `max_steps` steps, a
    fixed-iteration solver).

    **Dtypes:** float16, bfloat16, float32, float64 and complex states (the residual
    norms are real).

    **Statistics:** `sol.stats["residual_norm"]` is `norm(g(y))` at the last evaluated
    iterate: the returned `y` on success, the best one after non-finite values or
    divergence;
    with `trace_length > 0`, `sol.stats["residual_trace"]` holds `norm(g(y_k))` for the
    first `trace_length` steps (NaN beyond the last step).
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    beta: float = 1.0
    divergence_factor: float = 1e4
    divergence_patience: int = eqx.field(default=3, converter=as_int)
    trace_length: int = eqx.field(default=0, converter=as_int)

    def __check_init__(self) -> None:
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)

    def init(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _NeumannState:
        del fn, args, options, aux_struct, tags
        y_flat = flatten_initial(y, f_struct)
        return _NeumannState(init_progress(y_flat, self.trace_length))

    def step(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _NeumannState,
        tags: frozenset[object],
    ) -> tuple[Y, _NeumannState, Aux]:
        del options, tags
        y_flat, r_flat, aux, progress = self._evaluate(fn, y, args, state.progress)
        new_y = self._next_y(y, y_flat + self.beta * r_flat, progress)
        return new_y, _NeumannState(progress), aux


Neumann.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance of the stopping rule (>= 0).
- `atol`: absolute tolerance of the stopping rule (>= 0). With `rtol = atol = 0` the
    solver runs exactly `max_steps` steps (a truncated Neumann series).
- `norm`: a function `PyTree -> scalar` used by the stopping rule and in the
    statistics, e.g. `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `beta`: damping in (0, 1]; 1 is plain fixed-point iteration. `beta` weighs the new
    map value, $y_{k+1} = \\beta f(y_k) + (1 - \\beta) y_k$: optimistix's
    `optx.FixedPointIteration(damp=...)` weighs the old iterate instead, so
    `beta = 1 - damp`.
- `divergence_factor`: (> 1) a residual norm above this multiple of the smallest one
    seen counts towards divergence.
- `divergence_patience`: (1 to 2**20) declare divergence after this many evaluations in a
    row with a residual above `divergence_factor` x the smallest (default 3).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
"""
