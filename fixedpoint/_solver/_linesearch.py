r"""A derivative-free non-monotone line search with a watchdog, for quasi-Newton root
finders of $g(y) = 0$ that evaluate $g$ once per step.

From an accepted base point $y_b$ the solver moves along a direction $p$; the point
evaluated at each step is the trial $y = y_b + t p$. It is accepted (Li and Fukushima,
2000) when

$$\|g(y)\|_2 \le (1 + \eta_j)\, R - \sigma \|t p\|_2^2,
    \qquad \eta_j = \frac{\eta}{(j + 1)^2},$$

$j$ the number of points accepted so far and $R$ the largest $\|g\|_2$ of the last
`WINDOW` accepted points (Grippo-Lampariello-Lucidi's non-monotone reference).
Otherwise:

- a failed full step from an accepted point is accepted on trial (the watchdog of
  Chamberlain et al., 1982): the solver moves on, and the anchor (the base point before
  the trial step) is remembered; the next point must then pass the test against the
  anchor, or the search gives up and returns to the anchor, along the direction the
  solver gives for it;
- any other failed trial backtracks: $t$ is multiplied by the minimiser of the secant
  model of $\|g\|^2$ along the line (`backtrack_factor`);
- after `max_backtracks` backtracks the direction is abandoned (a restart): a full
  step along a direction the solver gives.
"""

from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Scalar

from ._common import acc_dtype, backtrack_factor, dot


SIGMA = 1e-4  # sufficient decrease
ETA = 1.0  # eta_j = ETA / (j + 1)^2
WINDOW = 10  # accepted points in the non-monotone reference


def two_norm(a: Array, acc: jnp.dtype) -> Array:
    """``||a||_2``, accumulated in `acc` (real)."""
    return jnp.sqrt(jnp.real(dot(a, a, acc)))


class SearchState(eqx.Module):
    """The line search's part of a solver state."""

    y: Float[Array, " n"]  # the base point (the last accepted one),
    r: Float[Array, " n"]  # its residual,
    p: Float[Array, " n"]  # the direction from it
    t: Scalar  # and the step length along `p` of the point being evaluated
    tries: Int[Array, ""]  # backtracks made along `p`
    started: Bool[Array, ""]  # a point has been evaluated
    watching: Bool[Array, ""]  # the base point was accepted on trial
    y_anchor: Float[Array, " n"]  # the base point before it,
    r_anchor: Float[Array, " n"]  # its residual, of 2-norm
    norm_anchor: Scalar
    p_anchor: Float[Array, " n"]  # and the direction to retry from it
    num_accepted: Int[Array, ""]  # accepted points (the j of eta_j)
    recent: Float[Array, " window"]  # ||g||_2 of the last WINDOW accepted points
    num_backtracks: Int[Array, ""]  # rejected trials
    num_restarts: Int[Array, ""]  # abandoned directions


def init_search(y: Array) -> SearchState:
    """The state before the first evaluation, for a flat `y`."""
    real = jnp.finfo(acc_dtype(y.dtype)).dtype
    vec = jnp.zeros_like(y)
    return SearchState(
        y=vec,
        r=vec,
        p=vec,
        t=jnp.array(1, real),
        tries=jnp.array(0),
        started=jnp.array(False),
        watching=jnp.array(False),
        y_anchor=vec,
        r_anchor=vec,
        norm_anchor=jnp.array(0, real),
        p_anchor=vec,
        num_accepted=jnp.array(0),
        recent=jnp.zeros((WINDOW,), real),
        num_backtracks=jnp.array(0),
        num_restarts=jnp.array(0),
    )


class Decision(NamedTuple):
    """What becomes of the evaluated point (at most one of the first five holds; none on
    the first evaluation, nor once the solve has finished)."""

    accept: Bool[Array, ""]  # it passes: the new base point
    on_trial: Bool[Array, ""]  # it fails, but is accepted on trial
    give_up: Bool[Array, ""]  # it fails after a step on trial: back to the anchor
    backtrack: Bool[Array, ""]  # it fails: a shorter step along `p`
    restart: Bool[Array, ""]  # it fails after `max_backtracks`: a new direction
    finished: Bool[Array, ""]  # the solve has finished: the search stays as it is

    @property
    def moves(self) -> Bool[Array, ""]:
        """The step to the evaluated point is taken (the solver may learn from it)."""
        return self.accept | self.on_trial


