from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optimistix as optx
from jaxtyping import PyTree, Scalar

from ._common import (
    check_common,
    check_real,
    FixedPointRootFinder,
    init_progress,
    Progress,
    start,
)


class _NeumannState(eqx.Module):
    progress: Progress


class Neumann(FixedPointRootFinder):
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

    **Failures:** a non-finite residual gives `RESULTS.nonfinite`; a residual norm
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
    divergence_patience: int = 3
    trace_length: int = 0

    def __check_init__(self):
        check_common(self)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)

    def init(
        self,
        fn,
        y: PyTree,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _NeumannState:
        del fn, args, options, aux_struct, tags
        y_flat = start(y, f_struct)
        return _NeumannState(init_progress(y_flat, self.trace_length))

    def step(self, fn, y, args, options, state: _NeumannState, tags):
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
- `beta`: damping in (0, 1]; 1 is plain fixed-point iteration.
- `divergence_factor`: (> 1) a residual norm above this multiple of the smallest one
    seen counts towards divergence.
- `divergence_patience`: (>= 1) declare divergence after this many evaluations in a
    row with a residual above `divergence_factor` x the smallest (default 3).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
"""
