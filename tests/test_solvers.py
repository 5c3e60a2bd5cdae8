"""Correctness of the Anderson, Broyden and Neumann root finders on problems that they
must solve: random contractions (linear and nonlinear, float32 and float64, sizes
1..200), random PyTrees, both optimistix entry points, `has_aux`, `vmap`, `jit`,
float32 under x64, the statistics, and references (scipy.optimize, closed forms, the
truncated Neumann series).

Compilation dominates the run time (about a second per solver and shape), so:

- almost every solve goes through `fixed` / `root`, `eqx.filter_jit` functions of one
  map `_layer` (z -> W z + x, or tanh(W z + x), chosen by a runtime flag) with aux
  and an evaluation counter, and through the canonical solver objects `SOLVER[dtype]`,
  so the tests share compiled solves;
- random sizes n in 1..200 are embedded in size N = 200 by padding the problem with
  an exactly decoupled zero block: the padded coordinates have a zero residual at
  every iterate, so the iterates on the first n coordinates are those of the
  n-dimensional problem (each test checks that the padding stays exactly 0). Other
  native shapes are covered by the PyTree tests (sizes 1..31, a 0-d y0), the cube
  root problems (3) and test_failures.py (2).
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
import scipy.optimize
from hypothesis import example, given, HealthCheck, settings, strategies as st
from jax.flatten_util import ravel_pytree

import fixedpoint as fp


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


SOLVERS = ("anderson", "broyden", "neumann")
CLASSES = {"anderson": fp.Anderson, "broyden": fp.Broyden, "neumann": fp.Neumann}
# Stopping rule |g_i| < atol + rtol |y_i|. The float32 tolerances sit well above the
# rounding error of one evaluation of the map (~(n + 4) eps |W| |y| ~ 3e-5 |y| at
# n = 200); the float64 ones are tight.
TOL = {
    "float32": dict(rtol=1e-3, atol=1e-4),
    "float64": dict(rtol=1e-10, atol=1e-12),
}
TRACE = 64
MAX_STEPS = 2000
N = 200  # the size of every `_layer` problem: they all share compiled solves
KINDS = ("gaussian", "symmetric", "rank_one", "diagonal")

PROPERTY = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make(name, **kwargs):
    return CLASSES[name](**kwargs)


# The canonical solvers (equal objects hash equal: one compilation per shape).
SOLVER = {
    dtype: {name: make(name, **TOL[dtype], trace_length=TRACE) for name in SOLVERS} for dtype in TOL
}


def precision(dtype):
    """x64 on for float64 tests, off (the default) for float32 tests."""
    return jax.enable_x64(dtype == "float64")


def ok(sol):
    return bool(sol.result == optx.RESULTS.successful)


_CALLS = []


def _record_call():
    _CALLS.append(None)


def calls_since_reset():
    jax.effects_barrier()
    count = len(_CALLS)
    _CALLS.clear()
    return count


def _layer(z, args):
    """The map z -> W z + x, or tanh(W z + x) when the flag is set. Counts its
    evaluations on the host; aux = (its input, the preactivation)."""
    w, x, nonlinear = args
    jax.debug.callback(_record_call)
    pre = w @ z + x
    return jnp.where(nonlinear, jnp.tanh(pre), pre), {"input": z, "pre": pre}


def _layer_root(z, args):
    out, aux = _layer(z, args)
    return out - z, aux


@eqx.filter_jit
def fixed(solver, y0, args, max_steps=MAX_STEPS):
    return optx.fixed_point(
        _layer, solver, y0, args, has_aux=True, max_steps=max_steps, throw=False
    )


def _layer_root_wide(z, args):
    """`_layer_root` in float64 for a float32 `z` (g returns float64)."""
    return _layer_root(z.astype(jnp.float64), args)


@eqx.filter_jit
def root_wide(solver, y0, args):
    return optx.root_find(
        _layer_root_wide, solver, y0, args, has_aux=True, max_steps=MAX_STEPS, throw=False
    )


@eqx.filter_jit
def root(solver, y0, args, max_steps=MAX_STEPS):
    return optx.root_find(
        _layer_root, solver, y0, args, has_aux=True, max_steps=max_steps, throw=False
    )


# ----------------------------------------------------------------------------------
# Random problems (NumPy, float64) and checks.


# NumPy's threaded BLAS/LAPACK is very slow on a busy 2-core machine, so the checks
# avoid SVDs and big dense solves where they can: matrix-vector products go through
# einsum (no BLAS) and spectral norms are power-iteration estimates.


def matvec(a, v):
    return np.einsum("ij,j->i", a, v)


def norm_estimate(g, iterations=200):
    """||g||_2 from below, by power iteration on g^T g (relative error < 0.5% for
    the Gaussian and symmetric matrices used here, inside the 1% NORM_MARGIN;
    checked against an SVD in test_norm_estimate)."""
    v = np.random.default_rng(0).standard_normal(g.shape[1])
    for _ in range(iterations):
        v = matvec(g.T, matvec(g, v))
        size = np.linalg.norm(v)
        if size == 0:
            return 0.0
        v = v / size
    return float(np.linalg.norm(matvec(g, v)))


NORM_MARGIN = 1.01  # estimate x margin >= the true norm


def random_matrix(rng, n, spectral_norm, kind):
    """A random n x n matrix with ||.||_2 <= spectral_norm (equal to it up to the
    1% margin of the norm estimate)."""
    if kind == "rank_one":  # exact norm |a| |b|
        a, b = rng.standard_normal(n), rng.standard_normal(n)
        g, s = np.outer(a, b), np.linalg.norm(a) * np.linalg.norm(b)
    elif kind == "diagonal":  # exact norm max |d|
        d = rng.uniform(-1, 1, n)
        g, s = np.diag(d), np.max(np.abs(d))
    else:
        g = rng.standard_normal((n, n))
        if kind == "symmetric":  # eigenvalues up to +-spectral_norm: slowest for Picard
            g = g + g.T
        s = norm_estimate(g) * NORM_MARGIN
    return spectral_norm * g / s if s > 0 else np.zeros((n, n))


def padded(w, x, size):
    n = x.shape[0]
    wp = np.zeros((size, size), w.dtype)
    wp[:n, :n] = w
    xp = np.zeros(size, x.dtype)
    xp[:n] = x
    return wp, xp


def check_fixed_point(y, w, x, nonlinear, dtype, tol, residual_stat=None, w_norm=None):
    """Check, in float64, that `y` meets the stopping rule (max norm) of the map
    phi(w y + x) up to the rounding error of one evaluation in `dtype`; for a linear
    map also that it is as close to solve(I - w, x) as that allows. `w_norm`: an
    upper bound of ||w||_2 if known. Returns a bound on ||y - y*||_2."""
    y = np.asarray(y, np.float64)
    w = np.asarray(w, np.float64)
    x = np.asarray(x, np.float64)
    n = y.shape[0]
    u = float(np.finfo(dtype).eps)
    if w_norm is None:
        w_norm = norm_estimate(w) * NORM_MARGIN
    assert w_norm < 1
    assert np.all(np.isfinite(y))
    pre = matvec(w, y) + x
    r = (np.tanh(pre) if nonlinear else pre) - y
    # Rounding error of the evaluated residual (dot products: gamma_n; tanh is
    # 1-Lipschitz and accurate to a few ulps of a value of size <= 1).
    rounding = (n + 4) * u * (matvec(np.abs(w), np.abs(y)) + np.abs(x) + np.abs(y))
    if nonlinear:
        rounding = rounding + 16 * u
    allowed = (tol["atol"] + tol["rtol"] * np.abs(y)) * (1 + 8 * u) + rounding
    worst = np.max(np.abs(r) / allowed)
    assert worst <= 1, f"stopping rule violated by a factor {worst}"
    if residual_stat is not None:  # the reported residual is the returned point's
        assert abs(float(residual_stat) - np.max(np.abs(r))) <= np.max(rounding)
    # |y - y*| <= |r| / (1 - Lipschitz constant) (linear: y - y* = (W - I)^{-1} r).
    bound = np.linalg.norm(allowed) / (1 - w_norm)
    if not nonlinear:
        exact = np.linalg.solve(np.eye(n) - w, x)
        slack = 1e-13 * np.sqrt(n) * (1 + np.max(np.abs(exact))) / (1 - w_norm)
        err = np.linalg.norm(y - exact)
        assert err <= bound + slack, f"error {err} > bound {bound}"
    return bound


def residual_bound(y, w, x):
    """||y - y*||_2 bound for tanh(w y + x) from the float64 residual at y."""
    r = np.tanh(matvec(w, y) + x) - y
    return np.linalg.norm(r) / (1 - norm_estimate(w) * NORM_MARGIN)


def check_trace(sol, trace_length):
    """residual_trace: the first steps' residual norms, NaN after the last step, the
    last entry = the reported residual norm."""
    steps = int(sol.stats["num_steps"])
    trace = np.asarray(sol.stats["residual_trace"])
    assert trace.shape == (trace_length,)
    assert np.all(np.isfinite(trace[:steps])) and np.all(np.isnan(trace[steps:]))
    if steps <= trace_length:
        assert trace[steps - 1] == float(sol.stats["residual_norm"])


def picard_steps(r0_norm, lipschitz, atol):
    """Evaluations within which plain iteration meets the stopping rule on a map of
    Lipschitz constant `lipschitz` (2-norm) whose residual at y0 has 2-norm `r0_norm`:
    ||r_k|| <= lipschitz^k ||r_0|| < atol after k steps, confirmed at evaluation k + 1."""
    if r0_norm < atol:
        return 1
    if lipschitz == 0:
        return 2
    return 1 + math.ceil(math.log(atol / r0_norm) / math.log(lipschitz))


def problem_strategy():
    return st.fixed_dictionaries(
        dict(
            n=st.integers(1, 200),
            spectral_norm=st.floats(0.0, 0.95),
            kind=st.sampled_from(KINDS),
            scale=st.sampled_from([1e-2, 1.0, 1e2]),
            seed=st.integers(0, 2**32 - 1),
        )
    )


def solve_random(problem, name, dtype, nonlinear):
    rng = np.random.default_rng(problem["seed"])
    n = problem["n"]
    w = random_matrix(rng, n, problem["spectral_norm"], problem["kind"])
    x = problem["scale"] * rng.standard_normal(n)
    wp, xp = padded(w, x, N)
    wp = wp.astype(dtype)
    xp = xp.astype(dtype)
    # ||W||_2 after rounding to dtype: at most s + ||rounding error||_F.
    w_norm = problem["spectral_norm"] + float(np.finfo(dtype).eps) * np.sqrt(n) * 0.95
    args = (jnp.asarray(wp), jnp.asarray(xp), jnp.asarray(nonlinear))
    calls_since_reset()
    sol = fixed(SOLVER[dtype][name], jnp.zeros(N, dtype), args)
    assert ok(sol), sol.result
    steps = int(sol.stats["num_steps"])
    # Plain iteration's guarantee (tanh is 1-Lipschitz): a theorem for Neumann, and no
    # accelerated solver may need more on any of these examples.
    r0 = np.linalg.norm(np.tanh(x) if nonlinear else x)
    assert steps <= picard_steps(r0, w_norm, TOL[dtype]["atol"]), steps
    assert calls_since_reset() == steps  # one evaluation per step
    assert sol.value.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(sol.aux["input"], sol.value)  # aux of the result
    check_trace(sol, TRACE)
    y = np.asarray(sol.value)
    assert np.all(y[n:] == 0), "the decoupled padding moved"
    check_fixed_point(
        y[:n],
        wp[:n, :n],
        xp[:n],
        nonlinear,
        dtype,
        TOL[dtype],
        residual_stat=sol.stats["residual_norm"],
        w_norm=w_norm,
    )


@functools.cache
def _small_problem(dtype, norm, seed):
    rng = np.random.default_rng(seed)
    w = random_matrix(rng, N, norm, "gaussian").astype(dtype)
    x = rng.standard_normal(N).astype(dtype)
    return w, x


@pytest.mark.parametrize("kind", ["gaussian", "symmetric"])
def test_norm_estimate(kind):
    """The power-iteration norm estimate is a lower bound within the 1% margin."""
    for seed, n in enumerate([1, 7, 200]):
        g = np.random.default_rng(seed).standard_normal((n, n))
        if kind == "symmetric":
            g = g + g.T
        true = np.linalg.norm(g, 2)
        assert true / NORM_MARGIN < norm_estimate(g) <= true * (1 + 1e-12)


def small_problem(dtype, nonlinear=True, norm=0.9, seed=0):
    """A fixed N-dimensional problem; returns the (w, x, flag) args of `_layer`."""
    w, x = _small_problem(dtype, norm, seed)
    return jnp.asarray(w), jnp.asarray(x), jnp.asarray(nonlinear)


# ----------------------------------------------------------------------------------
# 1. Properties on random problems.


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", SOLVERS)
@PROPERTY
@given(problem=problem_strategy())
def test_random_linear_contraction(name, dtype, problem):
    """z = W z + x, ||W||_2 <= 0.95: the solution agrees with solve(I - W, x) to the
    accuracy that the stopping rule guarantees."""
    with precision(dtype):
        solve_random(problem, name, dtype, nonlinear=False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", SOLVERS)
@PROPERTY
@given(problem=problem_strategy())
def test_random_nonlinear_contraction(name, dtype, problem):
    """z = tanh(W z + x), ||W||_2 <= 0.95: the returned point meets the tolerance
    (true residual, in float64), which bounds its distance to the fixed point."""
    with precision(dtype):
        solve_random(problem, name, dtype, nonlinear=True)


class Leaf:
    def __init__(self, shape):
        self.shape = shape

    def __repr__(self):
        return f"Leaf{self.shape}"


LEAF_SHAPES = [(), (1,), (3,), (2, 2), (2, 1, 3)]
structures = st.recursive(
    st.sampled_from(LEAF_SHAPES).map(Leaf),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
    ),
    max_leaves=5,
)


def _tree_affine(tree, args):
    w, b = args
    flat, unravel = ravel_pytree(tree)
    return unravel(w @ flat + b)


@eqx.filter_jit
def fixed_tree(solver, fn, y0, args):
    return optx.fixed_point(fn, solver, y0, args, max_steps=MAX_STEPS, throw=False)


def check_tree_solution(sol, y0, w, b):
    assert ok(sol), sol.result
    assert jax.tree.structure(sol.value) == jax.tree.structure(y0)
    for got, start in zip(jax.tree.leaves(sol.value), jax.tree.leaves(y0)):
        assert got.shape == start.shape and got.dtype == start.dtype
    flat = np.asarray(ravel_pytree(sol.value)[0])
    check_fixed_point(flat, w, b, False, "float64", TOL["float64"])
    # The flat solution maps back onto the leaves in ravel_pytree order.
    exact = np.linalg.solve(np.eye(flat.size) - w, b)
    exact_tree = ravel_pytree(y0)[1](jnp.asarray(exact))
    for got, want in zip(jax.tree.leaves(sol.value), jax.tree.leaves(exact_tree)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@settings(PROPERTY, max_examples=4)
@given(structure=structures, name=st.sampled_from(SOLVERS), seed=st.integers(0, 2**32 - 1))
@example(structure=Leaf(()), name="broyden", seed=0)
def test_random_pytree(structure, name, seed):
    """Dicts/tuples of arrays of several shapes, with a scalar leaf (or a bare 0-d
    y0): the solution has the structure, shapes and dtypes of y0 and solves the
    flat problem."""
    if not (isinstance(structure, Leaf) and structure.shape == ()):
        structure = {"scalar": Leaf(()), "tree": structure}
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        y0 = jax.tree.map(
            lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape)),
            structure,
            is_leaf=lambda v: isinstance(v, Leaf),
        )
        n = ravel_pytree(y0)[0].size
        w = random_matrix(rng, n, 0.9, "gaussian")
        b = rng.standard_normal(n)
        solver = make(name, **TOL["float64"])
        sol = fixed_tree(solver, _tree_affine, y0, (jnp.asarray(w), jnp.asarray(b)))
        check_tree_solution(sol, y0, w, b)


def _cos_and_affine(tree, args):
    w, b = args
    with jax.numpy_dtype_promotion("standard"):  # (the leaves of "t" mix dtypes)
        flat, unravel = ravel_pytree(tree["t"])
        return {"s": jnp.cos(tree["s"]), "t": unravel(w @ flat + b)}


@pytest.mark.parametrize("name", SOLVERS)
def test_mixed_precision_pytree(name, enable_x64):
    """A nested PyTree with float32 and float64 leaves keeps each leaf's dtype. Its
    0-d leaf solves z = cos(z) (the Dottie number), the rest an affine map."""
    y0 = {
        "s": jnp.array(1.0, jnp.float64),
        "t": (jnp.zeros(3, jnp.float32), {"m": jnp.zeros((2, 2), jnp.float64)}),
    }
    rng = np.random.default_rng(1)
    w = random_matrix(rng, 7, 0.5, "gaussian")
    b = rng.standard_normal(7)
    # The float32 leaf is rounded at every iterate: a float32-sized tolerance.
    solver = make(name, rtol=1e-5, atol=1e-6)
    sol = fixed_tree(solver, _cos_and_affine, y0, (jnp.asarray(w), jnp.asarray(b)))
    assert ok(sol), sol.result
    assert jax.tree.structure(sol.value) == jax.tree.structure(y0)
    for got, start in zip(jax.tree.leaves(sol.value), jax.tree.leaves(y0)):
        assert got.shape == start.shape and got.dtype == start.dtype
    # |cos'| = sin(z*) = 0.674 near z*: the error is <= |g| / (1 - 0.674) < 3.1 |g|.
    np.testing.assert_allclose(sol.value["s"], 0.7390851332151607, rtol=0, atol=3e-5)
    flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(sol.value["t"])])
    exact = np.linalg.solve(np.eye(7) - w, b)
    np.testing.assert_allclose(flat, exact, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------
# 2. Entry points, aux, vmap, jit, dtypes, statistics.


@pytest.mark.parametrize("name", SOLVERS)
def test_root_find_and_fixed_point_agree(name):
    """root_find on g(y) = f(y) - y is the computation fixed_point does on f; the aux
    is the one of the returned point in both."""
    args = small_problem("float32")
    solver = SOLVER["float32"][name]
    y0 = jnp.zeros(N)
    by_fixed = fixed(solver, y0, args)
    by_root = root(solver, y0, args)
    assert ok(by_fixed) and ok(by_root)
    assert int(by_root.stats["num_steps"]) == int(by_fixed.stats["num_steps"])
    np.testing.assert_allclose(by_root.value, by_fixed.value, rtol=1e-6, atol=1e-7)
    w, x, _ = args
    for sol in (by_fixed, by_root):
        check_fixed_point(sol.value, w, x, True, "float32", TOL["float32"])
        np.testing.assert_array_equal(sol.aux["input"], sol.value)
        np.testing.assert_allclose(sol.aux["pre"], w @ sol.value + x, rtol=1e-5, atol=1e-6)


def _coupled_cube(y, args):
    m, c = args
    return y**3 + m @ y - c


@eqx.filter_jit
def _root_cube(solver, y0, args):
    return optx.root_find(_coupled_cube, solver, y0, args, max_steps=200, throw=False)


def root_cube(solver, y0, args):
    return _root_cube(solver, jnp.asarray(y0), jax.tree.map(jnp.asarray, args))


CUBE = {
    "broyden": fp.Broyden(rtol=0.0, atol=1e-10),
    "broyden_ls": fp.Broyden(rtol=0.0, atol=1e-10, line_search=True),
    "broyden_bad": fp.Broyden(rtol=0.0, atol=1e-10, update="bad"),
    "anderson": fp.Anderson(rtol=0.0, atol=1e-10),
    "neumann": fp.Neumann(rtol=0.0, atol=1e-10),
}
# x^3 + M x = c with the root (1, 1.2, 0.8): the Jacobian 3 diag(x^2) + M has
# eigenvalues 1.8..4.6, so the Picard map y + g(y) expands (eigenvalues 2.8..5.6).
CUBE_M = np.array([[0.2, -0.1, 0.05], [0.1, 0.3, -0.2], [0.0, 0.15, -0.1]])
CUBE_ROOT = np.array([1.0, 1.2, 0.8])
CUBE_C = CUBE_ROOT**3 + CUBE_M @ CUBE_ROOT
CUBE_ROOT_2 = (np.zeros((3, 3)), np.full(3, 2.0))  # M = 0, c = 2: y^3 = 2


@pytest.mark.parametrize("name", ["broyden", "broyden_ls", "broyden_bad"])
def test_broyden_solves_non_contractive_root_problems(name, enable_x64):
    """Broyden is a quasi-Newton root finder: it solves problems on which the
    Picard map y + g(y) expands, from a nearby start (there Neumann fails)."""
    cube_root = CUBE_ROOT_2  # y^3 = 2 elementwise
    y0 = jnp.array([1.2, 1.3, 1.1])
    sol = root_cube(CUBE[name], y0, cube_root)
    assert ok(sol), sol.result
    np.testing.assert_allclose(sol.value, 2 ** (1 / 3), rtol=1e-10)
    assert not ok(root_cube(CUBE["neumann"], y0, cube_root))

    coupled = (jnp.asarray(CUBE_M), jnp.asarray(CUBE_C))
    x0 = jnp.asarray(CUBE_ROOT + np.array([0.1, -0.1, 0.05]))
    sol = root_cube(CUBE[name], x0, coupled)
    assert ok(sol), sol.result
    np.testing.assert_allclose(sol.value, CUBE_ROOT, rtol=0, atol=1e-10)
    assert not ok(root_cube(CUBE["neumann"], x0, coupled))


def _slow_linear_map(seed=3, n=40):
    """A symmetric linear map of spectral radius 0.99 (eigenvalues evenly from -0.5 to
    0.99), a right-hand side, the closed form (I - A)^-1 b, and the generator that drew
    them (for more right-hand sides)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.linspace(-0.5, 0.99, n)) @ q.T
    b = rng.normal(size=n)
    return a, b, np.linalg.solve(np.eye(n) - a, b), rng


