from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._validate import as_int, check_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import flatten_initial, init_progress, is_done, Progress


class _AndersonState(eqx.Module):
    dy: Float[Array, "m n"]  # ring buffer of differences y_{i+1} - y_i
    dr: Float[Array, "m n"]  # ring buffer of differences g(y_{i+1}) - g(y_i)
    gram: Float[Array, "m m"]  # dr @ dr.T, one row and column updated per step
    count: Int[Array, ""]  # valid columns since the last restart (capped at m)
    index: Int[Array, ""]  # next ring slot to write
    y_prev: Float[Array, " n"]
    r_prev: Float[Array, " n"]
    has_prev: Bool[Array, ""]
    num_restarts: Int[Array, ""]
    consecutive: Int[Array, ""]  # restarts in a row (halve the restart step each)
    progress: Progress


def anderson_coefficients(
    gram: Float[Array, "m m"],
    dr_r: Float[Array, " m"],
    valid: Bool[Array, " m"],
    reg: Scalar,
) -> Float[Array, " m"]:
    r"""Solve the Tikhonov-regularised least-squares problem of Anderson mixing,

    $$\gamma = \arg\min_\gamma \|r - \Delta R^\top \gamma\|_2^2 + \lambda \|D\gamma\|_2^2,$$

    by its normal equations, given the Gram matrix ``gram`` $= \Delta R \Delta R^\top$
    and ``dr_r`` $= \Delta R\, r$, with the columns of $\Delta R^\top$ scaled to unit norm
    ($D$ = diagonal of column norms), so that $\lambda$ is relative and the $m \times m$
    system is well conditioned in the working dtype. Invalid (empty) columns get
    $\gamma_i = 0$; an all-empty or rank-deficient history never gives NaN.
    """
    dtype = gram.dtype
    both = valid[:, None] & valid[None, :]
    diag = jnp.diagonal(gram)
    good = valid & (diag > jnp.finfo(dtype).tiny)
    scale = jnp.where(good, jnp.sqrt(jnp.where(good, diag, 1)), 1)
    both = both & good[:, None] & good[None, :]
    gram = jnp.where(both, gram / (scale[:, None] * scale[None, :]), 0)
    m = gram.shape[0]
    eye = jnp.eye(m, dtype=dtype)
    system = gram + jnp.where(good, reg, 1)[:, None] * eye
    rhs = jnp.where(good, dr_r / scale, 0)
    gamma = jnp.linalg.solve(system, rhs) / scale
    gamma = jnp.where(good & jnp.isfinite(gamma), gamma, 0)
    return gamma


