from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._validate import as_bool, as_int, check_bool, check_choice, check_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import (
    acc_dtype,
    dot,
    flatten_initial,
    init_progress,
    is_done,
    negligible,
    Progress,
    secant_scale,
)


class _BroydenState(eqx.Module):
    # H = gamma I + sum_i u_i v_i^T: the pairs as rows of `u`, `v` (`low_rank` is empty);
    # or, when the state is no larger than the memory, their sum as the matrix
    # `low_rank` (then `u`, `v` are empty; see `_summed`).
    u: Float[Array, "memory n"]
    v: Float[Array, "memory n"]
    low_rank: Float[Array, "n n"]
    count: Int[Array, ""]  # rank-one terms in use
    gamma: Scalar  # the scale of the initial inverse Jacobian, H_0 = gamma I
    y_prev: Float[Array, " n"]  # last accepted point
    r_prev: Float[Array, " n"]  # its residual
    p_prev: Float[Array, " n"]  # the quasi-Newton direction taken from it
    t: Scalar  # the step length along p_prev of the point being evaluated
    tries: Int[Array, ""]  # backtracks made along p_prev
    watching: Bool[Array, ""]  # the base point was accepted on trial (watchdog)
    y_anchor: Float[Array, " n"]  # the point before that step,
    r_anchor: Float[Array, " n"]  # its residual, of 2-norm
    norm_anchor: Scalar
    p_anchor: Float[Array, " n"]  # and -H g(y_anchor) with the H updated since
    has_prev: Bool[Array, ""]
    num_accepted: Int[Array, ""]  # accepted steps (the index j of eta_j)
    recent: Float[Array, " window"]  # ||g||_2 of the last `window` accepted points
    num_backtracks: Int[Array, ""]
    num_restarts: Int[Array, ""]  # line searches that failed (H reset to gamma I)
    progress: Progress


# The line search: sufficient decrease sigma, eta_j = _ETA / (j + 1)^2, and the
# non-monotone reference over the last _WINDOW accepted points.
_SIGMA = 1e-4
_ETA = 1.0
_WINDOW = 10


def _norm(a, acc):
    return jnp.sqrt(jnp.real(dot(a, a, acc)))


def _summed(memory: int, n: int) -> bool:
    """Whether the rank-one terms are kept summed, as one n x n matrix, rather than as
    `memory` pairs of n-vectors: when n <= memory. The iteration is the same (the sum
    restarts when the pairs would), and on such a state the matrix is no larger than
    the pairs and cheaper to apply: a product with it is n^2 multiply-adds against the
    pairs' 2 memory n. (On a tiny problem the pairs' work put a solve above the size
    below which XLA's CPU client runs it on the calling thread, which costs a thread
    hand-over per solve, several times the solve itself.)"""
    return n <= memory


def _apply(u, v, low_rank, valid, gamma, x, acc):
    """H x with H = gamma I + U^T diag(valid) V (plain products, no conjugation), or
    H = gamma I + low_rank when the terms are kept summed (`low_rank` not empty)."""
    if low_rank.size:
        return gamma * x + jnp.matmul(low_rank, x, preferred_element_type=acc).astype(x.dtype)
    # (w @ u, not u.T @ w: XLA would materialise the transpose of the buffer.)
    w = jnp.where(valid, jnp.matmul(v, x, preferred_element_type=acc), 0)
    return gamma * x + w.astype(x.dtype) @ u


def _apply_t(u, v, low_rank, valid, gamma, x, acc):
    """H^T x (the plain transpose, also for complex H)."""
    if low_rank.size:
        return gamma * x + jnp.matmul(x, low_rank, preferred_element_type=acc).astype(x.dtype)
    w = jnp.where(valid, jnp.matmul(u, x, preferred_element_type=acc), 0)
    return gamma * x + w.astype(x.dtype) @ v


