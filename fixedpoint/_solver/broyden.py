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
    keeps_picard_scale,
    negligible,
    Progress,
    ravel,
    secant_scale,
    unravel_like,
)
from ._linesearch import advance, decide, init_search, SearchState, two_norm


class _BroydenState(eqx.Module):
    # H = gamma I + sum_i u_i v_i^T over the first `count` rows of `u`, `v`; or, when
    # `_summed`, gamma I + low_rank (then `u`, `v` are empty). With
    # `jacobian="exact"`, H = low_rank itself (dense; `gamma` is the fallback scale)
    # and `count` the updates since H was last restarted.
    u: Float[Array, "memory n"]
    v: Float[Array, "memory n"]
    low_rank: Float[Array, "n n"]
    count: Int[Array, ""]
    gamma: Scalar
    search: SearchState  # its base point y_b and direction p = -H g(y_b)
    progress: Progress
    # `jacobian="exact"` only (None otherwise): H = J_g(y_b)^{-1} with no update since
    # (p is the Newton direction from y_b), and the Jacobian-vector products so far.
    newton: Bool[Array, ""] | None = None
    jvps: Int[Array, ""] | None = None

    @property
    def num_jvps(self) -> Int[Array, ""]:
        return jnp.array(0) if self.jvps is None else self.jvps

    @property
    def num_backtracks(self) -> Int[Array, ""]:
        return self.search.num_backtracks

    @property
    def num_restarts(self) -> Int[Array, ""]:
        return self.search.num_restarts


def _summed(memory: int, n: int) -> bool:
    """Whether the rank-one terms are kept summed, as one n x n matrix (same iteration)."""
    # benchmarks/costs.py, 4-unknown solve: about 30 us summed, 110 to 160 us as pairs.
    return n <= memory


def _apply(u, v, low_rank, valid, gamma, x, acc):
    """H x (plain products, no conjugation)."""
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


def _dense(h, x, acc):
    """H x for a dense H (of dtype `acc`)."""
    return jnp.matmul(h, x, preferred_element_type=acc).astype(x.dtype)


def _dense_t(h, x, acc):
    """H^T x for a dense H (the plain transpose)."""
    return jnp.matmul(x, h, preferred_element_type=acc).astype(x.dtype)


_STEP_BOUND = 100  # (MINPACK's initial trust radius, 100 |y_0|)


def _bounded(p, y, acc):
    """`p` shortened to 2-norm at most ``_STEP_BOUND max(|y|_2, 1)``."""
    bound = _STEP_BOUND * jnp.maximum(two_norm(y, acc), 1)
    size = two_norm(p, acc)
    return p * jnp.where(size > bound, bound / size, 1).astype(p.dtype)


def _good_update(s, d, h_d, s_s, d_d, h_t, acc):
    """H + (s - H d) s^* H / (s^* H d): returns v = H^T conj(s), s^* H d and the scale
    |s| |H d| of that denominator (`h_t` applies H^T)."""
    del d, d_d
    return h_t(jnp.conj(s)), dot(s, h_d, acc), jnp.sqrt(s_s) * two_norm(h_d, acc)


def _bad_update(s, d, h_d, s_s, d_d, h_t, acc):
    """H + (s - H d) d^* / (d^* d): returns v = conj(d), d^* d and its scale."""
    del s, h_d, s_s, h_t
    return jnp.conj(d), d_d.astype(acc), d_d


_UPDATES = {"good": _good_update, "bad": _bad_update}


def _store(state, slot, ok, frozen, new_u, new_v):
    """The factors with the pair in row `slot` (0 starts a new sum), zeroed unless `ok`.
    Written unconditionally (no used row is read back) and masked with `ok`, which
    orders every read of the buffers first: XLA updates them in place. A finished
    solve's slot, `memory`, is out of range: the write is dropped."""
    u, v, low_rank = state.u, state.v, state.low_rank
    if low_rank.size:
        add = ok & ~frozen
        kept = jnp.where(slot > 0, low_rank, 0)
        low_rank = kept + jnp.outer(
            jnp.where(add, new_u, 0).astype(low_rank.dtype),
            jnp.where(add, new_v, 0).astype(low_rank.dtype),
        )
    else:
        u = u.at[slot].set(jnp.where(ok, new_u, 0), mode="drop")
        v = v.at[slot].set(jnp.where(ok, new_v, 0), mode="drop")
    return u, v, low_rank


