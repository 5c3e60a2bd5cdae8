from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._validate import as_int, check_bool, check_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import (
    acc_dtype,
    backtrack_factor,
    dot,
    flatten_initial,
    init_progress,
    is_done,
    keeps_picard_scale,
    negligible,
    Progress,
    secant_scale,
)


class _AndersonState(eqx.Module):
    dy: Float[Array, "m n"]  # ring buffer of differences y_{i+1} - y_i
    dr: Float[Array, "m n"]  # ring buffer of differences g(y_{i+1}) - g(y_i)
    gram: Float[Array, "m m"]  # conj(dr) @ dr.T (at least float32), one row and column per step
    count: Int[Array, ""]  # valid columns since the last restart (capped at m)
    index: Int[Array, ""]  # next ring slot to write
    y_prev: Float[Array, " n"]  # the last evaluated point
    r_prev: Float[Array, " n"]  # and its residual
    has_prev: Bool[Array, ""]
    from_best: Bool[Array, ""]  # the latest step was a restart from the best point
    num_restarts: Int[Array, ""]
    restart_t: Scalar  # the step factor of the latest restart (or first) step
    restart_best: Scalar  # the best residual norm when it was taken
    pending_restart: Bool[Array, ""]  # the point being evaluated is that step
    h0: Scalar  # the initial inverse-Jacobian estimate h0 I (-beta I, then rescaled)
    scaled: Bool[Array, ""]  # the history has had its first pair (h0 was scaled)
    progress: Progress


def _solve_hpd(a: Array, b: Array) -> Array:
    """Solve the small Hermitian positive definite system `a x = b` by Gauss-Jordan
    elimination without pivoting (stable for such matrices: every pivot is positive).

    A loop of `m` vectorised eliminations (a few fused operations each) instead of
    `jnp.linalg.solve`, whose LU factorisation is an opaque LAPACK call followed by a
    loop that turns its pivots into a permutation: pivoting is not needed here, and on
    small problems that machinery cost more than the rest of a step."""
    m = a.shape[0]
    ab = jnp.concatenate([a, b[:, None]], axis=1)
    rows = jnp.arange(m)

    def eliminate(k, ab):
        pivot_row = ab[k] / ab[k, k]
        factors = jnp.where(rows == k, 0, ab[:, k])
        ab = ab - factors[:, None] * pivot_row[None, :]
        return ab.at[k].set(pivot_row)

    return jax.lax.fori_loop(0, m, eliminate, ab)[:, m]


def _fused(m: int, n: int) -> bool:
    """Whether the history is combined in one fused pass over its valid rows (a large
    state, a short history) rather than by two products over zeroed rows: ~10% of
    the solver's own work in a DEQ forward pass (`benchmarks.deq_step`)."""
    return m <= 8 and n >= 2**12


def _combine(gamma: Array, dy: Array, dr: Array, h0: Array, valid: Array) -> Array:
    """``gamma @ (dy - h0 dr)`` over the `valid` rows (the others may hold anything
    when `_fused`, and are zero otherwise)."""
    if not _fused(*dy.shape):
        return gamma @ dy - h0 * (gamma @ dr)
    out = jnp.zeros_like(dy[0])
    for j in range(gamma.shape[0]):
        out = out + jnp.where(valid[j], gamma[j] * (dy[j] - h0 * dr[j]), 0)
    return out


def anderson_coefficients(
    gram: Float[Array, "m m"],
    dr_r: Float[Array, " m"],
    valid: Bool[Array, " m"],
    reg: Scalar,
) -> Float[Array, " m"]:
    r"""Solve the Tikhonov-regularised least-squares problem of Anderson mixing,

    $$\gamma = \arg\min_\gamma \|r - \Delta R^\top \gamma\|_2^2 + \lambda \|D\gamma\|_2^2,$$

    by its normal equations, given the (Hermitian) Gram matrix ``gram``
    $= \overline{\Delta R}\, \Delta R^\top$ and ``dr_r`` $= \overline{\Delta R}\, r$, with the
    columns of $\Delta R^\top$ scaled to unit norm ($D$ = diagonal of column norms), so
    that $\lambda$ is relative and the $m \times m$ system is well conditioned. The
    system (Hermitian positive definite: unit diagonal plus $\lambda$) is solved by
    Gauss-Jordan elimination in the dtype of ``gram`` promoted to at least float32, and
    $\gamma$ is returned in that dtype. Invalid (empty) columns get $\gamma_i = 0$; an
    all-empty or rank-deficient history never gives NaN (a non-finite solution is
    replaced by $\gamma = 0$, a plain step).
    """
    dtype = acc_dtype(gram.dtype)
    gram = gram.astype(dtype)
    diag = jnp.real(jnp.diagonal(gram))
    good = valid & (diag > jnp.finfo(dtype).tiny)
    # D^-1 (0 on empty columns, whose rows and columns of the system are then e_i,
    # so that their gamma_i = 0).
    inv = jnp.where(good, jax.lax.rsqrt(jnp.where(good, diag, 1)), 0).astype(dtype)
    i = jnp.arange(gram.shape[0])
    # (The entries of empty columns are zeroed, not scaled by 0: they may be anything.)
    gram = jnp.where(good[:, None] & good[None, :], gram, 0)
    system = (
        (gram * inv[:, None] * inv[None, :]).at[i, i].add(jnp.where(good, reg, 1).astype(dtype))
    )
    gamma = _solve_hpd(system, jnp.where(good, dr_r.astype(dtype), 0) * inv) * inv
    return jnp.where(jnp.isfinite(gamma), gamma, 0)