def decide(
    search: SearchState,
    y: Array,
    norm: Scalar,
    step_sq: Scalar,
    converged: Bool[Array, ""],
    *,
    finished: Bool[Array, ""],
    enabled: bool,
    max_backtracks: int,
    watch_first: bool = False,
) -> Decision:
    """The test of the evaluated point `y` (``norm = ||g(y)||_2``, ``step_sq =
    ||y - search.y||^2``). A converged point is accepted; `enabled=False` accepts all.
    `finished`: the solve had finished before this evaluation (see `is_done`).
    `watch_first`: the first step from the initial point may be accepted on trial too
    (for a Newton direction; a quasi-Newton method's first step is a guess)."""
    live = search.started & ~finished
    if enabled:
        real = search.t.dtype
        eta = ETA / (search.num_accepted.astype(real) + 1) ** 2
        good = norm <= (1 + eta) * jnp.max(search.recent) - SIGMA * step_sq
        # While watching, the step counts from the anchor.
        from_anchor = jnp.real(dot(y - search.y_anchor, y - search.y_anchor, acc_dtype(y.dtype)))
        good_anchor = norm <= (1 + eta) * search.norm_anchor - SIGMA * from_anchor
        good = jnp.where(search.watching, good_anchor, good)
        failed = live & ~good & ~converged
    else:
        failed = jnp.array(False)
    first_try = ~search.watching & (search.tries == 0)
    if not watch_first:
        first_try = first_try & (search.num_accepted > 0)
    on_trial = failed & first_try
    give_up = failed & search.watching
    rejected = failed & ~on_trial & ~give_up
    backtrack = rejected & (search.tries < max_backtracks)
    return Decision(
        accept=live & ~failed,
        on_trial=on_trial,
        give_up=give_up,
        backtrack=backtrack,
        restart=rejected & ~backtrack,
        finished=finished,
    )


def advance(
    search: SearchState,
    decision: Decision,
    y: Array,
    r: Array,
    norm: Scalar,
    d_d: Scalar,
    *,
    direction: Array,
    retry: Array,
    restart: Array,
) -> tuple[SearchState, Array]:
    """The next trial point and the search state that goes with it.

    `y`, `r`, `norm`, `d_d`: the evaluated point, its residual, ``||r||_2`` and
    ``||r - search.r||_2^2``; `direction`: the solver's direction from `y` (taken when
    it moves there, or on the first evaluation); `retry`: its direction from the
    current base point, kept for a return there if `y` is accepted on trial; `restart`:
    its direction from the base point after a restart. A finished solve keeps its
    state (but for `watching`) and statistics."""
    real = search.t.dtype
    tiny = jnp.finfo(real).tiny
    acc = acc_dtype(y.dtype)
    move = ~search.started | decision.moves
    give_up, on_trial = decision.give_up, decision.on_trial
    base_y = jnp.where(move, y, jnp.where(give_up, search.y_anchor, search.y))
    base_r = jnp.where(move, r, jnp.where(give_up, search.r_anchor, search.r))
    p = jnp.where(
        move,
        direction,
        jnp.where(give_up, search.p_anchor, jnp.where(decision.restart, restart, search.p)),
    )
    # Backtracking minimises the secant model ||g_b + (tau / t)(g(y) - g_b)||; returning
    # to the anchor the same model with g(y) - g(y_anchor), from one scalar product: the
    # direction `retry` has its full step at `y` (the secant condition H d = s).
    d_r = jnp.real(dot(r - search.r, search.r, acc))
    t_back = search.t * backtrack_factor(-d_r, d_d, tiny)
    a_y = jnp.real(dot(search.r_anchor, r, acc))
    a_a = search.norm_anchor**2
    t_anchor = backtrack_factor(a_a - a_y, norm**2 - 2 * a_y + a_a, tiny)
    hold = decision.finished
    t = jnp.where(hold, search.t, jnp.ones_like(search.t))
    t = jnp.where(decision.backtrack, t_back, jnp.where(give_up, t_anchor, t))
    accepted = search.num_accepted + decision.accept.astype(search.num_accepted.dtype)
    new = SearchState(
        y=base_y,
        r=base_r,
        p=p,
        t=t,
        tries=jnp.where(
            decision.backtrack,
            search.tries + 1,
            jnp.where(give_up, 1, jnp.where(hold, search.tries, 0)),
        ),
        started=jnp.array(True),
        # (cleared also when `hold`: it has no effect then, and keeping it made XLA's
        # fusion of a tiny solve cross the inline-execution threshold, see costs.py)
        watching=on_trial,
        y_anchor=jnp.where(on_trial, search.y, search.y_anchor),
        r_anchor=jnp.where(on_trial, search.r, search.r_anchor),
        # (||g||_2 of an accepted base point is the latest entry of `recent`.)
        norm_anchor=jnp.where(
            on_trial, search.recent[search.num_accepted % WINDOW], search.norm_anchor
        ),
        p_anchor=jnp.where(on_trial, retry, search.p_anchor),
        num_accepted=accepted,
        recent=jnp.where(
            decision.accept | ~search.started,
            search.recent.at[accepted % WINDOW].set(norm.astype(real)),
            search.recent,
        ),
        num_backtracks=search.num_backtracks
        + (decision.backtrack | give_up).astype(search.num_backtracks.dtype),
        num_restarts=search.num_restarts + decision.restart.astype(search.num_restarts.dtype),
    )
    return new, base_y + t.astype(y.dtype) * p
