from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Int, PyTree, Scalar

from .._validate import as_int, check_callable, check_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import (
    acc_dtype,
    flatten_initial,
    init_progress,
    is_done,
    negligible,
    Progress,
    ravel,
    secant_scale,
    unravel_like,
)
from ._krylov import gmres
from ._linesearch import advance, decide, init_search, SearchState, two_norm


class _NewtonKrylovState(eqx.Module):
    search: SearchState  # its base point y_b and the Newton direction p from it
    eta: Scalar  # the forcing term of p
    norm_newton: Scalar  # ||g||_2 at the point p was computed at
    gamma: Scalar  # secant scale of the last step (for a restart direction)
    num_jvps: Int[Array, ""]
    progress: Progress

    @property
    def num_backtracks(self) -> Int[Array, ""]:
        return self.search.num_backtracks

    @property
    def num_restarts(self) -> Int[Array, ""]:
        return self.search.num_restarts


def forcing_term(norm: Scalar, norm_old: Scalar, eta_old: Scalar, eta_max: float) -> Scalar:
    r"""Eisenstat and Walker's (1996) second choice: $\eta = 0.9 (\|g_k\| /
    \|g_{k-1}\|)^2$, at least $0.9\,\eta_{k-1}^2$ when that exceeds 1/10 (so that
    $\eta$ does not fall faster than the residual justifies), at most `eta_max`."""
    eta = 0.9 * (norm / jnp.where(norm_old > 0, norm_old, 1)) ** 2
    floor = 0.9 * eta_old**2
    eta = jnp.where(floor > 0.1, jnp.maximum(eta, floor), eta)
    return jnp.where(jnp.isfinite(eta), jnp.minimum(eta, eta_max), eta_max)