@eqx.filter_jit
def _solve_affine(solver, a, b):
    """z = A z + b from z = 0 (500 steps at most, no throw)."""
    return optx.fixed_point(
        lambda z, ab: ab[0] @ z + ab[1],
        solver,
        jnp.zeros_like(b),
        (a, b),
        max_steps=500,
        throw=False,
    )


def test_anderson_adaptive_beta(enable_x64):
    """`adaptive_beta`: on a slowly contracting linear map (symmetric, spectral radius
    0.99) the mixing grows to the measured contraction rate, never below beta: the same
    closed-form solution (I - A)^-1 b in fewer evaluations, also batched in float32. On
    the cube-root problem every secant pair has Re(d* s) > 0 (the Picard map expands),
    so nothing changes there: bit-identical iterates to the default."""
    a, b, exact, rng = _slow_linear_map()
    n = b.size
    solve = _solve_affine

    base = fp.Anderson(rtol=0.0, atol=1e-10)
    adaptive = fp.Anderson(rtol=0.0, atol=1e-10, adaptive_beta=True)
    plain, adapted = solve(base, jnp.asarray(a), jnp.asarray(b)), solve(adaptive, a, b)
    assert ok(plain) and ok(adapted)
    np.testing.assert_allclose(adapted.value, exact, rtol=1e-8, atol=1e-8)
    # 119 evaluations instead of 289 (float64).
    assert (int(adapted.stats["num_steps"]), int(plain.stats["num_steps"])) == (119, 289)
    assert float(adapted.state.h0) < -1.0 and float(plain.state.h0) == -1.0

    # float32, a batch of three right-hand sides: the stopping rule bounds the residual
    # (max norm, atol 1e-4), and the solutions are the closed forms to within what
    # that residual allows (condition number 100).
    bs = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
    a32 = jnp.asarray(a, jnp.float32)
    single = fp.Anderson(rtol=0.0, atol=1e-4, adaptive_beta=True)
    batch = jax.vmap(lambda b: solve(single, a32, b))(bs)
    assert bool(jnp.all(batch.result == optx.RESULTS.successful))
    z = np.asarray(batch.value, np.float64)
    residual = z @ a.T + np.asarray(bs, np.float64) - z
    assert np.abs(residual).max() < 1.5e-4
    exact32 = np.linalg.solve(np.eye(n) - a, np.asarray(bs, np.float64).T).T
    np.testing.assert_allclose(z, exact32, rtol=0, atol=100 * 1.5e-4)

    y0 = jnp.array([1.2, 1.3, 1.1])
    cube = [
        root_cube(fp.Anderson(rtol=0.0, atol=1e-10, adaptive_beta=f), y0, CUBE_ROOT_2)
        for f in (False, True)
    ]
    assert ok(cube[0])
    np.testing.assert_array_equal(cube[0].value, cube[1].value)
    assert int(cube[0].stats["num_steps"]) == int(cube[1].stats["num_steps"])


