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
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, Scalar


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


def _products(a: Array, b: Array, acc: jnp.dtype) -> Array:
    """The row-wise products ``a_i^* b_i`` of two matrices, accumulated in `acc`: as
    `dot` does for one pair of vectors (a multiply and a sum, which is what XLA makes of
    a vector product), for every row in one reduction."""
    return jnp.sum(jnp.conj(a).astype(acc) * b.astype(acc), axis=1)


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
    # The three products in one reduction (XLA's CPU backend compiles each reduction
    # of an n-vector into two kernels; three separate products cost six).
    d_s, s_s, d_d = _products(jnp.stack([d, s, d]), jnp.stack([s, s, d]), acc)
    s_s, d_d = jnp.real(s_s), jnp.real(d_d)
    norms = jnp.sqrt(s_s * d_d)
    abs_ds = jnp.abs(d_s)
    ratio = jnp.sqrt(s_s / jnp.where(d_d > 0, d_d, 1))
    scale = d_s / jnp.where(abs_ds > 0, abs_ds, 1).astype(d_s.dtype) * ratio.astype(d_s.dtype)
    valid = (d_d > 0) & (abs_ds > small * norms) & jnp.isfinite(scale)
    cosine = jnp.real(d_s) / jnp.where(norms > 0, norms, 1)
    return scale, valid, cosine, d_s, s_s, d_d


def keeps_picard_scale(cosine: Array, scale: Array, beta: ArrayLike) -> Bool[Array, ""]:
    """Whether a first secant pair leaves the fixed-point convention ``h0 = -beta`` in
    place: its secant `scale` (see `secant_scale`) points the same way as ``-beta``
    (``cosine = Re(d^* s) / (|s| |d|) < 1/10``) and is less than ``10 beta`` in size.
    On a contractive map it is, and nothing changes; on a root problem whose Jacobian
    has the other sign or a much larger scale the secant scale replaces ``-beta``."""
    bound = jnp.asarray(10 * beta, jnp.abs(scale).dtype)  # (as a Python number would be)
    return (cosine < 0.1) & (jnp.abs(scale) < bound)


def backtrack_factor(numerator: Array, denominator: Array, tiny: ArrayLike = 0.0) -> Array:
    """The factor by which a step that failed is shortened: the minimiser
    ``numerator / denominator`` of the secant model of ``|g|^2`` along the step,
    clipped to ``[1/10, 1/2]`` (1/2 where the model is degenerate: a denominator at
    most `tiny`, or a non-finite quotient)."""
    ratio = numerator / jnp.where(denominator > tiny, denominator, 1)
    return jnp.where(jnp.isfinite(ratio), jnp.clip(ratio, 0.1, 0.5), 0.5)


# ----------------------------------------------------------------------------------
# Progress: what is common to every method's loop state.


class Progress(eqx.Module):
    """Bookkeeping shared by all methods (part of each solver state).

    - `converged`: the last evaluated point met the stopping rule.
    - `diverged`: `num_above` reached `divergence_patience`.
    - `nonfinite`: the last residual was NaN or infinite.
    - `num_above`: how many evaluations in a row (up to the last one) had a residual
      norm above `divergence_factor` x the best one seen before them.
    - `residual_norm`: `norm(g(y))` at the last evaluated point (real, also for complex
      states).
    - `best_norm`, `y_best`, `r_best`: the smallest residual norm seen, its point and
      its residual. On failure the solver returns `y_best`, never a worse iterate.
    - `trace`: `norm(g(y_k))` of the first `trace_length` steps (NaN after the last).
    """

    step: Int[Array, ""]
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    nonfinite: Bool[Array, ""]
    num_above: Int[Array, ""]
    residual_norm: Scalar
    best_norm: Scalar
    y_best: Float[Array, " n"]
    r_best: Float[Array, " n"]
    trace: Float[Array, " trace"]


