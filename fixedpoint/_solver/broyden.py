from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._validate import as_bool, as_int, check_bool, check_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import flatten_initial, init_progress, is_done, Progress


class _BroydenState(eqx.Module):
    u: Float[Array, "memory n"]  # H = -beta I + sum_i u_i v_i^T
    v: Float[Array, "memory n"]
    count: Int[Array, ""]  # rank-one terms in use
    y_prev: Float[Array, " n"]  # last accepted point
    r_prev: Float[Array, " n"]  # its residual
    p_prev: Float[Array, " n"]  # the quasi-Newton direction taken from it
    t: Scalar  # the step length along p_prev of the point being evaluated
    has_prev: Bool[Array, ""]
    num_backtracks: Int[Array, ""]
    progress: Progress


def _apply(u, v, valid, beta, x):
    """H x with H = -beta I + U^T diag(valid) V."""
    # (w @ u, not u.T @ w: XLA would materialise the transpose of the buffer.)
    return -beta * x + jnp.where(valid, v @ x, 0) @ u


def _apply_t(u, v, valid, beta, x):
    """H^T x."""
    return -beta * x + jnp.where(valid, u @ x, 0) @ v


class Broyden(AbstractFixedPointRootFinder[Y, Out, Aux, _BroydenState]):
    r"""Broyden's ("good") quasi-Newton method with a limited-memory inverse Jacobian.

    Solves $g(y) = 0$ (for `optx.fixed_point`, $g(y) = f(y) - y$). An approximation
    $H_k \approx J_g(y_k)^{-1}$ is kept as low-rank factors,
    $H_k = -\beta I + \sum_{i} u_i v_i^\top$, never as an $n \times n$ matrix. Each step
    moves along the quasi-Newton direction $p_k = -H_k g(y_k)$,
    $y_{k+1} = y_k + t_k p_k$, and after the step the inverse is updated by the good
    Broyden (Sherman-Morrison) formula with $s = y_{k+1} - y_k$, $d = g(y_{k+1}) -
    g(y_k)$:

    $$H_{k+1} = H_k + \frac{(s - H_k d)\, s^\top H_k}{s^\top H_k d},$$

    i.e. one more pair $u = (s - H_k d)/(s^\top H_k d)$, $v = H_k^\top s$. An update
    with a vanishing (or non-finite) denominator is skipped. When `memory` pairs are in
    use the approximation restarts: the next update is made from $-\beta I$ (so memory
    is $2\,\mathrm{memory}\cdot n$).
    The first step, $y_1 = y_0 + \beta g(y_0)$, is a damped Picard step.

    Cost per step beyond the evaluation of $g$: two applications of the factors
    ($H_k g(y_k)$ and $H_k^\top s$, i.e. $4\,\mathrm{memory}\cdot n$ multiply-adds),
    with the factors updated in place.

    It is a true quasi-Newton root finder: it also solves problems whose fixed-point
    map does not contract (where [`fixedpoint.Neumann`][] and
    [`fixedpoint.Anderson`][] may fail), if started close enough.

    **Line search** (`line_search=True`): a backtracking search on $\|g\|_2$ spread over
    steps, so that every step still costs exactly one evaluation of $g$. A trial point
    $y_k + t p_k$ is accepted when $\|g(y_k + t p_k)\|_2 \le (1 - 10^{-4} t)
    \|g(y_k)\|_2$; otherwise the next step evaluates $y_k + (t/2) p_k$ instead, up to
    `max_backtracks` halvings, after which the point is accepted anyway.

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][].
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory: int = eqx.field(default=30, converter=as_int)
    beta: float = 1.0
    line_search: bool = eqx.field(default=False, converter=as_bool)
    max_backtracks: int = eqx.field(default=5, converter=as_int)
    divergence_factor: float = 1e4
    trace_length: int = eqx.field(default=0, converter=as_int)

    def __check_init__(self) -> None:
        check_int("memory", self.memory, low=1)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)
        check_bool("line_search", self.line_search)
        check_int("max_backtracks", self.max_backtracks, low=0)

    def init(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _BroydenState:
        del fn, args, options, aux_struct, tags
        y_flat = flatten_initial(y, f_struct)
        n = y_flat.size
        zeros = jnp.zeros((self.memory, n), y_flat.dtype)
        vec = jnp.zeros_like(y_flat)
        return _BroydenState(
            u=zeros,
            v=zeros,
            count=jnp.array(0),
            y_prev=vec,
            r_prev=vec,
            p_prev=vec,
            t=jnp.array(1, y_flat.dtype),
            has_prev=jnp.array(False),
            num_backtracks=jnp.array(0),
            progress=init_progress(y_flat, self.trace_length),
        )

    def step(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _BroydenState,
        tags: frozenset[object],
    ) -> tuple[Y, _BroydenState, Aux]:
        del options, tags
        frozen = is_done(state.progress)  # a finished solve changes nothing (see is_done)
        y_k, r_k, aux, progress = self._evaluate(fn, y, args, state.progress)
        dtype = y_k.dtype
        beta = jnp.asarray(self.beta, dtype)
        tiny = jnp.finfo(dtype).tiny

        # Line search: is the trial point good enough?
        if self.line_search:
            norm_k = jnp.linalg.norm(r_k)
            norm_prev = jnp.linalg.norm(state.r_prev)
            sufficient = norm_k <= (1 - 1e-4 * state.t) * norm_prev
            min_t = jnp.asarray(0.5**self.max_backtracks, dtype)
            backtrack = (
                state.has_prev
                & ~sufficient
                & (state.t > min_t)
                & ~progress.converged
                & ~frozen
            )
        else:
            backtrack = jnp.array(False)
        accept = state.has_prev & ~backtrack & ~frozen

        # Good Broyden update of H with the accepted step. When the memory is full the
        # approximation restarts: the new pair is then computed from H = -beta I.
        # The low-rank factors are applied twice per step (H r_k and H^T s), not three
        # times: H d = H r_k - H r_prev = H r_k + p_prev, since p_prev = -H r_prev was
        # computed with this same H (nothing updates H in between), and the new
        # direction needs only H_new r_k = H r_k + u_new (v_new . r_k).
        valid = jnp.arange(self.memory) < state.count
        full = state.count >= self.memory
        s = y_k - state.y_prev
        d = r_k - state.r_prev
        h_r = _apply(state.u, state.v, valid, beta, r_k)
        base_r = jnp.where(full, -beta * r_k, h_r)  # H_base r_k
        h_d = jnp.where(full, -beta * d, h_r + state.p_prev)  # H_base d
        new_v = jnp.where(full, -beta * s, _apply_t(state.u, state.v, valid, beta, s))
        denom = jnp.vdot(s, h_d)
        scale = jnp.linalg.norm(s) * jnp.linalg.norm(h_d)
        ok = accept & (jnp.abs(denom) > 1e3 * jnp.finfo(dtype).eps * scale + tiny)
        v_dot_r = jnp.vdot(new_v, r_k)
        ok = ok & jnp.isfinite(denom) & jnp.isfinite(v_dot_r)
        new_u = (s - h_d) / jnp.where(ok, denom, 1)
        # The pair is written unconditionally into the first unused slot (slot 0 on a
        # restart) and counted only if the update is valid: an unused row may hold
        # anything, and no used row is ever read back (so XLA updates the buffers in
        # place, without copying them).
        # (A finished solve writes out of range: the write is dropped.)
        slot = jnp.where(frozen, self.memory, jnp.where(full, 0, state.count))
        # (Masking both rows with `ok`, which depends on every read of both buffers,
        # orders those reads before the writes, so XLA need not copy the buffers.)
        u = state.u.at[slot].set(jnp.where(ok, new_u, 0), mode="drop")
        v = state.v.at[slot].set(jnp.where(ok, new_v, 0), mode="drop")
        count = jnp.where(frozen, state.count, jnp.where(ok, slot + 1, slot))

        # New direction from the current point, or a shorter step on backtracking.
        p_k = -(base_r + jnp.where(ok, new_u * v_dot_r, 0))
        half_t = state.t / 2
        y_next = jnp.where(backtrack, state.y_prev + half_t * state.p_prev, y_k + p_k)

        new_state = _BroydenState(
            u=u,
            v=v,
            count=count,
            y_prev=jnp.where(backtrack, state.y_prev, y_k),
            r_prev=jnp.where(backtrack, state.r_prev, r_k),
            p_prev=jnp.where(backtrack, state.p_prev, p_k),
            t=jnp.where(backtrack, half_t, jnp.ones_like(state.t)),
            has_prev=jnp.array(True),
            num_backtracks=state.num_backtracks + backtrack.astype(state.num_backtracks.dtype),
            progress=progress,
        )
        return self._next_y(y, y_next, progress), new_state, aux


Broyden.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance of the stopping rule (>= 0).
- `atol`: absolute tolerance of the stopping rule (>= 0).
- `norm`: a function `PyTree -> scalar` used by the stopping rule and in the
    statistics, e.g. `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `memory`: (>= 1) the number of rank-one pairs kept; the approximation restarts from
    `-beta I` when it is full.
- `beta`: in (0, 1]; the initial inverse Jacobian is `-beta I`, so the first step is a
    damped Picard step `y + beta g(y)`.
- `line_search`: backtrack on `||g||_2` (see above).
- `max_backtracks`: (>= 0) the most halvings of one step.
- `divergence_factor`: (> 1) declare divergence when a residual exceeds this multiple
    of the best one seen.
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
"""