def test_anderson_periodic_restart_on_a_slowly_contracting_linear_map(enable_x64):
    """`periodic_restart`: on the symmetric linear map of spectral radius 0.99 the
    restarted history reaches the closed form (I - A)^-1 b in far fewer evaluations than
    the windowed one (as restarted GMRES(m) against a truncated Krylov method), also
    for a batch of right-hand sides in float32 under `vmap`."""
    a, b, exact, rng = _slow_linear_map()
    n = b.size
    solve = _solve_affine

    windowed = solve(fp.Anderson(rtol=0.0, atol=1e-10), jnp.asarray(a), jnp.asarray(b))
    restarted = solve(fp.Anderson(rtol=0.0, atol=1e-10, periodic_restart=True), a, b)
    assert ok(windowed) and ok(restarted)
    np.testing.assert_allclose(restarted.value, exact, rtol=1e-8, atol=1e-8)
    # 98 evaluations instead of 289 (float64).
    assert (int(restarted.stats["num_steps"]), int(windowed.stats["num_steps"])) == (98, 289)

    bs = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
    single = fp.Anderson(rtol=0.0, atol=1e-4, periodic_restart=True)
    batch = jax.vmap(lambda b: solve(single, jnp.asarray(a, jnp.float32), b))(bs)
    assert bool(jnp.all(batch.result == optx.RESULTS.successful))
    z = np.asarray(batch.value, np.float64)
    exact32 = np.linalg.solve(np.eye(n) - a, np.asarray(bs, np.float64).T).T
    np.testing.assert_allclose(z, exact32, rtol=0, atol=100 * 1.5e-4)