class Broyden(AbstractFixedPointRootFinder[Y, Out, Aux, _BroydenState]):
    r"""Broyden's quasi-Newton method with a limited-memory inverse Jacobian, globalised
    by a non-monotone derivative-free line search.

    Solves $g(y) = 0$ (for `optx.fixed_point`, $g(y) = f(y) - y$). It keeps
    $H \approx J_g^{-1}$ as $H = \gamma I + \sum_i u_i v_i^\top$, at most `memory`
    pairs, and moves along $p_k = -H g(y_k)$: $y_{k+1} = y_k + t_k p_k$. With
    $s = y_{k+1} - y_k$ and $d = g(y_{k+1}) - g(y_k)$ the update adds one pair:

    - `update="good"` (Broyden's first method, by Sherman-Morrison):
      $$H_+ = H + \frac{(s - H d)\, s^* H}{s^* H d};$$
    - `update="bad"` (the second, SciPy's `broyden2`; the least change with
      $H_+ d = s$): $$H_+ = H + \frac{(s - H d)\, d^*}{d^* d}.$$

    ($s^*$: conjugate transpose; complex $g$ must be complex-differentiable.) An update
    with a vanishing or non-finite denominator is skipped; with `memory` pairs in use,
    $H$ restarts from $\gamma I$.

    **Scale.** Initially $\gamma = -\beta$: the first step $y_1 = y_0 + \beta g(y_0)$
    is a damped Picard step. The first update replaces it by the secant scale

    $$\hat\gamma = \frac{d^* s}{|d^* s|}\,\frac{\|s\|_2}{\|d\|_2}$$

    unless $\mathrm{Re}(d^* s) < \|d\| \|s\| / 10$ and $|\hat\gamma| < 10 \beta$. Later
    $\gamma = \hat\gamma$ of a step that the line search cut below $t = 1/20$ (then $H$
    restarts from $\hat\gamma I$) or after which it abandons a direction.

    **Line search** (`line_search=True`): Li and Fukushima's (2000) non-monotone test.
    A trial $y_k + t p_k$ is accepted when

    $$\|g(y_k + t p_k)\|_2 \le (1 + \eta_j)\, R_k - \sigma \|t p_k\|_2^2,
        \qquad \eta_j = \frac{1}{(j + 1)^2},\ \sigma = 10^{-4},$$

    $j$ the number of accepted points and $R_k$ the largest $\|g\|_2$ of the last 10.
    Otherwise the next trial is $y_k + t' p_k$, $t'$ the minimiser of the secant model
    $\|g(y_k) + (\tau / t)(g(y_k + t p_k) - g(y_k))\|_2$ clipped to $[t/10, t/2]$;
    after `max_backtracks` rejected trials the direction is abandoned: $H$ restarts
    from $\hat\gamma I$ and the next trial is $y_k - \gamma g(y_k)$. A rejected full
    step from an accepted point is first accepted on trial (a watchdog, Chamberlain
    et al. 1982): $H$ is updated with it and the next full step is taken; if that one
    fails the test against the point before the trial step, the search returns there
    along the direction of the updated $H$, from the secant-model $t'$. Every trial is
    one evaluation, so `num_steps` counts evaluations; `sol.state.num_backtracks`
    counts rejected trials, `sol.state.num_restarts` abandoned directions.

    **Cost** per step beyond the evaluation: $H g(y_k)$ and (good update) $H^\top \bar s$,
    $4\,\mathrm{memory}\cdot n$ multiply-adds; memory $2\,\mathrm{memory}\cdot n + 8 n$
    numbers (for $n \le$ `memory` an $n \times n$ sum instead of the pairs). Scalar
    products accumulate in at least float32 (float16 and bfloat16 states work).

    **Exact Jacobians** (`jacobian="exact"`): $H$ restarts from $J_g(y)^{-1}$ instead of
    $\gamma I$, $J_g(y)$ formed by $n$ forward-mode products $J_g e_i$ (`jax.jvp`;
    $n$ the size of the flattened state; $H$ is then kept as a dense $n \times n$
    matrix whatever `memory`): at $y_0$ (so the first step is Newton's, and may be
    accepted on trial), at an accepted point reached by a step the line search cut
    ($t < 1$) or with `memory` updates made since the last restart, and at the base
    point of a restart, unless the abandoned direction was already the Newton direction
    from there (then $\hat\gamma I$, as without the option). No update is made at a
    restart. A $J_g$ whose smallest singular value is not above $10 n \epsilon$ times
    its largest (or not finite) gives $\gamma I$ instead. Every direction is shortened
    to at most $100 \max(\|y\|_2, 1)$ in 2-norm, $y$ the point it starts from, and a
    return to the point before a step on trial follows the Newton direction when that
    step was one. `sol.stats["num_jvps"]` counts the products (0 without the option);
    cost $O(n^3)$ per Jacobian, for small states.

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][] (which,
    unlike this method, needs a contraction); divergence is a residual above
    `divergence_factor` x the best for `divergence_patience` evaluations in a row.
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
    jacobian: str = eqx.field(default="identity", static=True)

    def __check_init__(self) -> None:
        check_choice("update", self.update, ("good", "bad"))
        check_choice("jacobian", self.jacobian, ("identity", "exact"))
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
        acc = acc_dtype(y_flat.dtype)
        exact = self.jacobian == "exact"
        summed = exact or _summed(self.memory, n)
        zeros = jnp.zeros((0 if summed else self.memory, n), y_flat.dtype)
        return _BroydenState(
            u=zeros,
            v=zeros,
            low_rank=jnp.zeros((n, n) if summed else (0, 0), acc),
            count=jnp.array(0),
            gamma=jnp.array(-self.beta, acc),
            search=init_search(y_flat),
            progress=init_progress(y_flat, self.trace_length),
            newton=jnp.array(False) if exact else None,
            jvps=jnp.array(0) if exact else None,
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
        exact = self.jacobian == "exact"
        frozen = is_done(state.progress)  # a finished solve changes nothing (see is_done)
        y_k, r_k, aux, progress = self._evaluate(fn, y, args, state.progress)
        dtype, acc, search = y_k.dtype, state.gamma.dtype, state.search
        small = negligible(dtype)  # relative size of a vanishing denominator
        tiny = jnp.finfo(search.t.dtype).tiny

        # The secant pair of the step from the base point y_b, and the line search.
        s = y_k - search.y  # = t p
        d = r_k - search.r
        fit, fit_ok, cosine, _, s_s, d_d = secant_scale(s, d, acc, small)
        norm_k = two_norm(r_k, acc)
        decision = decide(
            search,
            y_k,
            norm_k,
            s_s,
            progress.converged,
            finished=frozen,
            enabled=self.line_search,
            max_backtracks=self.max_backtracks,
            watch_first=exact,  # (an exact first step is a Newton step, not a guess)
        )

        # The update starts from H_base = gamma I (`fresh`) on the first update, when the
        # memory is full, and after a step cut below t = 1/20 (H is badly scaled).
        full = state.count >= self.memory
        short = decision.accept & (search.t < 0.05) & (search.num_accepted > 0)
        fresh = (state.count == 0) | full | short
        first = decision.moves & (search.num_accepted == 0)
        keep = keeps_picard_scale(cosine, fit, self.beta)
        gamma = jnp.where(first & fit_ok, jnp.where(keep, -self.beta, fit), state.gamma)
        gamma = jnp.where((decision.restart | short) & fit_ok, fit, gamma)
        gamma_v = gamma.astype(dtype)
        newton, jvps = state.newton, state.jvps
        if exact:
            assert newton is not None and jvps is not None  # (set by `init`)
            # H restarts from J_g^{-1} at a new base point: the first one, one reached with
            # the memory full or by a step the line search cut, and the base point of a
            # restart, unless the abandoned direction was already Newton's from there
            # (then, as without the option, from gamma I). A J_g^{-1} that is not finite
            # leaves gamma I.
            cut = decision.accept & (search.t < 1) & (search.num_accepted > 0)
            renew = (~search.started | (decision.moves & (full | cut))) & ~frozen
            at_base = decision.restart & ~newton
            again = renew | at_base
            point = jnp.where(at_base, search.y, y_k)
            jac_inv, jac_ok = self._inverse_jacobian(fn, y, args, point, again, acc)
            eye_gamma = gamma * jnp.eye(r_k.size, dtype=acc)
            h_old = state.low_rank
            h_restart = jnp.where(again & jac_ok, jac_inv, eye_gamma)
            restart = again | decision.restart
            h_base = jnp.where(restart, h_restart, h_old)

            # The update of H_old, when the step is taken from the same H.
            h_d = _dense(h_old, d, acc)
            new_v, denom, scale = _UPDATES[self.update](
                s, d, h_d, s_s, d_d, lambda x: _dense_t(h_old, x, acc), acc
            )
            new_u = (s - h_d) / jnp.where(denom != 0, denom, 1).astype(dtype)
            ok = decision.moves & ~renew & (jnp.abs(denom) > small * scale + tiny)
            ok = ok & jnp.isfinite(denom) & jnp.all(jnp.isfinite(new_u))
            ok = ok & jnp.all(jnp.isfinite(new_v))
            u, v = state.u, state.v
            low_rank = h_base + jnp.outer(
                jnp.where(ok, new_u, 0).astype(acc), jnp.where(ok, new_v, 0).astype(acc)
            )
            count = jnp.where(restart, 0, state.count) + ok.astype(state.count.dtype)
            left = restart | decision.moves | decision.give_up  # a new H or base point
            newton_new = jnp.where(again, jac_ok, jnp.where(left, False, newton))
            jvps = jvps + jnp.where(again, r_k.size, 0).astype(state.count.dtype)

            # Directions -H_new g from y_k and from y_b (a restart; a return there after
            # a step on trial, along the Newton direction if p was one), bounded.
            p_k = _bounded(-_dense(low_rank, r_k, acc), y_k, acc)
            p_restart = _bounded(-_dense(low_rank, search.r, acc), search.y, acc)
            p_retry = jnp.where(newton, search.p, p_restart)
            newton = newton_new
        else:
            # H_base r_k and H_base d; H d = H r_k + p, as p = -H g(y_b) with this same H.
            valid = jnp.arange(self.memory) < state.count
            gamma_old = state.gamma.astype(dtype)
            h_r = _apply(state.u, state.v, state.low_rank, valid, gamma_old, r_k, acc)
            base_r = jnp.where(fresh, gamma_v * r_k, h_r)
            h_d = jnp.where(fresh, gamma_v * d, h_r + search.p)

            def base_t(x):  # H_base^T x
                h_t = _apply_t(state.u, state.v, state.low_rank, valid, gamma_old, x, acc)
                return jnp.where(fresh, gamma_v * x, h_t)

            # H_new = H_base + new_u new_v^T, if the step is taken and the update is sound.
            new_v, denom, scale = _UPDATES[self.update](s, d, h_d, s_s, d_d, base_t, acc)
            v_dot_r = jnp.matmul(new_v, r_k, preferred_element_type=acc)
            ok = decision.moves & (jnp.abs(denom) > small * scale + tiny)
            ok = ok & jnp.isfinite(denom) & jnp.isfinite(v_dot_r)
            new_u = (s - h_d) / jnp.where(ok, denom, 1).astype(dtype)
            anew = full | decision.restart | short
            slot = jnp.where(frozen, self.memory, jnp.where(anew, 0, state.count))
            u, v, low_rank = _store(state, slot, ok, frozen, new_u, new_v)
            count = jnp.where(frozen, state.count, jnp.where(ok, slot + 1, slot))

            # Directions -H_new g from y_k (the first one -gamma g(y_0)) and from y_b (for a
            # return after a step on trial; H_base g(y_b) = -p), and -gamma g(y_b).
            p_k = -(base_r + jnp.where(ok, new_u * v_dot_r.astype(dtype), 0))
            p_k = jnp.where(search.started, p_k, -gamma_v * r_k)
            v_dot_b = jnp.matmul(new_v, search.r, preferred_element_type=acc)
            base_b = jnp.where(fresh, gamma_v * search.r, -search.p)
            p_retry = -(base_b + jnp.where(ok, new_u * v_dot_b.astype(dtype), 0))
            p_restart = -gamma_v * search.r

        search, y_next = advance(
            search,
            decision,
            y_k,
            r_k,
            norm_k,
            d_d,
            direction=p_k,
            retry=p_retry,
            restart=p_restart,
        )
        new_state = _BroydenState(
            u, v, low_rank, count, gamma, search, progress, newton=newton, jvps=jvps
        )
        return self._next_y(y, y_next, progress), new_state, aux

    def _inverse_jacobian(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        point: Float[Array, " n"],
        needed: Bool[Array, ""],
        acc: jnp.dtype,
    ) -> tuple[Array, Bool[Array, ""]]:
        """``(J_g(point)^{-1}, ok)`` in `acc`, from the n forward-mode products
        ``J_g e_i`` and an SVD; `ok` (else the inverse is 0) when every singular value is
        finite and the smallest above ``10 n eps`` times the largest. Computed only
        where `needed` (else 0, False). `y`: the iterate, for its PyTree structure."""
        n = point.size

        def g(z):
            return ravel(fn(unravel_like(z, y), args)[0], point.dtype)

        def compute(z):
            basis = jnp.eye(n, dtype=z.dtype)
            jac = jax.vmap(lambda e: jax.jvp(g, (z,), (e,))[1], out_axes=1)(basis)
            u, sv, vh = jnp.linalg.svd(jac.astype(acc), full_matrices=False)
            cutoff = 10 * n * jnp.finfo(sv.dtype).eps * sv[0]
            ok = jnp.all(jnp.isfinite(sv)) & (sv[-1] > cutoff)
            inv = jnp.conj(vh.T) @ (jnp.conj(u.T) / jnp.where(ok, sv, 1)[:, None])
            ok = ok & jnp.all(jnp.isfinite(inv))
            return jnp.where(ok, inv, 0), ok

        def skip(z):
            del z
            return jnp.zeros((n, n), acc), jnp.array(False)

        return jax.lax.cond(needed, compute, skip, jax.lax.stop_gradient(point))

    def postprocess(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: _BroydenState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        y_out, aux, stats = super().postprocess(fn, y, aux, args, options, state, tags, result)
        return y_out, aux, {**stats, "num_jvps": state.num_jvps}


Broyden.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: relative and absolute tolerances of the stopping rule (>= 0).
- `norm`: `PyTree -> scalar`, for the stopping rule and the statistics, e.g.
    `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `memory`: (>= 1) the most rank-one pairs kept before `H` restarts from `gamma I`.
- `beta`: in (0, 1]; the initial `H` is `-beta I` (a first step `y + beta g(y)`).
- `line_search`: (default True) the line search above; False accepts every step.
- `max_backtracks`: (>= 0) the most rejected trials along one direction.
- `divergence_factor`: (> 1) a residual above this multiple of the best one seen
    counts towards divergence.
- `divergence_patience`: (1 to 2**20) divergence after this many evaluations in a row
    above `divergence_factor` x the best (default 10, more than `max_backtracks`).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
- `update`: `"good"` (default) or `"bad"` Broyden update.
- `jacobian`: `"identity"` (default: `H` restarts from `gamma I`) or `"exact"` (from
    the inverse of the Jacobian, by `n` forward-mode products, see above).
"""
