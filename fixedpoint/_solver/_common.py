"""What the three methods share: the stopping rule, divergence and non-finite
detection, the best-iterate fallback and the residual trace (the shared methods are
those of [`fixedpoint.AbstractFixedPointRootFinder`][], in `_base.py`).

Every solver in this package solves the root problem ``g(y) = 0``. When it is called
through `optx.fixed_point(f, ...)`, optimistix passes ``g(y) = f(y) - y``, so ``y +
g(y) = f(y)`` is the fixed-point map. Each step of every method evaluates ``g``
exactly once, so ``sol.stats["num_steps"]`` is also the number of evaluations of
``g`` (and of ``f``).
"""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.custom_batching import custom_vmap
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar


# ----------------------------------------------------------------------------------
# Trace-time checks.


def check_structure(y: PyTree, f_struct: PyTree) -> None:
    """The root function must return a PyTree of the same structure and shapes as
    `y` (for `optx.fixed_point`: ``f(y)`` must look like ``y``)."""
    y_struct = jax.eval_shape(lambda: y)
    y_shapes = jtu.tree_map(lambda s: s.shape, y_struct)
    f_shapes = jtu.tree_map(lambda s: s.shape, f_struct)
    if jtu.tree_structure(y_struct) != jtu.tree_structure(f_struct) or y_shapes != f_shapes:
        raise ValueError(
            "The function must return a PyTree with the same structure and shapes as "
            f"its input `y` (for a fixed point, f(y) must look like y); got input "
            f"{y_shapes} and output {f_shapes}."
        )


def flatten_initial(y: PyTree, f_struct: PyTree) -> Array:
    """The common start of every `init`: check the function's output structure and
    return `y` flattened in the solvers' working dtype."""
    check_structure(y, f_struct)
    return ravel(y, flat_dtype(y))


def flat_dtype(y: PyTree) -> jnp.dtype:
    """The dtype that `ravel_pytree` gives `y`, and so of every buffer of a solver."""
    leaves = jtu.tree_leaves(y)
    if not leaves:
        raise ValueError("`y0` must contain at least one array.")
    # A PyTree may mix dtypes (float32 and float64 leaves): the flat state takes their
    # common type, whatever the user's `jax_numpy_dtype_promotion` (each leaf keeps its
    # own dtype in the iterates; see `ravel`, `unravel_like`).
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*leaves)


def ravel(tree: PyTree, dtype: jnp.dtype) -> Array:
    with jax.numpy_dtype_promotion("standard"):
        return ravel_pytree(tree)[0].astype(dtype)


def unravel_like(flat: Array, like: PyTree) -> PyTree:
    with jax.numpy_dtype_promotion("standard"):
        _, unravel = ravel_pytree(like)
        return unravel(flat)


def tree_where(pred: Bool[Array, ""], a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda x, z: jnp.where(pred, x, z), a, b)


# ----------------------------------------------------------------------------------
# Work that few steps need.


@custom_vmap
def _batch_any(pred: Array) -> Array:
    return pred


@_batch_any.def_vmap
def _batch_any_rule(axis_size: int, in_batched: list, pred: Array) -> tuple[Array, bool]:
    del axis_size
    (batched,) = in_batched
    return (jnp.any(pred) if batched else pred), False


def rarely(pred: Bool[Array, ""], compute: Callable[[], Any], skip: Callable[[], Any]) -> Any:
    """`compute()` where `pred` holds, else the cheap `skip()` (same structure).

    A `lax.cond`, also under `vmap`: there the predicate is "`pred` holds for some
    sample of the batch" (so every sample gets `compute()`, and a sample for which `pred`
    is false must not depend on which branch ran), where a batched predicate would turn
    the `cond` into a `select` that always pays for `compute()`. For quantities that a
    solver needs only on rare steps (a restart, the first secant pair)."""
    return jax.lax.cond(_batch_any(pred), compute, skip)


# ----------------------------------------------------------------------------------
# Scalar products and the secant scale, shared by Anderson and Broyden.


