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
    dot,
    flatten_initial,
    init_progress,
    is_done,
    LARGE_STATE,
    negligible,
    Progress,
    rarely,
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


def _rows_zeroed(m: int, n: int) -> bool:
    """Whether the history rows of a step that does not push a pair (the first step, a
    restart) are written as zeros. On a large state with a short history they are
    written as they are, and ignored: `_combine` reads only the valid rows, in a
    single fused pass; a select per row would cost a pass over the state."""
    return m > 8 or n < LARGE_STATE


def _combine(gamma: Array, dy: Array, dr: Array, h0: Array, valid: Array) -> Array:
    """``gamma @ (dy - h0 dr)`` over the `valid` rows. As two vector-matrix products
    when the invalid rows are zero (see `_rows_zeroed`); else as one elementwise
    expression over the rows, which XLA fuses with the rest of the update into a
    single pass over both buffers, skipping the invalid rows (which may hold anything,
    also non-finite values)."""
    if _rows_zeroed(*dy.shape):
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
    unit norm, by the normal equations plus $\lambda$ (relative Tikhonov
    regularisation, floored at 10 x the dtype's machine epsilon), Hermitian for complex
    states, in the dtype of `y` promoted to at least float32 (float16 and bfloat16
    states work; the iterates keep the dtype of `y`); empty or collinear history
    columns cannot give NaN.

    **Scaling from the problem:** the first pair of the history $(s, d)$ (the first
    step and the change of residual it made) rescales $h_0$ to the secant scale

    $$h_0 = \frac{d^* s}{|d^* s|}\,\frac{\|s\|_2}{\|d\|_2}$$

    (the sign - for complex states the phase - of $d^* s$ and the size $\|s\| / \|d\|$,
    which stays meaningful when $s$ and $d$ are nearly orthogonal, as for an indefinite
    Jacobian), unless that has the sign of $-\beta$ and is less than $10 \beta$ in
    size: then the fixed-point convention $h_0 = -\beta$ stays (on contractive DEQ maps
    nothing changes). On a root problem whose Jacobian has eigenvalues of the other
    sign (e.g. positive definite: $y + g(y)$ expands) or a much larger scale, the
    Picard direction $-h_0 g$ is then a sensible one. Later, a restart step (below)
    that had to be shrunk below 1/20 before it was accepted rescales $h_0$ again from
    its own pair (the steps were far too long).

    **Adaptive mixing** (`adaptive_beta=True`, off by default): every later pair
    $(s, d)$ along which the map contracts ($\operatorname{Re}(d^* s) < 0$) sets
    $h_0 = -\max(\beta, \|s\|_2 / \|d\|_2)$: the Picard part of the step grows to
    the inverse of the contraction rate the newest pair measured (a Barzilai-Borwein
    step size), never below $\beta$. On slowly contracting, nearly linear maps it cuts
    the evaluations (on the benchmark grid, `m = 5`: linear maps of spectral radius
    0.9 / 0.99, 49 / 152 against 72 / 403; the MNIST DEQ cells 69 / 30 against 70 / 32
    with 4 digits, equal with 32), at three scalar products per step; on root problems
    whose history already captures the slow directions it costs evaluations
    (Chandrasekhar's H-equation with c = 0.99: 18 against 11; Bratu's problem: 11
    against 9), which is why it is off by default.

    **Periodic restart** (`periodic_restart=True`, off by default): a full history
    restarts instead of dropping its oldest pair, keeping only the newest one, so that it
    holds 1, 2, ..., m, 1, 2, ... pairs (restarted rather than windowed Anderson, cf. the
    restarts of Henderson and Varadhan 2019). On a linear problem that makes each cycle
    a GMRES(m)-like minimisation over a fresh Krylov space, where a window mixes pairs
    from different cycles. On the benchmark grid (`m = 5`, same memory) it needs 42 /
    95 evaluations against 72 / 403 on the symmetric linear maps of spectral radius
    0.9 / 0.99 (n = 100; 42 / 129 against 66 / 462 with n = 1,000), and as many or
    fewer on the other problems (up to 3 fewer on tanh cells, 1 on Bratu's problem), but
    2 more on the trained MNIST DEQ cell with 32 digits (39 against 37) and 27 against
    20 on SciPy's test problem F5, which is why it is off by default.

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

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][]: stop when
    `norm(g(y) / (atol + rtol * |y|)) < 1`; `nonfinite`, `nonlinear_divergence` and
    `nonlinear_max_steps_reached` are reported and what is returned on failure is as
    described there; exactly one evaluation of $g$ per step;
    `sol.stats["residual_norm"]` (real, also for complex states) and, with
    `trace_length > 0`, `sol.stats["residual_trace"]`. Divergence is declared when the
    residual stayed above `divergence_factor` x the best one for `divergence_patience`
    evaluations in a row, i.e. when the restarts (each shrinking the step) could not
    bring it back: a transient rise of the residual, which the safeguard handles, is
    not failure.

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

    def _last_evaluated(self, state: _AndersonState) -> tuple[Array, Array] | None:
        # The best point is kept lazily on large states only (see `LARGE_STATE`).
        if state.y_prev.size < LARGE_STATE:
            return None
        return state.y_prev, state.r_prev

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
        last = self._last_evaluated(state)
        y_k, r_k, aux, progress = self._evaluate(fn, y, args, state.progress, last)
        dtype = y_k.dtype
        acc = state.gram.dtype
        real = state.restart_t.dtype
        # (jnp, not Python's max: `regularisation` may be traced.)
        reg = jnp.maximum(
            jnp.asarray(self.regularisation, real), jnp.asarray(10 * jnp.finfo(dtype).eps, real)
        )

        # Safeguard: reject a point whose residual blew up; restart from the best.
        reject = (
            state.has_prev
            & (progress.residual_norm > self.safeguard_factor * best_before)
            & ~progress.converged
            & ~frozen
        )

        # The step just taken started from the point evaluated before, or from the best
        # point if it was a restart. Then `y_best`, `r_best` were up to date, and still
        # are when the best point is kept lazily: a step after a restart does not write
        # them (see `update_progress`; read after the update, they need no copy).
        # Selects that XLA fuses into the differences.
        best = progress if last is not None else state.progress
        s_k = y_k - jnp.where(state.from_best, best.y_best, state.y_prev)
        d_k = r_k - jnp.where(state.from_best, best.r_best, state.r_prev)

        # Accepted point: push the new differences into the ring buffer. When not
        # pushing (first step or restart) the history is empty afterwards: the row is
        # zeroed, or written as it is and ignored (see `_rows_zeroed`).
        push = state.has_prev & ~reject & ~frozen
        if _rows_zeroed(self.m, y_k.size):
            s_new = jnp.where(push, s_k, 0)
            d_new = jnp.where(push, d_k, 0)
        else:
            s_new, d_new = s_k, d_k
        i = state.index
        # (A finished solve writes out of range: the write is dropped.)
        slot = jnp.where(frozen, self.m, i)
        dy = state.dy.at[slot].set(s_new, mode="drop")
        dr = state.dr.at[slot].set(d_new, mode="drop")
        if self.periodic_restart:
            # A full history restarts: the new pair (written over the oldest, in slot
            # 0, where a full ring's index is) is all it keeps.
            pushed = state.count % self.m + 1
        else:
            pushed = jnp.minimum(state.count + 1, self.m)
        count = jnp.where(reject, 0, jnp.where(push, pushed, state.count))
        index = jnp.where(reject, 0, jnp.where(push, (state.index + 1) % self.m, state.index))

        # The initial inverse-Jacobian estimate h0 I (h0 = -beta: the Picard step
        # y + beta g) is rescaled from the problem at the first pair of the history,
        # unless the secant scale agrees in sign with -beta and is less than 10 beta
        # in size; and again from the pair of a restart step that had to be shrunk
        # below 1/20 before it was accepted (such steps were far too long).
        # (Only needed at the first pair and on the step after a restart: on a large
        # state skipped otherwise, see `rarely`; on a small one its three scalar
        # products cost less than the conditional, which also takes longer to compile.)
        def secant():
            return secant_scale(s_k, d_k, acc, negligible(dtype))

        def no_secant():
            zero = jnp.zeros((), real)
            return state.h0, jnp.array(False), zero, jnp.zeros((), acc), zero, zero

        if self.adaptive_beta or y_k.size < LARGE_STATE:  # (at every step)
            fit, fit_ok, cosine, d_s, _, d_d = secant()
        else:
            fit, fit_ok, cosine, d_s, _, d_d = rarely(
                state.pending_restart | ~state.scaled, secant, no_secant
            )
        keep = (cosine < 0.1) & (jnp.abs(fit) < 10 * self.beta)
        first_pair = push & ~state.scaled & ~keep
        short = push & state.scaled & state.pending_restart & (state.restart_t < 0.05)
        h0 = jnp.where((first_pair | short) & fit_ok, fit, state.h0)
        if self.adaptive_beta:
            # A later pair with Re(d* s) < 0 (the map contracts along it) sets the
            # mixing to beta_k = max(beta, |s| / |d|), i.e. h0 = -beta_k.
            grow = push & fit_ok & (cosine < 0) & state.scaled & ~state.pending_restart
            h0 = jnp.where(grow, -jnp.maximum(self.beta, jnp.abs(fit)), h0).astype(h0.dtype)
        h0_v = h0.astype(dtype)

        # Base point of the mixing step: the new point, or the best one on restart,
        # from where a restart takes the Picard step y_best - c h0 g(y_best).
        # c = 1 unless the best point has not improved since the latest restart: then
        # that restart's step overshot (it, or the extrapolations after it, blew up),
        # and c shrinks - by the minimiser of the secant model of g along the Picard
        # line, clipped to [1/10, 1/2], when the rejected point is that step itself,
        # else by 1/2 - so that no rejected point is evaluated again (backtracking).
        # (That step is s = -c h0 r_best from y_best, so the secant-model
        # minimiser -Re(d* r_best) / |d|^2 is Re(d* s / (c h0)) / |d|^2.)
        c_h0 = state.restart_t.astype(acc) * state.h0
        ratio = jnp.real(d_s / jnp.where(c_h0 != 0, c_h0, 1)) / jnp.where(d_d > 0, d_d, 1)
        ratio = jnp.where(
            state.pending_restart & jnp.isfinite(ratio), jnp.clip(ratio, 0.1, 0.5), 0.5
        ).astype(real)
        stuck = progress.best_norm >= state.restart_best
        c = jnp.where(stuck, state.restart_t * ratio, jnp.ones_like(ratio))
        first = ~state.has_prev  # the first step is a restart from y0 with c = 1
        new_restart = reject | first
        restart_t = jnp.where(reject, c, jnp.where(first, 1, state.restart_t)).astype(real)
        restart_best = jnp.where(new_restart, progress.best_norm, state.restart_best)
        # Only row/column i of the (Hermitian) Gram matrix changes: one matrix-vector
        # product (m n) per step instead of a matrix product (m^2 n); accumulated in
        # at least float32. (With the new column as written, not read back from the
        # buffer: a gather per step less. Two products, not one with a two-column
        # right-hand side, which XLA's CPU backend runs ten times slower.)
        gram_i = dot(dr, d_new, acc)
        gram = (
            state.gram.at[slot]
            .set(jnp.conj(gram_i), mode="drop")
            .at[:, slot]
            .set(gram_i, mode="drop")
        )
        valid = jnp.arange(self.m) < count
        # (After a restart the history is empty and gamma = 0: r_k is the right-hand
        # side also then.)
        gamma = anderson_coefficients(gram, dot(dr, r_k, acc), valid, reg)
        gamma = gamma.astype(dtype)
        step = -h0_v * jnp.where(reject, c, 1).astype(dtype)
        # On a reject the new point is not the best, so `y_best`, `r_best` are up to
        # date (see `update_progress`); the selects are fused into the mixing.
        y_base = jnp.where(reject, progress.y_best, y_k)
        r_base = jnp.where(reject, progress.r_best, r_k)
        y_next = y_base + step * r_base - _combine(gamma, dy, dr, h0_v, valid)

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
            pending_restart=new_restart,
            h0=h0,
            scaled=state.scaled | push,
            progress=progress,
        )
        return self._next_y(y, y_next, progress), new_state, aux


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