class NewtonKrylov(AbstractFixedPointRootFinder[Y, Out, Aux, _NewtonKrylovState]):
    r"""Inexact Newton's method, matrix-free: each Newton system is solved by GMRES
    with Jacobian-vector products, and the steps are globalised by the line search of
    [`fixedpoint.Broyden`][].

    Solves $g(y) = 0$. From an accepted point $y_k$ the direction $p_k$ approximately
    solves the Newton equation $J_g(y_k)\, p = -g(y_k)$: GMRES from $p = 0$ stops at the
    first iterate with

    $$\|J_g(y_k)\, p + g(y_k)\|_2 \le \eta_k \|g(y_k)\|_2$$

    or after `krylov_dim` products $J_g v$ (each a forward-mode `jax.linearize`
    product; $J_g$ is never formed). The forcing terms $\eta_k$ are Eisenstat and
    Walker's second choice, $\eta_k = 0.9\,(\|g(y_k)\|_2 / \|g(y_{k-1})\|_2)^2$
    (safeguarded, see `forcing_term`), at most `eta_max`; the first is `eta_max`.
    Tight near a root, where it gives Newton's fast convergence, and looser where
    the residual falls slowly, where an exact Newton step would be wasted. A state of
    $n \le$ `krylov_dim` numbers gets Newton steps exact up to the forcing term
    (GMRES is exact after $n$ products, as many as a dense Jacobian by forward mode
    would cost), so no dense Jacobian is ever formed.

    **Globalisation**: the trials $y_k + t p_k$ are tested by the non-monotone line
    search of [`fixedpoint.Broyden`][] (Li and Fukushima's test with a watchdog,
    backtracking by the secant model of $\|g\|^2$ along the line); any GMRES iterate
    with a smaller linear residual than $\|g(y_k)\|_2$ is a descent direction of
    $\|g\|_2^2$. After `max_backtracks` rejected trials along one direction (at a
    near-singular Jacobian, where the Newton direction is poor) the next trial is a
    secant-scaled residual step $y_k - \gamma g(y_k)$, $\gamma$ the secant scale of
    the last step (see [`fixedpoint.Broyden`][]), and the search goes on from there.

    **Preconditioning** (`preconditioner`): a function $M(v) \approx J_g^{-1} v$ on
    PyTrees like $y$, applied on the right: GMRES solves $J_g M u = -g$, $p = M u$.

    **Cost** per accepted point: one `jax.linearize` of $g$ (an evaluation that also
    keeps what the products need) and up to `krylov_dim` products; per rejected trial
    one evaluation. Memory: `krylov_dim + 1` vectors of $n$ numbers and the
    linearisation. `sol.stats["num_steps"]` counts evaluations of $g$, and
    `sol.stats["num_jvps"]` the Jacobian-vector products;
    `sol.state.num_backtracks` and `sol.state.num_restarts` count rejected trials and
    abandoned directions.

    **Stopping rule, failures, statistics:** as for [`fixedpoint.Neumann`][].
    """

    rtol: float = 1e-4
    atol: float = 1e-6
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    krylov_dim: int = eqx.field(default=20, converter=as_int)
    eta_max: float = 0.1
    preconditioner: Callable[[Y], Y] | None = None
    max_backtracks: int = eqx.field(default=8, converter=as_int)
    divergence_factor: float = 1e4
    divergence_patience: int = eqx.field(default=10, converter=as_int)
    trace_length: int = eqx.field(default=0, converter=as_int)

    def __check_init__(self) -> None:
        check_int("krylov_dim", self.krylov_dim, low=1)
        check_real("eta_max", self.eta_max, low=0.0, high=1.0, high_open=True)
        if self.preconditioner is not None:
            check_callable("preconditioner", self.preconditioner, "PyTree -> PyTree like y")
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
    ) -> _NewtonKrylovState:
        del fn, args, options, aux_struct, tags
        y_flat = flatten_initial(y, f_struct)
        real = jnp.finfo(acc_dtype(y_flat.dtype)).dtype
        return _NewtonKrylovState(
            search=init_search(y_flat),
            eta=jnp.array(self.eta_max, real),
            norm_newton=jnp.array(jnp.inf, real),
            gamma=jnp.array(-1, acc_dtype(y_flat.dtype)),
            num_jvps=jnp.array(0),
            progress=init_progress(y_flat, self.trace_length),
        )

    def step(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _NewtonKrylovState,
        tags: frozenset[object],
    ) -> tuple[Y, _NewtonKrylovState, Aux]:
        del options, tags
        frozen = is_done(state.progress)  # a finished solve changes nothing (see is_done)
        r, jvp, aux = jax.linearize(lambda z: fn(z, args), y, has_aux=True)
        y_k, r_k, aux, progress = self._record(y, r, aux, state.progress)
        dtype, search = y_k.dtype, state.search
        acc = acc_dtype(dtype)

        # The line search's test of y_k, and the secant scale of the step to it.
        s = y_k - search.y
        d = r_k - search.r
        fit, fit_ok, _, _, s_s, d_d = secant_scale(s, d, acc, negligible(dtype))
        norm_k = two_norm(r_k, acc)
        decision = decide(
            search,
            y_k,
            norm_k,
            s_s,
            progress.converged,
            finished=frozen,
            enabled=True,
            max_backtracks=self.max_backtracks,
            watch_first=True,
        )
        gamma = jnp.where(fit_ok & decision.moves, fit, state.gamma)

        # A new base point y_k: the Newton direction from it.
        new_base = (~search.started | decision.moves) & ~is_done(progress)
        eta = forcing_term(norm_k, state.norm_newton, state.eta, self.eta_max)
        eta = jnp.where(new_base & search.started, eta, state.eta)
        norm_newton = jnp.where(new_base, norm_k, state.norm_newton)
        precondition = self._preconditioner(y)

        def matvec(v):
            return ravel(jvp(unravel_like(precondition(v), y)), dtype)

        newton = gmres(
            matvec, -r_k, dim=self.krylov_dim, tol=eta * norm_k, active=new_base, acc=acc
        )
        p_k = precondition(newton.x)

        search, y_next = advance(
            search,
            decision,
            y_k,
            r_k,
            norm_k,
            d_d,
            direction=p_k,
            retry=search.p,
            restart=-gamma.astype(dtype) * search.r,
        )
        new_state = _NewtonKrylovState(
            search, eta, norm_newton, gamma, state.num_jvps + newton.num_products, progress
        )
        return self._next_y(y, y_next, progress), new_state, aux

    def _preconditioner(self, like: Y) -> Callable[[Array], Array]:
        """The flat form of `preconditioner` (the identity without one)."""
        if self.preconditioner is None:
            return lambda v: v
        preconditioner = self.preconditioner
        return lambda v: ravel(preconditioner(unravel_like(v, like)), v.dtype)

    def postprocess(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: _NewtonKrylovState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        y_out, aux, stats = super().postprocess(fn, y, aux, args, options, state, tags, result)
        return y_out, aux, {**stats, "num_jvps": state.num_jvps}


NewtonKrylov.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: relative and absolute tolerances of the stopping rule (>= 0).
- `norm`: `PyTree -> scalar`, for the stopping rule and the statistics, e.g.
    `optx.max_norm` (default), `optx.rms_norm`, `optx.two_norm`.
- `krylov_dim`: (>= 1) the most Jacobian-vector products per Newton direction (the
    dimension of GMRES's Krylov space, without restarts).
- `eta_max`: in [0, 1); the largest forcing term (the loosest relative accuracy of a
    Newton direction; default 0.1). 0 asks for exact Newton steps (up to
    `krylov_dim` products); Eisenstat and Walker's own bound, 0.9, saves products on
    large states whose Newton steps are cheap to approximate, and on small hard
    problems costs more evaluations than it saves.
- `preconditioner`: `None` or a function `v -> M v`, `M` approximating the inverse
    Jacobian, on PyTrees like `y` (right preconditioning).
- `max_backtracks`: (>= 0) the most rejected trials along one direction.
- `divergence_factor`: (> 1) a residual above this multiple of the best one seen
    counts towards divergence.
- `divergence_patience`: (1 to 2**20) divergence after this many evaluations in a row
    above `divergence_factor` x the best (default 10, more than `max_backtracks`).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps in
    `sol.stats["residual_trace"]`.
"""