class Broyden(AbstractFixedPointRootFinder[Y, Out, Aux, _BroydenState]):
    r"""Broyden's ("good") quasi-Newton method with a limited-memory inverse Jacobian,
    globalised by a non-monotone derivative-free line search.

    Solves $g(y) = 0$ (for `optx.fixed_point`, $g(y) = f(y) - y$). An approximation
    $H_k \approx J_g(y_k)^{-1}$ is kept as low-rank factors,
    $H_k = \gamma I + \sum_{i} u_i v_i^\top$, not as an $n \times n$ matrix (except
    on a state no larger than `memory`, $n \le$ `memory`, where the sum of the terms is
    kept instead: the same iteration, in less memory and fewer operations). Each step
    moves along the quasi-Newton direction $p_k = -H_k g(y_k)$,
    $y_{k+1} = y_k + t_k p_k$, and after the step the inverse is updated by the good
    Broyden (Sherman-Morrison) formula with $s = y_{k+1} - y_k$,
    $d = g(y_{k+1}) - g(y_k)$:

    $$H_{k+1} = H_k + \frac{(s - H_k d)\, s^* H_k}{s^* H_k d},$$

    i.e. one more pair $u = (s - H_k d)/(s^* H_k d)$, $v = H_k^\top \bar s$ ($s^*$ is
    the conjugate transpose: complex states are supported, for a complex-differentiable
    $g$). With `update="bad"`, Broyden's second ("bad") update is made instead,

    $$H_{k+1} = H_k + \frac{(s - H_k d)\, d^*}{d^* d},$$

    the least change of $H$ that satisfies the secant condition $H_{k+1} d = s$
    (SciPy's `broyden2`): $u = (s - H_k d)/(d^* d)$, $v = \bar d$, one application of
    the factors per step instead of two. Neither update wins everywhere: on this
    project's benchmark grid (linear, tanh, H-equation, Bratu and MNIST DEQ cells) the
    bad update never needed more evaluations and needed up to 14% fewer (linear
    problems with $\rho(W) = 0.99$: 91 against 106), but on SciPy's own `test_nonlin`
    problems it needs 99 evaluations on one (F5) where the good update needs 18; the good
    update is the default. An update with a vanishing (or non-finite) denominator is skipped. When
    `memory` pairs are in use the approximation restarts: the next update is made from
    $\gamma I$ (so memory is $2\,\mathrm{memory}\cdot n$).

    **Initial inverse Jacobian.** The first step, $y_1 = y_0 + \beta g(y_0)$, is a damped
    Picard step ($\gamma = -\beta$, the fixed-point convention). The first update
    rescales it from the problem: with the secant scale of the first accepted step,

    $$\hat\gamma = \frac{d^* s}{|d^* s|}\,\frac{\|s\|_2}{\|d\|_2}$$

    (the sign - the phase, for complex states - of $d^* s$, and the size
    $\|s\| / \|d\|$, the geometric mean of the two Barzilai-Borwein scales, which unlike
    $d^* s / d^* d$ stays meaningful when $s$ and $d$ are nearly orthogonal, as for an
    indefinite Jacobian), $\gamma = \hat\gamma$ unless $\hat\gamma$ has the sign of
    $-\beta$ and is less than $10 \beta$ in size, where $-\beta$ stays. So the
    convention is kept where it is right in sign and not far too short (on contractive
    DEQ maps nothing changes; a first step that the line search had to shorten says
    little about the other directions, e.g. on badly scaled problems), and replaced
    where the Jacobian has eigenvalues of the other sign (positive definite: $y + g(y)$
    expands) or a much smaller scale. Later, $\gamma$ is set to $\hat\gamma$ of the
    step itself whenever the line search had to shorten a quasi-Newton step below
    $t = 1/20$ (the approximation is then badly scaled: it restarts from
    $\hat\gamma I$) or gave up on a direction. Memory restarts keep $\gamma$.

    **Line search** (`line_search=True`, the default): Li and Fukushima's (2000)
    derivative-free non-monotone search. A trial point $y_k + t p_k$ is accepted when

    $$\|g(y_k + t p_k)\|_2 \le (1 + \eta_j)\, R_k - \sigma \|t p_k\|_2^2,
        \qquad \eta_j = \frac{1}{(j + 1)^2},\ \sigma = 10^{-4},$$

    with $j$ the number of steps accepted so far ($\sum_j \eta_j < \infty$) and the
    reference $R_k$ the largest $\|g\|_2$ of the last 10 accepted points
    (Grippo-Lampariello-Lucidi's non-monotone reference, as in La Cruz-Martinez-Raydan's
    DF-SANE; Li-Fukushima use $R_k = \|g(y_k)\|_2$). Otherwise the next step evaluates
    a shorter trial $y_k + t' p_k$, $t'$ the minimiser of the secant model
    $\|g(y_k) + (\tau / t)(g(y_k + t p_k) - g(y_k))\|_2$ clipped to $[t/10, t/2]$; after
    `max_backtracks` rejected trials the direction is abandoned (the approximation
    restarts from $\hat\gamma I$ of the last trial, and the next trial is
    $y_k - \gamma g(y_k)$). A quasi-Newton residual is not monotone - one bad step is
    usually repaired by the next - so a rejected full step from an accepted point is
    first accepted on trial (a watchdog, Chamberlain et al. 1982): $H$ is updated with
    it and the next full step is taken; if that one does not pass the test relative to
    the point before the trial step, the solve goes back there and searches along the
    direction of the updated $H$ (whose full step is the point just rejected, so it
    starts at the secant-model $t'$). On contractive (DEQ) maps the full step passes,
    so every step costs one evaluation as without a line search; every trial costs one
    evaluation, so `num_steps` always counts evaluations. `sol.state.num_backtracks`
    counts rejected trials, `sol.state.num_restarts` abandoned directions. With
    `line_search=False` every step is accepted.

    Cost per step beyond the evaluation of $g$: two applications of the factors
    ($H_k g(y_k)$ and $H_k^\top \bar s$, i.e. $4\,\mathrm{memory}\cdot n$ multiply-adds),
    with the factors updated in place. Scalar products are accumulated in at least
    float32, so float16 and bfloat16 states work (the iterates keep the dtype of `y`).
    Memory: $2\,\mathrm{memory}\cdot n + 8 n$ numbers. When $n \le$ `memory` the
    terms are kept summed as one $n \times n$ matrix (in the accumulation dtype):
    $3 n^2$ multiply-adds per step and $n^2 + 8n$ numbers. (On a problem of a few
    unknowns this keeps a whole solve small enough for XLA's CPU client to run it on
    the calling thread: a 4-unknown solve went from about 100 to 20 us.)

    It is a true quasi-Newton root finder: it also solves problems whose fixed-point
    map does not contract (where [`fixedpoint.Neumann`][] fails).

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][] (the
    residual norm is real, also for complex states). Divergence is declared when the
    residual stayed above `divergence_factor` x the best one for `divergence_patience`
    evaluations in a row, i.e. when backtracking could not bring it back: a transient
    rise of the residual is not failure.
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory: int = eqx.field(default=30, converter=as_int)
    beta: float = 1.0
    line_search: bool = eqx.field(default=True, converter=as_bool)
    max_backtracks: int = eqx.field(default=8, converter=as_int)
    divergence_factor: float = 1e4
    divergence_patience: int = eqx.field(default=10, converter=as_int)
    trace_length: int = eqx.field(default=0, converter=as_int)
    update: str = eqx.field(default="good", static=True)

    def __check_init__(self) -> None:
        check_choice("update", self.update, ("good", "bad"))
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
        dtype = y_flat.dtype
        acc = acc_dtype(dtype)
        summed = _summed(self.memory, n)
        zeros = jnp.zeros((0 if summed else self.memory, n), dtype)
        vec = jnp.zeros_like(y_flat)
        return _BroydenState(
            u=zeros,
            v=zeros,
            low_rank=jnp.zeros((n, n) if summed else (0, 0), acc),
            count=jnp.array(0),
            gamma=jnp.array(-self.beta, acc),
            y_prev=vec,
            r_prev=vec,
            p_prev=vec,
            t=jnp.array(1, jnp.finfo(acc).dtype),
            tries=jnp.array(0),
            watching=jnp.array(False),
            y_anchor=vec,
            r_anchor=vec,
            norm_anchor=jnp.array(0, jnp.finfo(acc).dtype),
            p_anchor=vec,
            has_prev=jnp.array(False),
            num_accepted=jnp.array(0),
            recent=jnp.zeros((_WINDOW,), jnp.finfo(acc).dtype),
            num_backtracks=jnp.array(0),
            num_restarts=jnp.array(0),
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
        acc = state.gamma.dtype
        real = state.t.dtype
        tiny = jnp.finfo(real).tiny
        # Relative size below which a denominator counts as vanishing.
        small = negligible(dtype)

        s = y_k - state.y_prev  # = t p_prev
        d = r_k - state.r_prev
        fit, fit_ok, cosine, _, s_s, d_d = secant_scale(s, d, acc, small)

        # Line search (Li-Fukushima), with a watchdog: is the trial point good enough?
        norm_k = _norm(r_k, acc)
        if self.line_search:
            eta = _ETA / (state.num_accepted.astype(real) + 1) ** 2
            reference = jnp.max(state.recent)
            good = norm_k <= (1 + eta) * reference - _SIGMA * s_s
            # While watching, the point must be good relative to the anchor (the
            # point before the step on trial), for the step from there.
            from_anchor = jnp.real(dot(y_k - state.y_anchor, y_k - state.y_anchor, acc))
            good_a = norm_k <= (1 + eta) * state.norm_anchor - _SIGMA * from_anchor
            good = jnp.where(state.watching, good_a, good)
            failed = state.has_prev & ~good & ~progress.converged
        else:
            failed = jnp.array(False)
        # A full step from an accepted point that fails the test is accepted on trial
        # (quasi-Newton residuals are not monotone: the next step usually recovers);
        # if the next one does not pass the test relative to the point before it, the
        # solve returns there and tries the direction of the updated H.
        on_trial = failed & ~state.watching & (state.tries == 0) & (state.num_accepted > 0)
        give_up = failed & state.watching  # back to the anchor
        rejected = failed & ~on_trial & ~give_up
        backtrack = rejected & (state.tries < self.max_backtracks)
        restart = rejected & ~backtrack
        accept = state.has_prev & ~failed
        update = accept | on_trial  # H is updated with (s, d)

        # The secant scale of the latest pair (above) is used for an update made from
        # the identity.
        full = state.count >= self.memory
        # A step the line search had to cut below 1/10 (not the first, blind one)
        # says that H is badly scaled: H restarts from the secant scale of that step.
        short = accept & (state.t < 0.05) & (state.num_accepted > 0)
        fresh = (state.count == 0) | full | short  # this update is made from gamma I
        # The first update: the fixed-point convention -beta I is kept unless the
        # secant scale has the other sign or calls for steps over 10 x longer.
        keep = (cosine < 0.1) & (jnp.abs(fit) < 10 * self.beta)
        first = update & (state.num_accepted == 0)
        gamma = jnp.where(first & fit_ok, jnp.where(keep, -self.beta, fit), state.gamma)
        gamma = jnp.where((restart | short) & fit_ok, fit, gamma)
        gamma_v = gamma.astype(dtype)

        # Good Broyden update of H with the accepted step. When the memory is full the
        # approximation restarts: the new pair is then computed from H = gamma I.
        # The low-rank factors are applied twice per step (H r_k and H^T s), not three
        # times: H d = H r_k - H r_prev = H r_k + p_prev, since p_prev = -H r_prev was
        # computed with this same H (nothing updates H in between), and the new
        # direction needs only H_new r_k = H r_k + u_new (v_new . r_k).
        valid = jnp.arange(self.memory) < state.count
        gamma_old = state.gamma.astype(dtype)
        h_r = _apply(state.u, state.v, state.low_rank, valid, gamma_old, r_k, acc)
        base_r = jnp.where(fresh, gamma_v * r_k, h_r)  # H_base r_k
        h_d = jnp.where(fresh, gamma_v * d, h_r + state.p_prev)  # H_base d
        if self.update == "good":
            conj_s = jnp.conj(s)
            new_v = jnp.where(
                fresh,
                gamma_v * conj_s,
                _apply_t(state.u, state.v, state.low_rank, valid, gamma_old, conj_s, acc),
            )
            denom = dot(s, h_d, acc)
            scale = jnp.sqrt(s_s) * _norm(h_d, acc)
        else:  # "bad" Broyden: H_new = H + (s - H d) d^* / (d^* d)
            new_v = jnp.conj(d)
            denom = d_d.astype(acc)
            scale = d_d
        ok = update & (jnp.abs(denom) > small * scale + tiny)
        v_dot_r = jnp.matmul(new_v, r_k, preferred_element_type=acc)
        ok = ok & jnp.isfinite(denom) & jnp.isfinite(v_dot_r)
        new_u = (s - h_d) / jnp.where(ok, denom, 1).astype(dtype)
        # The pair is written unconditionally into the first unused slot (slot 0 on a
        # restart) and counted only if the update is valid: an unused row may hold
        # anything, and no used row is ever read back (so XLA updates the buffers in
        # place, without copying them).
        # (A finished solve writes out of range: the write is dropped.)
        slot = jnp.where(frozen, self.memory, jnp.where(full | restart | short, 0, state.count))
        # (Masking both rows with `ok`, which depends on every read of both buffers,
        # orders those reads before the writes, so XLA need not copy the buffers.)
        u, v, low_rank = state.u, state.v, state.low_rank
        if low_rank.size:  # the same terms, summed: slot 0 starts a new sum
            add = ok & ~frozen
            kept = jnp.where(slot > 0, low_rank, 0)  # (a finished solve's slot is `memory`)
            low_rank = kept + jnp.outer(
                jnp.where(add, new_u, 0).astype(low_rank.dtype),
                jnp.where(add, new_v, 0).astype(low_rank.dtype),
            )
        else:
            u = u.at[slot].set(jnp.where(ok, new_u, 0), mode="drop")
            v = v.at[slot].set(jnp.where(ok, new_v, 0), mode="drop")
        count = jnp.where(frozen, state.count, jnp.where(ok, slot + 1, slot))

        # New direction from the new point (accepted, on trial, or the first one).
        p_k = -(base_r + jnp.where(ok, new_u * v_dot_r.astype(dtype), 0))
        p_k = jnp.where(state.has_prev, p_k, -gamma_v * r_k)
        # On trial, the direction to retry from the point before: -H_new g(y_prev),
        # with H_base g(y_prev) = -p_prev (or gamma g(y_prev) after a memory restart).
        v_dot_prev = jnp.matmul(new_v, state.r_prev, preferred_element_type=acc)
        base_prev = jnp.where(fresh, gamma_v * state.r_prev, -state.p_prev)
        p_retry = -(base_prev + jnp.where(ok, new_u * v_dot_prev.astype(dtype), 0))
        # A fresh direction -gamma g from the base point when the line search failed.
        p_restart = -gamma_v * state.r_prev
        # Backtracking factor: the minimiser of the secant model along the line.
        ratio = -jnp.real(dot(d, state.r_prev, acc)) / jnp.where(d_d > tiny, d_d, 1)
        ratio = jnp.where(jnp.isfinite(ratio), jnp.clip(ratio, 0.1, 0.5), 0.5)
        t_back = state.t * ratio.astype(real)
        one = jnp.ones_like(state.t)

        move = ~state.has_prev | accept | on_trial  # the new point becomes the base
        base_y = jnp.where(move, y_k, jnp.where(give_up, state.y_anchor, state.y_prev))
        base_g = jnp.where(move, r_k, jnp.where(give_up, state.r_anchor, state.r_prev))
        direction = jnp.where(
            move,
            p_k,
            jnp.where(give_up, state.p_anchor, jnp.where(restart, p_restart, state.p_prev)),
        )
        # After giving up on a step on trial, the retry from the anchor along the
        # direction of the updated H starts shorter: its full step is the point just
        # rejected (the secant condition H d = s makes them equal).
        # (With d_a = g(y_k) - g(y_anchor): -Re(d_a* g(y_anchor)) / |d_a|^2, from one
        # scalar product.)
        a_k = jnp.real(dot(state.r_anchor, r_k, acc))
        a_a = state.norm_anchor**2
        d_a_d_a = norm_k**2 - 2 * a_k + a_a
        ratio_a = (a_a - a_k) / jnp.where(d_a_d_a > tiny, d_a_d_a, 1)
        ratio_a = jnp.where(jnp.isfinite(ratio_a), jnp.clip(ratio_a, 0.1, 0.5), 0.5)
        t_next = jnp.where(backtrack, t_back, jnp.where(give_up, ratio_a.astype(real), one))
        y_next = base_y + t_next.astype(dtype) * direction
        anchor = on_trial  # remember the point before the step on trial
        # (||g(y_prev)||_2 of an accepted base point is the latest entry of `recent`.)
        norm_prev = state.recent[state.num_accepted % _WINDOW]
        new_state = _BroydenState(
            u=u,
            v=v,
            low_rank=low_rank,
            count=count,
            gamma=gamma,
            y_prev=base_y,
            r_prev=base_g,
            p_prev=direction,
            t=t_next,
            # A retried direction is not accepted on trial again.
            tries=jnp.where(backtrack, state.tries + 1, jnp.where(give_up, 1, 0)),
            watching=on_trial,
            y_anchor=jnp.where(anchor, state.y_prev, state.y_anchor),
            r_anchor=jnp.where(anchor, state.r_prev, state.r_anchor),
            norm_anchor=jnp.where(anchor, norm_prev, state.norm_anchor),
            p_anchor=jnp.where(anchor, p_retry, state.p_anchor),
            has_prev=jnp.array(True),
            num_accepted=state.num_accepted + accept.astype(state.num_accepted.dtype),
            recent=jnp.where(
                accept | ~state.has_prev,
                state.recent.at[
                    (state.num_accepted + accept.astype(state.num_accepted.dtype)) % _WINDOW
                ].set(norm_k.astype(real)),
                state.recent,
            ),
            num_backtracks=state.num_backtracks
            + (backtrack | give_up).astype(state.num_backtracks.dtype),
            num_restarts=state.num_restarts + restart.astype(state.num_restarts.dtype),
            progress=progress,
        )
        return self._next_y(y, y_next, progress), new_state, aux


Broyden.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance of the stopping rule (>= 0).
- `atol`: absolute tolerance of the stopping rule (>= 0).
- `norm`: a function `PyTree -> scalar` used by the stopping rule and in the
    statistics, e.g. `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `memory`: (>= 1) the number of rank-one pairs kept; the approximation restarts from
    `gamma I` when it is full. (On a state of at most `memory` numbers the pairs are
    kept summed, as described above; the iteration is the same.)
- `beta`: in (0, 1]; the initial inverse Jacobian is `-beta I`, so the first step is a
    damped Picard step `y + beta g(y)`; rescaled from the problem as described above.
- `line_search`: (default True) the non-monotone derivative-free line search above;
    False accepts every step.
- `max_backtracks`: (>= 0) the most shortened trials along one direction before it is
    abandoned.
- `divergence_factor`: (> 1) a residual above this multiple of the best one seen
    counts towards divergence.
- `divergence_patience`: (1 to 2**20) declare divergence after this many evaluations in a
    row with a residual above `divergence_factor` x the best (default 10: more than
    the backtracks along one direction, so that divergence means that backtracking
    did not bring the residual back).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
- `update`: `"good"` (default) or `"bad"`: which of Broyden's two updates of the
    inverse Jacobian is made (see above).
"""