def init_progress(y_flat: Array, trace_length: int) -> Progress:
    # Norms are real, also for a complex state (finfo(complex64).dtype is float32).
    dtype = jnp.finfo(y_flat.dtype).dtype
    inf = jnp.array(jnp.inf, dtype)
    false = jnp.array(False)
    return Progress(
        step=jnp.array(0),
        converged=false,
        diverged=false,
        nonfinite=false,
        num_above=jnp.array(0),
        residual_norm=inf,
        best_norm=inf,
        y_best=y_flat,
        r_best=jnp.zeros_like(y_flat),
        trace=jnp.full((trace_length,), jnp.nan, dtype),
    )


def residual_norm(r: PyTree, norm: Callable[[PyTree], Scalar]) -> Scalar:
    """`norm(r)`; for `optx.max_norm`, a NaN anywhere in `r` gives infinity.

    XLA's CPU backend may reduce a large array (4,096 or more elements) with a max that
    skips NaN: `max|r|` of a residual with one NaN is then the largest finite
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


def _as_real(x: ArrayLike, like: Array) -> Array:
    """A tolerance (a Python number or a 0-d array, possibly traced) in the real dtype
    of `like`: the value a Python number would take there by JAX's weak typing."""
    return jnp.asarray(x, jnp.finfo(like.dtype).dtype)


def _within_tolerance(
    r: PyTree, y: PyTree, rtol: ArrayLike, atol: ArrayLike, norm: Callable[[PyTree], Scalar]
) -> Bool[Array, ""]:
    """The stopping rule ``norm(r / (atol + rtol * |y|)) < 1``. For the max norm it is
    evaluated as ``|r_i| < atol + rtol * |y_i|`` for every element, without a
    division (the same decision, also where ``atol + rtol * |y_i|`` is 0 or the values
    are not finite). The tolerances are taken in each leaf's (real) dtype."""
    with jax.numpy_dtype_promotion("standard"):
        if norm is optx.max_norm:
            inside = [
                jnp.all(jnp.abs(ri) < _bound(yi, rtol, atol))
                for ri, yi in zip(jtu.tree_leaves(r), jtu.tree_leaves(y))
            ]
            return jnp.all(jnp.stack(inside)) if inside else jnp.array(True)
        scaled = jtu.tree_map(lambda ri, yi: ri / _bound(yi, rtol, atol), r, y)
        return jnp.real(jnp.asarray(norm(scaled))) < 1


def _bound(yi: Array, rtol: ArrayLike, atol: ArrayLike) -> Array:
    """``atol + rtol * |y_i|`` in the real dtype of the leaf `yi`."""
    return _as_real(atol, yi) + _as_real(rtol, yi) * jnp.abs(yi)


def _max_norm_and_within(
    r: PyTree, y: PyTree, rtol: ArrayLike, atol: ArrayLike, real: jnp.dtype
) -> tuple[Scalar, Bool[Array, ""]] | None:
    """`residual_norm(r, optx.max_norm)` and `_within_tolerance(r, y, rtol, atol,
    optx.max_norm)` (the same values) from one reduction: the maximum over the elements
    of ``[|r_i| (NaN -> inf), 0 if |r_i| < atol + rtol |y_i| else 1]``, the leaves
    concatenated (each compared in its own dtype). Two reductions of an `n`-vector
    cost XLA's CPU backend four compiled kernels, one costs two. None when `r` has no
    elements."""
    pairs = [(ri, yi) for ri, yi in zip(jtu.tree_leaves(r), jtu.tree_leaves(y)) if jnp.size(ri) > 0]
    if not pairs:
        return None
    with jax.numpy_dtype_promotion("standard"):
        size = [
            jnp.ravel(jnp.where(jnp.isnan(ri), jnp.inf, jnp.abs(ri))).astype(real)
            for ri, _ in pairs
        ]
        outside = [
            jnp.ravel(jnp.where(jnp.abs(ri) < _bound(yi, rtol, atol), 0, 1)).astype(real)
            for ri, yi in pairs
        ]
    both = jnp.stack([jnp.concatenate(size), jnp.concatenate(outside)])
    r_norm, out = jnp.max(both, axis=1)
    return jax.lax.stop_gradient(r_norm), out == 0