def test_broyden_line_search_from_farther_start(enable_x64):
    """With the line search, Broyden reaches the cube root from 2.0 and 0.5, and the
    search did backtrack on the way (twice, in 18 evaluations)."""
    sol = root_cube(CUBE["broyden_ls"], jnp.array([2.0, 2.1, 0.5]), CUBE_ROOT_2)
    assert ok(sol), sol.result
    np.testing.assert_allclose(sol.value, 2 ** (1 / 3), rtol=1e-10)
    assert int(sol.state.num_backtracks) == 2 and int(sol.stats["num_steps"]) == 18


def _dense_broyden(g, y0, beta, memory, steps, update="good"):
    """Textbook good (or bad) Broyden with an explicit n x n inverse H (restarted from
    -beta I once `memory` updates are in use): the points y_1, ..., y_steps it steps to."""
    n = y0.size
    y, h, count = y0.copy(), -beta * np.eye(n), 0
    y_prev = r_prev = None
    points = []
    for _ in range(steps):
        r = g(y)
        if y_prev is not None:
            s, d = y - y_prev, r - r_prev
            if count >= memory:
                h, count = -beta * np.eye(n), 0
            h_d = h @ d
            if update == "good":
                h = h + np.outer((s - h_d) / (s @ h_d), h.T @ s)
            else:
                h = h + np.outer((s - h_d) / (d @ d), d)
            count += 1
        y_prev, r_prev = y, r
        y = y - h @ r
        points.append(y)
    return points