class Anderson(AbstractFixedPointRootFinder[Y, Out, Aux, _AndersonState]):
    r"""Anderson acceleration (type II, Walker and Ni 2011), as a root finder.

    For the root problem $g(y) = 0$ (for `optx.fixed_point`, $g(y) = f(y) - y$) write
    $r_k = g(y_k)$ and keep the last $m$ differences $\Delta y_i = y_{i+1} - y_i$,
    $\Delta r_i = r_{i+1} - r_i$ as the columns of $\Delta Y$, $\Delta R$. Each step
    solves the small regularised least-squares problem

    $$\gamma_k = \arg\min_\gamma \|r_k - \Delta R\,\gamma\|_2^2
        + \lambda \|D \gamma\|_2^2 \qquad (D = \operatorname{diag}\|\Delta r_i\|)$$

    and mixes

    $$y_{k+1} = y_k - h_0 r_k - (\Delta Y - h_0\,\Delta R)\,\gamma_k,$$

    where $h_0 I$ is the initial estimate of the inverse Jacobian of $g$ (Anderson
    mixing is a multisecant quasi-Newton method). It starts as $h_0 = -\beta$: then
    $y_{k+1} = (1-\beta)\bar y_k + \beta \bar f_k$ with the extrapolated
    $\bar y_k = y_k - \Delta Y \gamma_k$ and $\bar f_k = \bar y_k + r_k - \Delta R
    \gamma_k$, and with an empty history a step is a damped Picard step (see
    [`fixedpoint.Neumann`][]). On a linear problem it is equivalent to GMRES(m)-like
    Krylov acceleration. The least-squares problem is solved with its columns scaled to
    unit norm (see `anderson_coefficients`), in the dtype of `y` promoted to at least
    float32; the iterates keep the dtype of `y`.

    **Scaling from the problem:** the first pair of the history $(s, d)$ (the first
    step and the change of residual it made) rescales $h_0$ to the secant scale

    $$h_0 = \frac{d^* s}{|d^* s|}\,\frac{\|s\|_2}{\|d\|_2}$$

    (the sign - for complex states the phase - of $d^* s$ and the size $\|s\| / \|d\|$),
    unless `keeps_picard_scale`: it has the sign of $-\beta$ and is less than $10
    \beta$ in size (as on contractive maps). A restart step (below) that had to be
    shrunk below 1/20 before it was accepted rescales $h_0$ again from its own pair.

    **Adaptive mixing** (`adaptive_beta=True`, off by default): every later pair
    $(s, d)$ along which the map contracts ($\operatorname{Re}(d^* s) < 0$) sets
    $h_0 = -\max(\beta, \|s\|_2 / \|d\|_2)$: the Picard part of the step grows to
    the inverse of the contraction rate the newest pair measured (a Barzilai-Borwein
    step size), never below $\beta$. It helps on slowly contracting, nearly linear
    maps and can cost evaluations on root problems whose history already captures the
    slow directions (see the benchmarks page).

    **Periodic restart** (`periodic_restart=True`, off by default): a full history
    restarts instead of dropping its oldest pair, keeping only the newest one, so that it
    holds 1, 2, ..., m, 1, 2, ... pairs (restarted rather than windowed Anderson, cf.
    Henderson and Varadhan 2019): on a linear problem each cycle is a GMRES(m)-like
    minimisation over a fresh Krylov space.

    **Safeguard:** if the residual at a new iterate exceeds `safeguard_factor` times the
    best residual seen so far, the extrapolation is rejected: the history is cleared and
    the next iterate is a Picard step from the best point, $y_{best} - c\, h_0\,
    g(y_{best})$ (its residual is stored, so this costs no extra evaluation). $c = 1$,
    unless the best point has not improved since the previous restart: then $c$ is
    that restart's $c$ times the minimiser of the secant model
    $\|g(y_{best}) + (\tau / c)\,(g(y_{rej}) - g(y_{best}))\|_2$ clipped to
    $[1/10, 1/2]$ if the rejected point was that restart's step, else times 1/2 - a
    restart step that overshoots is backtracked, never repeated.
    `sol.state.num_restarts` counts the restarts.

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][], with one
    evaluation of $g$ per step. Divergence is declared when the residual stayed above
    `divergence_factor` x the best one for `divergence_patience` evaluations in a row:
    when the restarts could not bring it back.

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
    divergence_patience: int = eqx.field(default=10, converter=as_int)
    trace_length: int = eqx.field(default=0, converter=as_int)
    adaptive_beta: bool = False
    periodic_restart: bool = False

    def __check_init__(self) -> None:
        check_int("m", self.m, low=1)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)
        check_bool("adaptive_beta", self.adaptive_beta)
        check_bool("periodic_restart", self.periodic_restart)
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
        acc = acc_dtype(y_flat.dtype)
        real = jnp.finfo(acc).dtype
        return _AndersonState(
            dy=zeros,
            dr=zeros,
            gram=jnp.zeros((self.m, self.m), acc),
            count=jnp.array(0),
            index=jnp.array(0),
            y_prev=jnp.zeros_like(y_flat),
            r_prev=jnp.zeros_like(y_flat),
            has_prev=jnp.array(False),
            from_best=jnp.array(False),
            num_restarts=jnp.array(0),
            restart_t=jnp.array(1, real),
            restart_best=jnp.array(jnp.inf, jnp.finfo(y_flat.dtype).dtype),  # as the norms
            pending_restart=jnp.array(False),
            h0=jnp.array(-self.beta, acc),
            scaled=jnp.array(False),
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
        frozen = is_done(state.progress)  # a finished solve changes nothing (see is_done)
        y_k, r_k, aux, progress = self._evaluate(fn, y, args, state.progress)
        dtype, acc = y_k.dtype, state.gram.dtype

        # Safeguard: reject a point whose residual blew up; restart from the best.
        reject = (
            state.has_prev
            & (progress.residual_norm > self.safeguard_factor * state.progress.best_norm)
            & ~progress.converged
            & ~frozen
        )
        push = state.has_prev & ~reject & ~frozen  # the new pair enters the history

        # The secant pair of the step just taken (from the best point after a restart).
        s_k = y_k - jnp.where(state.from_best, state.progress.y_best, state.y_prev)
        d_k = r_k - jnp.where(state.from_best, state.progress.r_best, state.r_prev)
        dy, dr, gram, count, index = self._push(state, s_k, d_k, push, reject, frozen)
        fit, fit_ok, cosine, d_s, _, d_d = secant_scale(s_k, d_k, acc, negligible(dtype))
        h0 = self._rescale(state, fit, fit_ok, cosine, push)
        c, restart_t, restart_best = self._restart_length(state, progress, reject, d_s, d_d)

        # Mixing: y_next = y - h0 r - (dY - h0 dR) gamma, from the best point after a
        # restart (an empty history: a Picard step of length c).
        valid = jnp.arange(self.m) < count
        reg = jnp.maximum(
            jnp.asarray(self.regularisation, d_d.dtype),
            jnp.asarray(10 * jnp.finfo(dtype).eps, d_d.dtype),
        )
        gamma = anderson_coefficients(gram, dot(dr, r_k, acc), valid, reg).astype(dtype)
        h0_v = h0.astype(dtype)
        y_base = jnp.where(reject, progress.y_best, y_k)
        r_base = jnp.where(reject, progress.r_best, r_k)
        step = -h0_v * jnp.where(reject, c, 1).astype(dtype)
        y_next = y_base + step * r_base - _combine(gamma, dy, dr, h0_v, valid)

        first = ~state.has_prev  # the first step is a restart from y0 with c = 1
        new_state = _AndersonState(
            dy=dy,
            dr=dr,
            gram=gram,
            count=count,
            index=index,
            y_prev=y_k,
            r_prev=r_k,
            has_prev=jnp.array(True),
            from_best=reject,
            num_restarts=state.num_restarts + reject.astype(state.num_restarts.dtype),
            restart_t=restart_t,
            restart_best=restart_best,
            pending_restart=reject | first,
            h0=h0,
            scaled=state.scaled | push,
            progress=progress,
        )
        return self._next_y(y, y_next, progress), new_state, aux

    def _push(self, state, s_k, d_k, push, reject, frozen):
        """The history after this step: the pair `(s_k, d_k)` written into the ring
        slot `index` if `push`; an empty history after a restart (`reject`). The Gram
        matrix changes in row and column `index` only (one product with the history,
        accumulated in its dtype). A finished solve (`frozen`) keeps everything."""
        i = state.index
        if _fused(*state.dy.shape):  # (rows without a pair are ignored, see `_combine`)
            s_new, d_new = s_k, d_k
        else:  # (a zero row: no pair)
            s_new, d_new = jnp.where(push, s_k, 0), jnp.where(push, d_k, 0)
        # A finished solve writes out of range, and the writes are dropped (rather than
        # selected: keeps a tiny solve under XLA's inline threshold, benchmarks/test_costs.py).
        slot = jnp.where(frozen, self.m, i)
        dy = state.dy.at[slot].set(s_new, mode="drop")
        dr = state.dr.at[slot].set(d_new, mode="drop")
        gram_i = dot(dr, d_new, state.gram.dtype)
        gram = state.gram.at[slot].set(jnp.conj(gram_i), mode="drop")
        gram = gram.at[:, slot].set(gram_i, mode="drop")
        if self.periodic_restart:  # a full history keeps only the newest pair
            pushed = state.count % self.m + 1
        else:
            pushed = jnp.minimum(state.count + 1, self.m)
        count = jnp.where(reject, 0, jnp.where(push, pushed, state.count))
        index = jnp.where(reject, 0, jnp.where(push, (i + 1) % self.m, i))
        return dy, dr, gram, count, index

    def _rescale(self, state, fit, fit_ok, cosine, push):
        """The initial inverse-Jacobian estimate h0 after this step: the secant scale
        `fit` at the first pair of the history (unless `keeps_picard_scale`) and at the
        pair of a restart step that had to be shrunk below 1/20; with `adaptive_beta`,
        -max(beta, |s|/|d|) at every later pair along which the map contracts."""
        first_pair = push & ~state.scaled & ~keeps_picard_scale(cosine, fit, self.beta)
        short = push & state.scaled & state.pending_restart & (state.restart_t < 0.05)
        h0 = jnp.where((first_pair | short) & fit_ok, fit, state.h0)
        if self.adaptive_beta:
            grow = push & fit_ok & (cosine < 0) & state.scaled & ~state.pending_restart
            h0 = jnp.where(grow, -jnp.maximum(self.beta, jnp.abs(fit)), h0).astype(h0.dtype)
        return h0

    def _restart_length(self, state, progress, reject, d_s, d_d):
        """The length c of a restart's Picard step y_best - c h0 g(y_best), and the
        restart bookkeeping (`restart_t`, `restart_best`) after this step.

        c = 1 unless the best point has not improved since the latest restart: then
        that restart's step overshot and c shrinks (backtracking, so that no rejected
        point is evaluated again): by `backtrack_factor` of the secant model along the
        Picard line when the rejected point is that step itself, else by 1/2. (That
        step is s = -c h0 r_best, so the model's minimiser -Re(d* r_best) / |d|^2 is
        Re(d* s / (c h0)) / |d|^2.)"""
        real = state.restart_t.dtype
        c_h0 = state.restart_t.astype(d_s.dtype) * state.h0
        ratio = backtrack_factor(jnp.real(d_s / jnp.where(c_h0 != 0, c_h0, 1)), d_d)
        ratio = jnp.where(state.pending_restart, ratio, 0.5).astype(real)
        stuck = progress.best_norm >= state.restart_best
        c = jnp.where(stuck, state.restart_t * ratio, jnp.ones_like(ratio))
        first = ~state.has_prev
        restart_t = jnp.where(reject, c, jnp.where(first, 1, state.restart_t)).astype(real)
        restart_best = jnp.where(reject | first, progress.best_norm, state.restart_best)
        return c, restart_t, restart_best


Anderson.__init__.__doc__ = """**Arguments:**