class Anderson(AbstractFixedPointRootFinder[Y, Out, Aux, _AndersonState]):
    r"""Anderson acceleration (type II, Walker and Ni 2011), as a root finder.

    For the root problem $g(y) = 0$ (for `optx.fixed_point`, $g(y) = f(y) - y$) write
    $r_k = g(y_k)$ and keep the last $m$ differences $\Delta y_i = y_{i+1} - y_i$,
    $\Delta r_i = r_{i+1} - r_i$ as the columns of $\Delta Y$, $\Delta R$. Each step
    solves the small regularised least-squares problem

    $$\gamma_k = \arg\min_\gamma \|r_k - \Delta R\,\gamma\|_2^2
        + \lambda \|D \gamma\|_2^2 \qquad (D = \operatorname{diag}\|\Delta r_i\|)$$

    and mixes

    $$y_{k+1} = y_k + \beta r_k - (\Delta Y + \beta\,\Delta R)\,\gamma_k,$$

    i.e. $y_{k+1} = (1-\beta)\bar y_k + \beta \bar f_k$ with the extrapolated
    $\bar y_k = y_k - \Delta Y \gamma_k$ and $\bar f_k = \bar y_k + r_k - \Delta R
    \gamma_k$. With an empty history this is a damped Picard step (see
    [`fixedpoint.Neumann`][]). On a linear problem it is equivalent to GMRES(m)-like
    Krylov acceleration. The least-squares problem is solved with its columns scaled to
    unit norm, by the normal equations plus $\lambda$ (relative Tikhonov
    regularisation, floored at 10 x the dtype's machine epsilon), in the working dtype;
    empty or collinear history columns cannot give NaN.

    **Safeguard:** if the residual at a new iterate exceeds `safeguard_factor` times the
    best residual seen so far, the extrapolation is rejected: the history is cleared and
    the next iterate is a damped Picard step from the best point,
    $y_{best} + 2^{-j} \beta\, g(y_{best})$ (its residual is stored, so this costs no
    extra evaluation), where $j$ counts the restarts in a row before this one: a
    Picard step that itself overshoots is backtracked, not repeated.
    `sol.state.num_restarts` counts the restarts.

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][]: stop when
    `norm(g(y) / (atol + rtol * |y|)) < 1`; `nonfinite`, `nonlinear_divergence` (residual
    above `divergence_factor` x the best) and `nonlinear_max_steps_reached` are reported
    and what is returned on failure is as described there; exactly one evaluation of
    $g$ per step;
    `sol.stats["residual_norm"]` and, with `trace_length > 0`,
    `sol.stats["residual_trace"]`.

    Memory: $2 m n + O(n)$ numbers in the dtype of `y`; cost per step beyond the
    evaluation of $g$: $O(m n + m^3)$ (the Gram matrix of the history is updated by one
    row and column per step, not recomputed).
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    m: int = eqx.field(default=5, converter=as_int)
    beta: float = 1.0
    regularisation: float = 1e-8
    safeguard_factor: float = 1e2
    divergence_factor: float = 1e4
    trace_length: int = eqx.field(default=0, converter=as_int)

    def __check_init__(self) -> None:
        check_int("m", self.m, low=1)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)
        check_real("regularisation", self.regularisation, low=0.0)
        check_real("safeguard_factor", self.safeguard_factor, low=1.0, low_open=True)

    def init(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _AndersonState:
        del fn, args, options, aux_struct, tags
        y_flat = flatten_initial(y, f_struct)
        n = y_flat.size
        zeros = jnp.zeros((self.m, n), y_flat.dtype)
        return _AndersonState(
            dy=zeros,
            dr=zeros,
            gram=jnp.zeros((self.m, self.m), y_flat.dtype),
            count=jnp.array(0),
            index=jnp.array(0),
            y_prev=jnp.zeros_like(y_flat),
            r_prev=jnp.zeros_like(y_flat),
            has_prev=jnp.array(False),
            num_restarts=jnp.array(0),
            consecutive=jnp.array(0),
            progress=init_progress(y_flat, self.trace_length),
        )

    def step(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[Y, _AndersonState, Aux]:
        del options, tags
        best_before = state.progress.best_norm
        frozen = is_done(state.progress)  # a finished solve changes nothing (see is_done)
        y_k, r_k, aux, progress = self._evaluate(fn, y, args, state.progress)
        dtype = y_k.dtype
        beta = jnp.asarray(self.beta, dtype)
        reg = jnp.maximum(jnp.asarray(self.regularisation, dtype), 10 * jnp.finfo(dtype).eps)

        # Safeguard: reject a point whose residual blew up; restart from the best.
        reject = (
            state.has_prev
            & (progress.residual_norm > self.safeguard_factor * best_before)
            & ~progress.converged
            & ~frozen
        )

        # Accepted point: push the new differences into the ring buffer. When not
        # pushing (first step or restart) the history is empty afterwards, so the row
        # is simply zeroed: no old row is read, and XLA writes the buffers in place.
        push = state.has_prev & ~reject & ~frozen
        i = state.index
        # (A finished solve writes out of range: the write is dropped.)
        slot = jnp.where(frozen, self.m, i)
        dy = state.dy.at[slot].set(jnp.where(push, y_k - state.y_prev, 0), mode="drop")
        dr = state.dr.at[slot].set(jnp.where(push, r_k - state.r_prev, 0), mode="drop")
        # Only row/column i of the Gram matrix changes: one matrix-vector product
        # (m n) per step instead of a matrix product (m^2 n).
        gram_i = dr @ dr[i]
        gram = state.gram.at[slot].set(gram_i, mode="drop").at[:, slot].set(gram_i, mode="drop")
        count = jnp.where(reject, 0, jnp.where(push, jnp.minimum(state.count + 1, self.m), state.count))
        index = jnp.where(reject, 0, jnp.where(push, (state.index + 1) % self.m, state.index))

        # Base point of the mixing step: the new point, or the best one on restart.
        # A restart's step is halved for every restart in a row, so that a Picard
        # step that itself overshoots is not repeated forever (backtracking).
        consecutive = jnp.where(
        frozen, state.consecutive, jnp.where(reject, state.consecutive + 1, 0)
    )
        shrink = jnp.asarray(0.5, dtype) ** jnp.maximum(consecutive - 1, 0)
        y_base = jnp.where(reject, progress.y_best, y_k)
        r_base = jnp.where(reject, progress.r_best, r_k)
        valid = jnp.arange(self.m) < count
        gamma = anderson_coefficients(gram, dr @ r_base, valid, reg)
        step = beta * shrink
        # (Two vector-matrix products: cheaper than forming dy + beta dr.)
        y_next = y_base + step * r_base - gamma @ dy - beta * (gamma @ dr)

        new_state = _AndersonState(
            dy=dy,
            dr=dr,
            gram=gram,
            count=count,
            index=index,
            y_prev=y_base,
            r_prev=r_base,
            has_prev=jnp.array(True),
            num_restarts=state.num_restarts + reject.astype(state.num_restarts.dtype),
            consecutive=consecutive.astype(state.consecutive.dtype),
            progress=progress,
        )
        return self._next_y(y, y_next, progress), new_state, aux


Anderson.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance of the stopping rule (>= 0).
- `atol`: absolute tolerance of the stopping rule (>= 0).
- `norm`: a function `PyTree -> scalar` used by the stopping rule and in the
    statistics, e.g. `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `m`: history size (>= 1): how many past differences the extrapolation uses.
- `beta`: mixing (damping) parameter in (0, 1]; 1 mixes in the full map value (as
    for [`fixedpoint.Neumann`][], the weight of the new map value: `1 - damp` in
    optimistix's terms).
- `regularisation`: (>= 0) relative Tikhonov regularisation of the least-squares
    problem (floored at 10 x machine epsilon of the working dtype).
- `safeguard_factor`: (> 1) restart from the best iterate when a residual exceeds this
    multiple of the best residual seen.
- `divergence_factor`: (> 1) declare divergence when a residual exceeds this multiple
    of the best one seen (checked before the safeguard; keep it above
    `safeguard_factor`).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
"""