def update_progress(
    progress: Progress,
    y: PyTree,
    r: PyTree,
    y_flat: Array,
    r_flat: Array,
    *,
    rtol: ArrayLike,
    atol: ArrayLike,
    norm: Callable[[PyTree], Scalar],
    divergence_factor: float,
    divergence_patience: int,
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

    A finished solve (see `is_done`) records nothing more: its flags, counts, best
    point and trace stay as they were.
    """
    real = progress.best_norm.dtype
    merged = _max_norm_and_within(r, y, rtol, atol, real) if norm is optx.max_norm else None
    if merged is not None:
        r_norm, within = merged
    else:
        with jax.numpy_dtype_promotion("standard"):
            r_norm = jnp.real(jnp.asarray(residual_norm(r, norm))).astype(real)
        within = _within_tolerance(r, y, rtol, atol, norm)
    frozen = is_done(progress)
    nonfinite = ~jnp.isfinite(r_norm)
    above = (r_norm > divergence_factor * progress.best_norm) & ~nonfinite
    # (capped at the patience: a solve stops there)
    num_above = jnp.where(above, jnp.minimum(progress.num_above + 1, divergence_patience), 0)
    better = (r_norm < progress.best_norm) & ~nonfinite & ~frozen

    def unless_frozen(new, old):
        return jnp.where(frozen, old, new)

    # (When frozen, `better` is false and the trace's first unused slot keeps its NaN.)
    return Progress(
        step=unless_frozen(progress.step + 1, progress.step),
        converged=unless_frozen(within & ~nonfinite, progress.converged),
        diverged=unless_frozen(num_above >= divergence_patience, progress.diverged),
        nonfinite=unless_frozen(nonfinite, progress.nonfinite),
        num_above=unless_frozen(num_above, progress.num_above),
        residual_norm=unless_frozen(r_norm, progress.residual_norm),
        best_norm=jnp.where(better, r_norm, progress.best_norm),
        y_best=jnp.where(better, y_flat, progress.y_best),
        r_best=jnp.where(better, r_flat, progress.r_best),
        trace=_record(progress.trace, progress.step, unless_frozen(r_norm, jnp.nan)),
    )


def _record(trace: Array, step: Array, value: Array) -> Array:
    """`trace` with `value` at `step` (nothing once the trace is full)."""
    return trace.at[step].set(value, mode="drop") if trace.size else trace


def is_done(progress: Progress) -> Bool[Array, ""]:
    """Whether the solve has finished (converged, diverged or hit non-finite values).

    Contract of every solver of this package: a `step` taken from a finished state
    leaves the iterate, the history, and every count, flag and statistic unchanged (it
    still evaluates the function once). optimistix never steps a finished solve; a
    batch of solves run in one loop until every sample has finished
    (`fixedpoint._iterate`) relies on it."""
    return progress.converged | progress.diverged | progress.nonfinite


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
) -> tuple[PyTree, dict[str, Any]]:
    """Choose what to return, and the statistics.

    - success: the converged point (its residual is `stats["residual_norm"]`);
    - out of steps: the final iterate, as after a fixed number of iterations (so that
      `rtol = atol = 0` runs exactly `max_steps` steps of the method);
    - non-finite values or divergence: the best point evaluated, never the iterate that
      blew up.
    """
    broken = (result == optx.RESULTS.nonfinite) | (result == optx.RESULTS.nonlinear_divergence)
    # `y_best` starts as y0, so a function that is non-finite from the first
    # evaluation returns y0 (with the non-finite residual reported).
    y_out = tree_where(broken, unravel_like(progress.y_best, y), y)
    finite_best = broken & jnp.isfinite(progress.best_norm)
    stats = {"residual_norm": jnp.where(finite_best, progress.best_norm, progress.residual_norm)}
    if trace_length > 0:
        stats["residual_trace"] = progress.trace
    return y_out, stats