- `rtol`: relative tolerance of the stopping rule (>= 0).
- `atol`: absolute tolerance of the stopping rule (>= 0).
- `norm`: a function `PyTree -> scalar` used by the stopping rule and in the
    statistics, e.g. `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `m`: history size (>= 1): how many past differences the extrapolation uses.
- `beta`: mixing (damping) parameter in (0, 1]: the initial inverse-Jacobian estimate
    is `-beta I` (1 mixes in the full map value; as for [`fixedpoint.Neumann`][], the
    weight of the new map value: `1 - damp` in optimistix's terms), rescaled from the
    problem as described above.
- `regularisation`: (>= 0) relative Tikhonov regularisation of the least-squares
    problem (floored at 10 x machine epsilon of the working dtype).
- `safeguard_factor`: (> 1) restart from the best iterate when a residual exceeds this
    multiple of the best residual seen.
- `divergence_factor`: (> 1) a residual above this multiple of the best one seen
    counts towards divergence (keep it above `safeguard_factor`).
- `divergence_patience`: (1 to 2**20) declare divergence after this many evaluations in a
    row with a residual above `divergence_factor` x the best (default 10: the
    restarts in between shrink the step by at least 2 each).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
- `adaptive_beta`: (bool, default False) adapt the mixing to the contraction rate of
    the newest secant pair at every step, as described above.
- `periodic_restart`: (bool, default False) restart the history when it is full,
    keeping its newest pair, instead of dropping its oldest pair, as described above.
"""