def acc_dtype(dtype) -> jnp.dtype:
    """The dtype of reductions (scalar products, norms, small solves): the state's
    dtype promoted to at least float32 (float16/bfloat16 states accumulate in
    float32; complex stays complex). Chosen explicitly rather than by type promotion,
    which `jax_numpy_dtype_promotion="strict"` forbids between float widths."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def negligible(dtype) -> float:
    """Relative size (to the product of the norms) below which a scalar product of two
    vectors of `dtype` counts as vanishing: 1000 machine epsilons, at most 1e-2 (so
    that float16/bfloat16 still have room)."""
    return min(1e3 * float(jnp.finfo(dtype).eps), 1e-2)


def dot(a: Array, b: Array, acc: jnp.dtype) -> Array:
    """``a^* b`` (conjugating `a`), accumulated in `acc`; `a` may be a matrix (rows)."""
    if a.dtype == acc and b.dtype == acc:  # (a plain product is cheaper in XLA)
        return jnp.conj(a) @ b
    return jnp.matmul(jnp.conj(a), b, preferred_element_type=acc)


def secant_scale(s: Array, d: Array, acc: jnp.dtype, small: float) -> tuple[Array, ...]:
    r"""The scalar inverse-Jacobian estimate that one secant pair (step `s`, change of
    residual `d`) gives: $\frac{d^* s}{|d^* s|} \frac{\|s\|}{\|d\|}$ (the sign - phase,
    for complex - of $d^* s$ and the size $\|s\| / \|d\|$, the geometric mean of the
    two Barzilai-Borwein scales, which stays meaningful when $s$ and $d$ are nearly
    orthogonal).

    Returns ``(scale, valid, cosine, d_s, s_s, d_d)``: `valid` is false when `d`
    vanishes, `s` and `d` are orthogonal to within `small`, or anything is non-finite;
    ``cosine = Re(d^* s) / (|s| |d|)``; and the scalar products ``d^* s``, ``|s|^2``,
    ``|d|^2`` themselves, for the callers' other uses.

    A step-size heuristic, not part of the iteration's mathematics: it is not
    differentiated (the square roots and absolute values have no derivative at the
    zero pairs of a first step or a restart, which would put NaN into the gradient of
    a solve differentiated through its iterations)."""
    s = jax.lax.stop_gradient(s)
    d = jax.lax.stop_gradient(d)
    d_s = dot(d, s, acc)
    s_s = jnp.real(dot(s, s, acc))
    d_d = jnp.real(dot(d, d, acc))
    norms = jnp.sqrt(s_s * d_d)
    abs_ds = jnp.abs(d_s)
    ratio = jnp.sqrt(s_s / jnp.where(d_d > 0, d_d, 1))
    scale = d_s / jnp.where(abs_ds > 0, abs_ds, 1).astype(d_s.dtype) * ratio.astype(d_s.dtype)
    valid = (d_d > 0) & (abs_ds > small * norms) & jnp.isfinite(scale)
    cosine = jnp.real(d_s) / jnp.where(norms > 0, norms, 1)
    return scale, valid, cosine, d_s, s_s, d_d


# ----------------------------------------------------------------------------------
# Progress: what is common to every method's loop state.


_CONVERGED, _DIVERGED, _NONFINITE = 1, 2, 4
_FLAGS = _CONVERGED | _DIVERGED | _NONFINITE
_COUNT_SHIFT = 3  # `num_above` is kept in the bits above the flags


class Progress(eqx.Module):
    """Bookkeeping shared by all methods (part of each solver state).

    - `status`: bit flags of the last evaluated point and, above them, `num_above`
      (one integer rather than three booleans and a count: fewer loop-carried scalars,
      each of which XLA's CPU backend schedules as its own task), read through the
      properties:
      - `converged` (bit 0): it met the stopping rule;
      - `diverged` (bit 1): `num_above` reached `divergence_patience`: the residual
        stayed far above the best for that many evaluations, whatever the method's
        safeguard (restart, backtracking) did in between;
      - `nonfinite` (bit 2): its residual was NaN or infinite.
      - `num_above` (bits 3 and up): how many evaluations in a row (up to the last
        one) had a residual norm above `divergence_factor` x the best one seen before
        them.
    - `residual_norm`: `norm(g(y))` at the last evaluated point (real, also for complex
      states).
    - `best_norm`, `y_best`, `r_best`: the smallest residual norm seen, its point and
      its residual. On failure the solver returns `y_best`, never a worse iterate.
    - `best_is_last`: the best point is the last evaluated one, and `y_best`, `r_best`
      are stale (only for a solver that keeps its last evaluated point and passes it
      to `update_progress`, see there; `select_output` reads it).
    - `trace`: `norm(g(y_k))` of the first `trace_length` steps (NaN after the last).
    """

    step: Int[Array, ""]
    status: Int[Array, ""]
    residual_norm: Scalar
    best_norm: Scalar
    y_best: Float[Array, " n"]
    r_best: Float[Array, " n"]
    best_is_last: Bool[Array, ""]
    trace: Float[Array, " trace"]

    @property
    def converged(self) -> Bool[Array, ""]:
        return (self.status & _CONVERGED) != 0

    @property
    def diverged(self) -> Bool[Array, ""]:
        return (self.status & _DIVERGED) != 0

    @property
    def nonfinite(self) -> Bool[Array, ""]:
        return (self.status & _NONFINITE) != 0

    @property
    def num_above(self) -> Int[Array, ""]:
        return self.status >> _COUNT_SHIFT


def init_progress(y_flat: Array, trace_length: int) -> Progress:
    # Norms are real, also for a complex state (finfo(complex64).dtype is float32).
    dtype = jnp.finfo(y_flat.dtype).dtype
    inf = jnp.array(jnp.inf, dtype)
    false = jnp.array(False)
    return Progress(
        step=jnp.array(0),
        status=jnp.array(0, jnp.int32),
        residual_norm=inf,
        best_norm=inf,
        y_best=y_flat,
        r_best=jnp.zeros_like(y_flat),
        best_is_last=false,
        trace=jnp.full((trace_length,), jnp.nan, dtype),
    )


def _put_if(pred: Bool[Array, ""], buffer: Array, value: Array) -> Array:
    """`value` where `pred`, else `buffer`, as a write that is dropped when `pred` is
    false (under `vmap`, a scatter of the samples for which it holds), instead of a
    select that reads both and writes all: a solver loop updates `buffer` in place,
    and pays nothing on the steps that keep it."""
    return buffer[None].at[jnp.where(pred, 0, 1)].set(value, mode="drop")[0]


def residual_norm(r: PyTree, norm: Callable[[PyTree], Scalar]) -> Scalar:
    """`norm(r)`; for `optx.max_norm`, a NaN anywhere in `r` gives infinity.

    XLA's CPU backend (jaxlib 0.10) reduces an array of 4,096 or more elements with a
    max that skips NaN: `max|r|` of a residual with one NaN is then the largest finite
    element (and -inf if all are NaN), and a solve would go on, or stop as converged, on
    a non-finite residual. NaN is mapped to infinity before the reduction, in the same
    pass."""
    if norm is not optx.max_norm:
        return norm(r)
    leaves = [leaf for leaf in jtu.tree_leaves(r) if jnp.size(leaf) > 0]
    if not leaves:
        return norm(r)
    maxes = [jnp.max(jnp.where(jnp.isnan(leaf), jnp.inf, jnp.abs(leaf))) for leaf in leaves]
    return jax.lax.stop_gradient(functools.reduce(jnp.maximum, maxes))


#: A state of at least this many numbers is "large": there, a pass over it costs more
#: than a conditional (the stopping rule's screen, Anderson's lazy best point), on a
#: smaller one the extra kernels cost more than the pass.
LARGE_STATE = 2**12


def _within_tolerance(
    r: PyTree,
    y: PyTree,
    rtol: float,
    atol: float,
    norm: Callable[[PyTree], Scalar],
    r_norm: Scalar | None = None,
) -> Bool[Array, ""]:
    """The stopping rule ``norm(r / (atol + rtol * |y|)) < 1``.

    - For the max norm it is evaluated as ``|r_i| < atol + rtol * |y_i|`` for every
      element, without a division per element (the same decision, up to rounding at
      the threshold itself, also where ``atol + rtol * |y_i|`` is 0 or the values are
      not finite; on a DEQ state the division made this test cost four times the norm).
    - For the RMS and 2-norms of a large state (and `r_norm = norm(r)` given), a
      screen first: every ``atol + rtol |y_i|`` is at most ``W = atol + rtol
      max_i |y_i|``, so the scaled norm is at least ``norm(r) / W``, and the rule
      cannot hold when ``norm(r) >= 1.01 W`` (the margin covers the rounding of both
      sums). The divisions are made only when the screen cannot decide (see `rarely`),
      which on a DEQ forward pass is its last few steps.
    - Any other norm: as written.
    """

    def scaled_norm_below_one():
        with jax.numpy_dtype_promotion("standard"):
            scaled = jtu.tree_map(lambda ri, yi: ri / (atol + rtol * jnp.abs(yi)), r, y)
            return jnp.real(jnp.asarray(norm(scaled))) < 1

    r_leaves, y_leaves = jtu.tree_leaves(r), jtu.tree_leaves(y)
    with jax.numpy_dtype_promotion("standard"):
        if norm is optx.max_norm:
            inside = [
                jnp.all(jnp.abs(ri) < atol + rtol * jnp.abs(yi))
                for ri, yi in zip(r_leaves, y_leaves)
            ]
            return jnp.all(jnp.stack(inside)) if inside else jnp.array(True)
        size = sum(jnp.size(yi) for yi in y_leaves)
        screen = norm is optx.rms_norm or norm is optx.two_norm
        if r_norm is None or not screen or size < LARGE_STATE:
            return scaled_norm_below_one()
        y_max = jnp.max(jnp.stack([jnp.max(jnp.abs(yi), initial=0) for yi in y_leaves]))
        bound = (atol + rtol * y_max).astype(r_norm.dtype)
        outside = r_norm >= 1.01 * bound
        return rarely(~outside, scaled_norm_below_one, lambda: jnp.array(False))


def update_progress(
    progress: Progress,
    y: PyTree,
    r: PyTree,
    y_flat: Array,
    r_flat: Array,
    *,
    rtol: float,
    atol: float,
    norm: Callable[[PyTree], Scalar],
    divergence_factor: float,
    divergence_patience: int,
    last: tuple[Array, Array] | None = None,
) -> Progress:
    """Record the residual `r = g(y)` of a newly evaluated point.

    Stopping rule: ``norm(g(y) / (atol + rtol * |y|)) < 1`` (elementwise division).
    For a fixed-point problem ``g(y) = f(y) - y`` this bounds the change that one plain
    iteration would make, relative to the size of `y`, exactly as
    `optx.FixedPointIteration` does.

    Divergence: a residual above ``divergence_factor`` x the best one seen is not
    failure by itself (a quasi-Newton residual is not monotone, and the methods'
    safeguards - Anderson's restart, Broyden's line search - bring it back); the
    method has failed when that happened at ``divergence_patience`` evaluations in a
    row.

    Best point: by default `y_best`, `r_best` are replaced whenever the new point is
    better (a select, which on tiny problems costs less than a conditional write). A
    solver that keeps its last evaluated point (as flat `y`, `r`) whenever
    `progress.best_is_last` holds passes it as `last`: then a better point is not
    copied at all (`best_is_last` says so), and the buffers are written only when a
    point that was the best stops being the last one. On a solve whose residual
    decreases at every step (a DEQ forward pass) that is never.
    """
    real = progress.best_norm.dtype
    with jax.numpy_dtype_promotion("standard"):
        r_norm = jnp.real(jnp.asarray(residual_norm(r, norm))).astype(real)
    within = _within_tolerance(r, y, rtol, atol, norm, r_norm)
    # A finished solve records nothing more (see `is_done`): its flags, counts and best
    # point stay as they were, at no cost beyond the selects made anyway.
    frozen = is_done(progress)
    nonfinite = ~jnp.isfinite(r_norm)
    converged = within & ~nonfinite
    above = (r_norm > divergence_factor * progress.best_norm) & ~nonfinite
    # (capped at the patience: a solve stops there, and the count stays in its bits)
    num_above = jnp.where(above, jnp.minimum(progress.num_above + 1, divergence_patience), 0)
    diverged = num_above >= divergence_patience
    better = (r_norm < progress.best_norm) & ~nonfinite & ~frozen
    status = (
        jnp.where(converged, _CONVERGED, 0)
        | jnp.where(diverged, _DIVERGED, 0)
        | jnp.where(nonfinite, _NONFINITE, 0)
        | (num_above << _COUNT_SHIFT)
    ).astype(progress.status.dtype)
    if last is None:
        y_best = jnp.where(better, y_flat, progress.y_best)
        r_best = jnp.where(better, r_flat, progress.r_best)
        best_is_last = progress.best_is_last
    else:
        # The best point was the last one, and the new one is not better: keep it.
        keep_last = progress.best_is_last & ~better & ~frozen
        y_best = _put_if(keep_last, progress.y_best, last[0])
        r_best = _put_if(keep_last, progress.r_best, last[1])
        best_is_last = jnp.where(frozen, progress.best_is_last, better)
    trace_slot = jnp.where(frozen, progress.trace.size, progress.step)  # dropped if frozen
    return Progress(
        step=progress.step + jnp.where(frozen, 0, 1).astype(progress.step.dtype),
        status=jnp.where(frozen, progress.status, status),
        residual_norm=jnp.where(frozen, progress.residual_norm, r_norm),
        best_norm=jnp.where(better, r_norm, progress.best_norm),
        y_best=y_best,
        r_best=r_best,
        best_is_last=best_is_last,
        trace=(
            progress.trace.at[trace_slot].set(r_norm, mode="drop")
            if progress.trace.size
            else progress.trace
        ),
    )


def is_done(progress: Progress) -> Bool[Array, ""]:
    """Whether the solve has finished (converged, diverged or hit non-finite values).

    Contract of every solver of this package: a `step` taken from a finished state
    leaves the iterate, the history, and every count, flag and statistic unchanged (it
    still evaluates the function once). optimistix never steps a finished solve; a
    batch of solves run in one loop until every sample has finished
    (`fixedpoint._iterate`) relies on it."""
    return (progress.status & _FLAGS) != 0


def termination_result(progress: Progress) -> tuple[Bool[Array, ""], optx.RESULTS]:
    """`(done, result)` of the last evaluated point: stop on convergence, divergence or
    non-finite values, with the matching `optx.RESULTS` code."""
    result = optx.RESULTS.where(
        progress.nonfinite,
        optx.RESULTS.nonfinite,
        optx.RESULTS.where(
            progress.diverged,
            optx.RESULTS.nonlinear_divergence,
            optx.RESULTS.successful,
        ),
    )
    return is_done(progress), result


def select_output(
    y: PyTree,
    progress: Progress,
    result: optx.RESULTS,
    trace_length: int,
    last: tuple[Array, Array] | None = None,
) -> tuple[PyTree, dict[str, Any]]:
    """Choose what to return, and the statistics.

    - success: the converged point (its residual is `stats["residual_norm"]`);
    - out of steps: the final iterate, as after a fixed number of iterations (so that
      `rtol = atol = 0` runs exactly `max_steps` steps of the method);
    - non-finite values or divergence: the best point evaluated, never the iterate that
      blew up.

    `last` is the solver's last evaluated point, as given to `update_progress` (the
    best one while `progress.best_is_last` holds: possible here when the next iterate
    is what is not finite).
    """
    broken = (result == optx.RESULTS.nonfinite) | (result == optx.RESULTS.nonlinear_divergence)
    # `y_best` starts as y0, so a function that is non-finite from the first
    # evaluation returns y0 (with the non-finite residual reported).
    y_best = progress.y_best
    if last is not None:  # (`y_best` is stale while the best point is the last one)
        y_best = jnp.where(progress.best_is_last, last[0], y_best)
    y_out = tree_where(broken, unravel_like(y_best, y), y)
    finite_best = broken & jnp.isfinite(progress.best_norm)
    stats = {"residual_norm": jnp.where(finite_best, progress.best_norm, progress.residual_norm)}
    if trace_length > 0:
        stats["residual_trace"] = progress.trace
    return y_out, stats