@pytest.mark.parametrize("memory", [3, 30])
@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("update", ["good", "bad"])
def test_broyden_iterates_match_dense_broyden(memory, beta, update, enable_x64):
    """The low-rank factors reproduce the dense good- (bad-) Broyden iteration step by
    step, across restarts (memory 3 restarts twice in 9 steps)."""
    w, x, flag = small_problem("float64", norm=0.9, seed=5)
    wn, xn = np.asarray(w), np.asarray(x)
    expected = _dense_broyden(
        lambda y: np.tanh(wn @ y + xn) - y, np.zeros(N), beta, memory, 9, update
    )
    solver = fp.Broyden(rtol=0.0, atol=0.0, memory=memory, beta=beta, update=update)
    for k in (1, 5, 9):
        sol = fixed(solver, jnp.zeros(N), (w, x, flag), max_steps=k)
        assert int(sol.stats["num_steps"]) == k
        # After k evaluations the solver returns the point of its k-th step.
        np.testing.assert_allclose(sol.value, expected[k - 1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("n", "memory", "summed"), [(3, 3, True), (6, 30, True), (6, 3, False)])
@pytest.mark.parametrize("update", ["good", "bad"])
def test_broyden_summed_terms_match_dense_broyden(n, memory, summed, update, enable_x64):
    """On a state no larger than the memory the rank-one terms are kept summed, as one
    n x n matrix, and restart when the pairs would: the iterates are still the dense
    textbook iteration's (n = memory = 3 restarts twice in 9 steps), as they are with
    the pairs (n > memory)."""
    rng = np.random.default_rng(7)
    wn = rng.standard_normal((n, n))
    wn *= 0.9 / np.linalg.norm(wn, 2)
    xn = rng.standard_normal(n)
    expected = _dense_broyden(
        lambda y: np.tanh(wn @ y + xn) - y, np.zeros(n), 1.0, memory, 9, update
    )
    solver = fp.Broyden(rtol=0.0, atol=0.0, memory=memory, update=update)
    args = (jnp.asarray(wn), jnp.asarray(xn), jnp.asarray(True))
    for k in (5, 9):
        sol = fixed(solver, jnp.zeros(n), args, max_steps=k)
        assert (sol.state.low_rank.size > 0) == summed
        np.testing.assert_allclose(sol.value, expected[k - 1], rtol=1e-9, atol=1e-12)


def _textbook_anderson(g, y0, m, steps, periodic_restart, reg=1e-8):
    """Textbook type-II Anderson (Walker and Ni 2011) with h0 = -1, the least-squares
    problem solved by its normal equations with unit-norm columns plus `reg`: the
    points y_1, ..., y_steps it steps to. The history keeps the last `m` pairs or, with
    `periodic_restart`, restarts when full from the newest pair alone."""
    y, r = y0.copy(), g(y0)
    dys, drs, points = [], [], []
    for _ in range(steps):
        if dys:
            dy, dr = np.array(dys), np.array(drs)
            norms = np.linalg.norm(dr, axis=1)
            a = dr @ dr.T / np.outer(norms, norms) + reg * np.eye(len(dys))
            gamma = np.linalg.solve(a, dr @ r / norms) / norms
            y_next = y + r - gamma @ (dy + dr)
        else:
            y_next = y + r
        r_next = g(y_next)
        dys.append(y_next - y)
        drs.append(r_next - r)
        if len(dys) > m:
            dys, drs = (dys[-1:], drs[-1:]) if periodic_restart else (dys[1:], drs[1:])
        y, r = y_next, r_next
        points.append(y)
    return points


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("periodic_restart", [False, True])
def test_anderson_iterates_match_textbook_anderson(m, periodic_restart, enable_x64):
    """Step by step the textbook iteration, with the history windowed or periodically
    restarted (m = 3 restarts twice in 9 steps). On this contraction (||W|| = 0.8) no
    safeguard acts and the first secant pair keeps h0 = -1."""
    w, x, flag = small_problem("float64", norm=0.8, seed=5)
    wn, xn = np.asarray(w), np.asarray(x)
    steps = 9
    expected = _textbook_anderson(
        lambda y: np.tanh(wn @ y + xn) - y, np.zeros(N), m, steps, periodic_restart
    )
    solver = fp.Anderson(rtol=0.0, atol=0.0, m=m, periodic_restart=periodic_restart)
    for k in (1, 4, 6, 9):
        sol = fixed(solver, jnp.zeros(N), (w, x, flag), max_steps=k)
        assert int(sol.stats["num_steps"]) == k and int(sol.state.num_restarts) == 0
        assert float(sol.state.h0) == -1.0
        # After k evaluations the solver returns the point of its k-th step.
        np.testing.assert_allclose(sol.value, expected[k - 1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_different_step_counts(name):
    """A batch whose samples need different numbers of steps: each sample stops on
    its own (its own num_steps) and matches the unbatched solve."""
    w, x, flag = small_problem("float32")
    scales = jnp.array([0.0, 0.3, 1.0])
    solver = SOLVER["float32"][name]
    batch = jax.vmap(lambda s: fixed(solver, jnp.zeros(N), (s * w, x, flag)))(scales)
    steps = [int(s) for s in batch.stats["num_steps"]]
    assert steps[0] == 2  # W = 0: y1 = tanh(x) is exact, confirmed at step 2
    # 5 and 9 for every solver (float32: rounding at the tolerance may move the last
    # step by one, but never merge the three).
    assert 4 <= steps[1] <= 6 and 8 <= steps[2] <= 10, steps
    assert bool(jnp.all(batch.result == optx.RESULTS.successful))
    for i, scale in enumerate(scales):
        single = fixed(solver, jnp.zeros(N), (scale * w, x, flag))
        assert int(single.stats["num_steps"]) == steps[i]
        np.testing.assert_allclose(batch.value[i], single.value, rtol=1e-5, atol=1e-6)
        # The residual norm is a small difference f(y) - y of O(1) float32 numbers: the
        # batched and unbatched programs may round it differently by about one ulp of
        # y (4.5e-8 measured under jax 0.8.2-0.10.0), hence the absolute term.
        np.testing.assert_allclose(
            batch.stats["residual_norm"][i],
            single.stats["residual_norm"],
            rtol=1e-4,
            atol=float(jnp.finfo(jnp.float32).eps),
        )
        check_fixed_point(batch.value[i], scale * w, x, True, "float32", TOL["float32"])


@pytest.mark.parametrize("name", SOLVERS)
def test_jit(name):
    """The solve inside a user's jax.jit (throw=True path) gives the same answer."""
    args = small_problem("float32")
    solver = SOLVER["float32"][name]

    @jax.jit
    def solve_and_scale(w, x):
        sol = optx.fixed_point(_layer, solver, jnp.zeros(N), (w, x, True), has_aux=True)
        return 2 * sol.value, sol.stats["num_steps"]

    doubled, steps = solve_and_scale(args[0], args[1])
    reference = fixed(solver, jnp.zeros(N), args)
    np.testing.assert_allclose(doubled / 2, reference.value, rtol=1e-5, atol=1e-6)
    assert int(steps) == int(reference.stats["num_steps"])
    check_fixed_point(doubled / 2, args[0], args[1], True, "float32", TOL["float32"])


@pytest.mark.parametrize("name", SOLVERS)
def test_float32_under_x64(name, enable_x64):
    """float32 inputs while x64 is on: no dtype errors, float32 out, float32 stats
    (the trace buffer too), for both entry points; also when g returns float64."""
    solver = make(name, trace_length=7)
    w, x, flag = small_problem("float32")
    assert w.dtype == jnp.float32
    y0 = jnp.zeros(N, jnp.float32)
    wide = (w.astype(jnp.float64), x.astype(jnp.float64), flag)
    for sol in [fixed(solver, y0, (w, x, flag)), root_wide(solver, y0, wide)]:
        assert ok(sol), sol.result
        assert sol.value.dtype == jnp.float32
        assert sol.stats["residual_norm"].dtype == jnp.float32
        assert sol.stats["residual_trace"].dtype == jnp.float32
        check_trace(sol, 7)
        check_fixed_point(
            sol.value, w, x, True, "float32", dict(rtol=solver.rtol, atol=solver.atol)
        )


@pytest.mark.parametrize("name", SOLVERS)
def test_trace_and_statistics(name, enable_x64):
    """residual_trace, residual_norm and num_steps are consistent, and the solve stops
    at the FIRST point meeting the rule (one step fewer is not enough)."""
    args = small_problem("float64")
    y0 = jnp.zeros(N)
    traced = fixed(SOLVER["float64"][name], y0, args)
    assert ok(traced)
    steps = int(traced.stats["num_steps"])
    assert steps == dict(anderson=23, broyden=22, neumann=23)[name]  # (float64)
    check_trace(traced, TRACE)
    trace = np.asarray(traced.stats["residual_trace"])
    w, x, _ = (np.asarray(a) for a in args)
    y = np.asarray(traced.value)
    # First entry: the residual at y0 = 0; last: the residual at the solution.
    np.testing.assert_allclose(trace[0], np.max(np.abs(np.tanh(x))), rtol=1e-12)
    np.testing.assert_allclose(
        trace[steps - 1], np.max(np.abs(np.tanh(w @ y + x) - y)), rtol=1e-8, atol=1e-15
    )
    # All earlier points failed the stopping rule (|y| <= 1 here, so a residual below
    # atol would have stopped the solve).
    assert np.all(trace[: steps - 1] >= TOL["float64"]["atol"])

    # The first point meeting the rule: with one step fewer the solve is not done.
    fewer = fixed(SOLVER["float64"][name], y0, args, max_steps=steps - 1)
    assert bool(fewer.result == optx.RESULTS.nonlinear_max_steps_reached)
    assert int(fewer.stats["num_steps"]) == steps - 1
    np.testing.assert_array_equal(fewer.stats["residual_trace"][: steps - 1], trace[: steps - 1])


def test_acceleration(enable_x64):
    """On a linear map with eigenvalues up to +-0.95 Picard needs 386 evaluations to
    1e-10, Anderson 140 and Broyden 68 (float64)."""
    rng = np.random.default_rng(0)
    w = random_matrix(rng, N, 0.95, "symmetric")
    args = (jnp.asarray(w), jnp.asarray(rng.standard_normal(N)), jnp.asarray(False))
    steps = {}
    for name in SOLVERS:
        sol = fixed(SOLVER["float64"][name], jnp.zeros(N), args)
        assert ok(sol), (name, sol.result)
        steps[name] = int(sol.stats["num_steps"])
    assert steps == dict(anderson=140, broyden=68, neumann=386), steps


def test_trace_length_and_exact_max_steps(enable_x64):
    """Recording a trace does not change the iterates, and without one there is no
    'residual_trace'; a trace shorter than the run holds its first entries; max_steps
    equal to the steps needed suffices (the last step's point is checked). (The
    trace and the step logic are shared code; Neumann compiles fastest.)"""
    args = small_problem("float64")
    y0 = jnp.zeros(N)
    full = fixed(SOLVER["float64"]["neumann"], y0, args)
    steps = int(full.stats["num_steps"])
    plain = fixed(make("neumann", **TOL["float64"]), y0, args)
    assert ok(plain) and "residual_trace" not in plain.stats
    assert int(plain.stats["num_steps"]) == steps
    np.testing.assert_array_equal(plain.value, full.value)
    assert float(plain.stats["residual_norm"]) == float(full.stats["residual_norm"])
    short = fixed(make("neumann", **TOL["float64"], trace_length=3), y0, args)
    assert ok(short) and int(short.stats["num_steps"]) == steps > 3
    np.testing.assert_array_equal(short.stats["residual_trace"], full.stats["residual_trace"][:3])
    exact = fixed(SOLVER["float64"]["neumann"], y0, args, max_steps=steps)
    assert ok(exact) and int(exact.stats["num_steps"]) == steps
    np.testing.assert_array_equal(exact.value, full.value)


@pytest.mark.parametrize("name", SOLVERS)
def test_one_evaluation_per_step(name):
    """num_steps counts the evaluations of f (host-side counter in the map), for
    both entry points."""
    args = small_problem("float32")
    for solve in (fixed, root):
        calls_since_reset()
        sol = solve(SOLVER["float32"][name], jnp.zeros(N), args)
        assert ok(sol)
        # 9 evaluations (float32: rounding at the tolerance may move the last one).
        assert calls_since_reset() == int(sol.stats["num_steps"])
        assert 8 <= int(sol.stats["num_steps"]) <= 10


@pytest.mark.parametrize(
    "solver, expected_steps",
    [
        (fp.Anderson(m=1, beta=0.5), 30),
        (fp.Anderson(m=12, regularisation=0.0, norm=optx.rms_norm, safeguard_factor=1.5), 16),
        (fp.Broyden(memory=1), 18),
        (
            fp.Broyden(memory=3, beta=0.3, line_search=True, max_backtracks=2, norm=optx.two_norm),
            35,
        ),
        (fp.Neumann(beta=0.5, norm=optx.rms_norm), 41),
    ],
    ids=[
        "anderson_m1",
        "anderson_m12_rms",
        "broyden_mem1",
        "broyden_ls_two",
        "neumann",
    ],
)
def test_hyperparameter_variants(solver, expected_steps, enable_x64):
    """Edge settings still converge, under the stopping rule of their own norm, with
    one evaluation per step, in the evaluations each takes (float64)."""
    solver = eqx.tree_at(lambda s: (s.rtol, s.atol), solver, (1e-8, 1e-10))
    w, x, flag = small_problem("float64", norm=0.8, seed=5)
    calls_since_reset()
    sol = fixed(solver, jnp.zeros(N), (w, x, flag))
    assert ok(sol), sol.result
    assert calls_since_reset() == int(sol.stats["num_steps"]) == expected_steps
    y = np.asarray(sol.value)
    r = np.tanh(np.asarray(w) @ y + np.asarray(x)) - y
    assert float(solver.norm(jnp.asarray(r / (1e-10 + 1e-8 * np.abs(y))))) < 1 + 1e-6
    np.testing.assert_allclose(
        float(sol.stats["residual_norm"]), float(solver.norm(jnp.asarray(r))), rtol=1e-6
    )
    # Close to the canonical solution (both within their residual bounds).
    other = fixed(SOLVER["float64"]["anderson"], jnp.zeros(N), (w, x, flag))
    assert ok(other)
    w, x, other = np.asarray(w), np.asarray(x), np.asarray(other.value)
    distance = np.linalg.norm(y - other)
    assert distance <= residual_bound(y, w, x) + residual_bound(other, w, x)
    assert distance < 1e-6


# ----------------------------------------------------------------------------------
# 4. References.


@pytest.mark.parametrize("name", SOLVERS)
def test_against_scipy_anderson(name, enable_x64):
    """scipy.optimize.anderson on tanh(W z + x) - z: the same point, to tolerance."""
    args = small_problem("float64", norm=0.8, seed=3)
    w, x = np.asarray(args[0]), np.asarray(args[1])
    ref = scipy.optimize.anderson(lambda z: np.tanh(w @ z + x) - z, np.zeros(N), f_tol=1e-13)
    sol = fixed(SOLVER["float64"][name], jnp.zeros(N), args)
    assert ok(sol), sol.result
    bound = check_fixed_point(sol.value, w, x, True, "float64", TOL["float64"], w_norm=0.8)
    assert bound < 1e-8  # the comparison is a tight one
    scipy_bound = residual_bound(ref, w, x)
    assert scipy_bound < 1e-10
    assert np.linalg.norm(np.asarray(sol.value) - ref) <= bound + scipy_bound


@pytest.mark.parametrize("name", ["broyden", "broyden_ls", "anderson"])
def test_against_scipy_broyden1(name, enable_x64):
    """scipy.optimize.broyden1 on the non-contractive system x^3 + M x = c."""
    x0 = CUBE_ROOT + np.array([0.1, -0.1, 0.05])
    ref = scipy.optimize.broyden1(lambda y: y**3 + CUBE_M @ y - CUBE_C, x0, f_tol=1e-13)
    np.testing.assert_allclose(ref, CUBE_ROOT, atol=1e-12)
    sol = root_cube(CUBE[name], jnp.asarray(x0), (jnp.asarray(CUBE_M), jnp.asarray(CUBE_C)))
    assert ok(sol), sol.result
    # |g| < 1e-10 and the Jacobian's smallest singular value is > 1: |y - y*| < 1e-10.
    np.testing.assert_allclose(sol.value, ref, rtol=0, atol=2e-10)


@pytest.mark.parametrize("name", SOLVERS)
def test_closed_forms(name, enable_x64):
    """A 2x2 affine map (embedded in the N-dimensional problem by a zero block):
    I - A = [[0.5, -0.25], [0.25, 0.5]] has det 0.3125 and inverse
    [[0.5, 0.25], [-0.25, 0.5]] / 0.3125, so z = [1.0, 0.75] / 0.3125 = [3.2, 2.4]."""
    a = np.array([[0.5, 0.25], [-0.25, 0.5]])
    w, x = padded(a, np.array([1.0, 2.0]), N)
    solver = SOLVER["float64"][name]
    sol = fixed(solver, jnp.zeros(N), (jnp.asarray(w), jnp.asarray(x), jnp.asarray(False)))
    assert ok(sol)
    np.testing.assert_allclose(sol.value[:2], [3.2, 2.4], rtol=1e-9)
    assert np.all(np.asarray(sol.value[2:]) == 0)


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("k", [1, 7])
def test_neumann_partial_sums(k, beta, enable_x64):
    """rtol = atol = 0, max_steps = k, from y0 = 0: exactly k terms of the Neumann
    series of the damped map M = (1 - beta) I + beta A applied to beta b
    (for beta = 1: sum_{i<k} A^i b)."""
    w, x, flag = small_problem("float64", nonlinear=False, seed=k)
    solver = fp.Neumann(rtol=0.0, atol=0.0, beta=beta)
    sol = fixed(solver, jnp.zeros(N), (w, x, flag), max_steps=k)
    assert bool(sol.result == optx.RESULTS.nonlinear_max_steps_reached)
    assert int(sol.stats["num_steps"]) == k
    a, b = np.asarray(w), np.asarray(x)
    mat = (1 - beta) * np.eye(N) + beta * a
    terms = [beta * b]
    for _ in range(k - 1):
        terms.append(mat @ terms[-1])  # M^i (beta b)
    np.testing.assert_allclose(sol.value, sum(terms), rtol=1e-13, atol=1e-14)
    # The residual reported is that of the last EVALUATED iterate y_{k-1}.
    last = sum(terms[: k - 1]) if k > 1 else np.zeros(N)
    np.testing.assert_allclose(
        float(sol.stats["residual_norm"]),
        np.max(np.abs(a @ last + b - last)),
        rtol=1e-12,
    )


@pytest.mark.parametrize("dtype", ["float32", "float64", "complex128"])
@pytest.mark.parametrize("seed", range(4))
def test_anderson_coefficients_match_least_squares(dtype, seed, enable_x64):
    """Anderson's small solve (normal equations with unit-scaled columns, by Gauss-Jordan
    elimination without pivoting) against an independent NumPy least-squares solution
    of the same regularised problem, with empty columns, a nearly collinear pair
    (condition number ~1e6 before regularisation) and the ring buffer's arbitrary
    column order."""
    from fixedpoint._solver.anderson import anderson_coefficients

    rng = np.random.default_rng(seed)
    m, n, reg = 6, 40, 1e-8 if dtype != "float32" else 1e-5
    complex_ = dtype.startswith("complex")

    def draw(*shape):
        a = rng.standard_normal(shape)
        return a + 1j * rng.standard_normal(shape) if complex_ else a

    dr = draw(m, n) * rng.uniform(1e-3, 1e3, (m, 1))  # columns of very different sizes
    dr[2] = dr[4] * 0.7 + 1e-6 * np.linalg.norm(dr[4]) * draw(n) / np.sqrt(n)
    valid = np.ones(m, bool)
    valid[[1, 5][: seed % 3]] = False  # 0, 1 or 2 empty columns
    dr[~valid] = 0
    r = draw(n)
    gram = np.conj(dr) @ dr.T
    gamma = anderson_coefficients(
        jnp.asarray(gram, dtype),
        jnp.asarray(np.conj(dr) @ r, dtype),
        jnp.asarray(valid),
        jnp.asarray(reg),
    )
    # Reference: min |r - A gamma|^2 + reg |D gamma|^2 over the valid columns, as one
    # stacked least-squares problem (no normal equations).
    a = dr[valid].T
    d = np.linalg.norm(a, axis=0)
    stacked = np.concatenate([a, np.sqrt(reg) * np.diag(d)])
    ref_valid = np.linalg.lstsq(stacked, np.concatenate([r, np.zeros(valid.sum())]), rcond=None)[0]
    ref = np.zeros(m, ref_valid.dtype)
    ref[valid] = ref_valid
    gamma = np.asarray(gamma)
    assert np.all(gamma[~valid] == 0)
    # What matters is the residual of the mixing, compared in the objective's units.
    objective = lambda g: (
        np.linalg.norm(r - a @ g[valid]) ** 2 + reg * np.linalg.norm(d * g[valid]) ** 2
    )
    tol = 1e-3 if dtype == "float32" else 1e-9
    assert objective(gamma) <= objective(ref) * (1 + tol) + tol * np.linalg.norm(r) ** 2
    scale = float(np.linalg.norm(d * ref_valid))
    atol = (1e-2 if dtype == "float32" else 1e-6) * max(scale, 1.0)
    np.testing.assert_allclose(d * gamma[valid], d * ref_valid, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.complex64])
def test_stopping_rule_without_division_decides_as_the_scaled_max_norm(dtype):
    """For the max norm the stopping rule is evaluated as |r_i| < atol + rtol |y_i|
    (no division per element). It must decide exactly as max_i |r_i / (atol + rtol
    |y_i|)| < 1 - the other norms' path - including zero tolerances (0/0), zeros,
    infinities and NaN, on a PyTree; values are drawn away from the threshold itself,
    where the two may round differently."""
    from fixedpoint._solver._common import _within_tolerance

    rng = np.random.default_rng(0)
    special = np.array([0.0, np.inf, -np.inf, np.nan, 1e-30, 1e30])
    # Edge cases first: r = 0 with zero tolerances (0/0: not converged), r = 0 with
    # y = inf (0/inf), r = inf with y = inf (inf/inf), then random draws.
    edges = [(0.0, 1.0), (0.0, np.inf), (np.inf, np.inf), (1e-7, 0.0)]
    with jax.enable_x64(True):
        for trial in range(200):
            shape = (int(rng.integers(1, 4)),)
            r = rng.normal(size=(2,) + shape) * 10.0 ** rng.integers(-8, 3)
            y = rng.normal(size=(2,) + shape) * 10.0 ** rng.integers(-3, 3)
            if trial < 4 * len(edges):
                r[:], y[:] = edges[trial // 4]
            elif trial % 4 == 0:
                r.flat[rng.integers(r.size)] = rng.choice(special)
            if trial % 5 == 0:
                y.flat[rng.integers(y.size)] = rng.choice(special)
            rtol, atol = [(0.0, 0.0), (1e-4, 0.0), (0.0, 1e-6), (1e-3, 1e-6)][trial % 4]
            r_tree = {"a": jnp.asarray(r[0], dtype), "b": jnp.asarray(r[1], dtype)}
            y_tree = {"a": jnp.asarray(y[0], dtype), "b": jnp.asarray(y[1], dtype)}
            with jax.numpy_dtype_promotion("standard"):  # (complex r over a real scale)
                scaled = jax.tree.map(
                    lambda ri, yi: ri / (atol + rtol * jnp.abs(yi)), r_tree, y_tree
                )
            ratio = float(optx.max_norm(scaled))
            if np.isfinite(ratio) and abs(ratio - 1) < 1e-3:
                continue
            expected = bool(optx.max_norm(scaled) < 1)
            assert bool(_within_tolerance(r_tree, y_tree, rtol, atol, optx.max_norm)) == expected
            assert bool(_within_tolerance(r_tree, y_tree, rtol, atol, optx.rms_norm)) == bool(
                optx.rms_norm(scaled) < 1
            )
