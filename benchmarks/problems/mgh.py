r"""The 23 standard test problems for nonlinear systems $g(y) = 0$.

These are the problems of J. J. Moré, B. S. Garbow and K. E. Hillstrom, "Testing
unconstrained optimization software", ACM TOMS 7(1), 17-41 (1981), with a few more
from J. Burkardt's collection ``test_nonlin``, exactly as Julia's
`NonlinearProblemLibrary.jl <https://github.com/SciML/DiffEqProblemLibrary.jl/tree/master/lib/NonlinearProblemLibrary>`_
(version 0.1.7, ``src/NonlinearProblemLibrary.jl``: its ``problems`` tuple, the
"23 test problems" that NonlinearSolve.jl benchmarks) defines them: the same order,
sizes ``n``, starting points and formulas, rewritten here with `jax.numpy`. Where that
library differs from the original definitions we follow the library, in particular:

- Watson (``n = 2``): the library's residual, not the gradient of the paper's
  least-squares function: its sums carry the factors ``j`` and ``k`` where that
  gradient has ``j - 1`` and ``k - 1``, and its last term of ``g_2`` is
  ``y_2 (1 - y_2) - 1`` where the gradient has ``y_2 - y_1^2 - 1`` (the term of
  ``g_1``, ``y_1 (3 - 2 y_2 + 2 y_1^2)``, is the gradient's since its version 0.1.2);
- Chebyquad (``n = 2``) uses the Chebyshev polynomials on ``[-1, 1]`` (the paper's
  are shifted to ``[0, 1]``), with the start ``(2i - n) / (n + 1)``, i.e. ``(0, 2/3)``
  (the paper's start mapped to ``[-1, 1]`` would be ``(-1/3, 1/3)``), and the root
  ``(-1/sqrt(3), 1/sqrt(3))``;
- the discrete integral equation counts the term ``j = k`` in both of its sums (the
  paper's second sum starts at ``j = k + 1``);
- Chandrasekhar's H-equation (``n = 10``, ``c = 0.9``) uses the nodes ``mu_i = i / n``
  (rather than the midpoints ``(i - 1/2) / n``).

Each problem is an `MGHProblem`: ``fn(y) -> g`` written with `jax.numpy` (for JAX
solvers as it is, for SciPy jitted and converted: see `numpy_fn`), ``y0`` a NumPy
float64 array, ``root`` a known root where the library gives one. `MGH_PROBLEMS` lists
them in the library's order. `padded` packs all of them into one problem of size
``n_max = 10`` selected by an integer index, so that one compilation of a solver covers
all 23 (and `jax.vmap` over the index solves all of them in one call).

All functions need float64 (``jax.enable_x64``) for the tolerances the benchmark
uses (``max|g(y)| <= 1e-6``).
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


@dataclasses.dataclass(frozen=True, eq=False)
class MGHProblem:
    """One test problem: find ``y`` with ``fn(y) = 0``.

    - `number`: its number in the library (1-23).
    - `name`: a short identifier (test ids, ``--problems`` of `benchmarks.nonlinear`).
    - `title`: the library's title.
    - `n`: the number of unknowns (and equations).
    - `fn`: ``y -> g(y)``, both of shape ``(n,)``, written with `jax.numpy`.
    - `y0`: the standard starting point, a NumPy float64 array of shape ``(n,)``.
    - `root`: a known root (float64, shape ``(n,)``), or None where the library gives
      none. It need not be the root a solver finds from `y0`.
    - `note`: a comment (an approximate root, several roots, ...).
    """

    number: int
    name: str
    title: str
    n: int
    fn: Callable[[Array], Array]
    y0: np.ndarray
    root: np.ndarray | None = None
    note: str = ""

    def residual(self, y) -> float:
        """``max|g(y)|`` at `y` in float64 (``inf`` if not finite), computed with
        `jax.numpy` independently of any solver."""
        with jax.enable_x64(True):
            g = np.asarray(_jitted(self)(jnp.asarray(np.asarray(y, np.float64))), np.float64)
        out = float(np.max(np.abs(g)))
        return out if math.isfinite(out) else math.inf


@functools.cache
def _jitted(problem: MGHProblem) -> Callable[[Array], Array]:
    return jax.jit(problem.fn)


def _f64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------------------
# The residuals. ``y`` has shape (n,); indices in comments are the library's (1-based).


def _rosenbrock(y):
    # g_1 = 1 - y_1, g_k = 10 (y_k - y_{k-1}^2).
    return jnp.concatenate([1.0 - y[:1], 10.0 * (y[1:] - y[:-1] ** 2)])


def _powell_singular(y):
    return jnp.stack(
        [
            y[0] + 10.0 * y[1],
            math.sqrt(5.0) * (y[2] - y[3]),
            (y[1] - 2.0 * y[2]) ** 2,
            math.sqrt(10.0) * (y[0] - y[3]) ** 2,
        ]
    )


def _powell_badly_scaled(y):
    return jnp.stack([10000.0 * y[0] * y[1] - 1.0, jnp.exp(-y[0]) + jnp.exp(-y[1]) - 1.0001])


def _wood(y):
    t1 = y[1] - y[0] ** 2
    t2 = y[3] - y[2] ** 2
    return jnp.stack(
        [
            -200.0 * y[0] * t1 - (1.0 - y[0]),
            200.0 * t1 + 20.2 * (y[1] - 1.0) + 19.8 * (y[3] - 1.0),
            -180.0 * y[2] * t2 - (1.0 - y[2]),
            180.0 * t2 + 20.2 * (y[3] - 1.0) + 19.8 * (y[1] - 1.0),
        ]
    )


def _helical_valley(y):
    # theta = atan(y2 / y1) / (2 pi), + 1/2 for y1 < 0, and sign(y2) / 4 at y1 = 0. The
    # division is guarded so that neither branch of `where` makes NaNs (nor NaN
    # derivatives) at y1 = 0.
    y1, y2, y3 = y[0], y[1], y[2]
    safe = jnp.where(y1 == 0, 1.0, y1)
    t = jnp.arctan(y2 / safe) / (2.0 * math.pi)
    theta = jnp.where(y1 > 0, t, jnp.where(y1 < 0, t + 0.5, 0.25 * jnp.sign(y2)))
    return jnp.stack([10.0 * (y3 - 10.0 * theta), 10.0 * (jnp.sqrt(y1**2 + y2**2) - 1.0), y3])


def _watson(y):
    # For t_i = i/29, i = 1..29: s1_i = sum_{j>=2} j t_i^(j-2) y_j, s2_i = sum_j t_i^(j-1)
    # y_j, and g_k = sum_i t_i^(k-2) (s1_i - s2_i^2 - 1) (k - 2 t_i s2_i); then the extra
    # terms of g_1 and g_2.
    n = y.shape[0]
    t = np.arange(1, 30, dtype=np.float64) / 29.0
    j = np.arange(1, n + 1, dtype=np.float64)
    powers = t[:, None] ** (j - 1.0)[None, :]  # t_i^(j-1), shape (29, n)
    s1 = powers[:, : n - 1] @ (j[1:] * y[1:])
    s2 = powers @ y
    r = s1 - s2**2 - 1.0
    g = jnp.sum(
        (powers / t[:, None]) * (r[:, None] * (j[None, :] - 2.0 * t[:, None] * s2[:, None])), axis=0
    )
    extra = jnp.zeros(n).at[0].set(y[0] * (3.0 - 2.0 * y[1] + 2.0 * y[0] ** 2))
    extra = extra.at[1].set(y[1] * (1.0 - y[1]) - 1.0)
    return g + extra


def _chebyquad(y):
    # g_i = (1/n) sum_j T_i(y_j) + (1 / (i^2 - 1) for even i), T_i the Chebyshev
    # polynomials on [-1, 1].
    n = y.shape[0]
    rows = []
    t_prev, t_cur = jnp.ones_like(y), y
    for _ in range(n):
        rows.append(jnp.sum(t_cur))
        t_prev, t_cur = t_cur, 2.0 * y * t_cur - t_prev
    i = np.arange(1, n + 1)
    shift = np.array([1.0 / (k * k - 1.0) if k % 2 == 0 else 0.0 for k in i])
    return jnp.stack(rows) / n + shift


def _brown_almost_linear(y):
    n = y.shape[0]
    return jnp.concatenate([y[:-1] + jnp.sum(y) - (n + 1.0), jnp.prod(y)[None] - 1.0])


def _neighbours(y):
    """(y_{k-1}, y_{k+1}) with zeros outside 1..n."""
    zero = jnp.zeros(1, y.dtype)
    return jnp.concatenate([zero, y[:-1]]), jnp.concatenate([y[1:], zero])


def _discrete_boundary_value(y):
    n = y.shape[0]
    h = 1.0 / (n + 1)
    k = np.arange(1, n + 1, dtype=np.float64)
    left, right = _neighbours(y)
    return 2.0 * y + 0.5 * h**2 * (y + k * h + 1.0) ** 3 - left - right


def _discrete_integral_equation(y):
    # g_k = y_k + h ((1 - t_k) sum_{j<=k} t_j c_j + t_k sum_{j>=k} (1 - t_j) c_j) / 2,
    # c_j = (y_j + t_j + 1)^3, t_j = j h.
    n = y.shape[0]
    h = 1.0 / (n + 1)
    t = np.arange(1, n + 1, dtype=np.float64) * h
    c = (y + t + 1.0) ** 3
    s1 = jnp.cumsum(t * c)
    s2 = jnp.cumsum(((1.0 - t) * c)[::-1])[::-1]
    return y + h * ((1.0 - t) * s1 + t * s2) / 2.0


def _trigonometric(y):
    n = y.shape[0]
    k = np.arange(1, n + 1, dtype=np.float64)
    return n - jnp.sum(jnp.cos(y)) + k * (1.0 - jnp.cos(y)) - jnp.sin(y)


def _variably_dimensioned(y):
    n = y.shape[0]
    k = np.arange(1, n + 1, dtype=np.float64)
    s = jnp.sum(k * (y - 1.0))
    return y - 1.0 + k * s * (1.0 + 2.0 * s**2)


def _broyden_tridiagonal(y):
    left, right = _neighbours(y)
    return (3.0 - 2.0 * y) * y + 1.0 - left - 2.0 * right


def _broyden_banded(y):
    # g_k = y_k (2 + 5 y_k^2) + 1 - sum_{j in [k-5, k+1], j != k} y_j (1 + y_j).
    n = y.shape[0]
    k = np.arange(n)
    band = (k[None, :] >= k[:, None] - 5) & (k[None, :] <= k[:, None] + 1)
    band = (band & (k[None, :] != k[:, None])).astype(np.float64)
    return y * (2.0 + 5.0 * y**2) + 1.0 - band @ (y * (1.0 + y))


def _matrix_square_root(a: np.ndarray):
    # X X - A with X the row-major reshape of y.
    m = a.shape[0]

    def fn(y):
        x = y.reshape(m, m)
        return (x @ x - a).reshape(-1)

    return fn


_HAMMARLING_2 = _f64([[1e-4, 1.0], [0.0, 1e-4]])
_HAMMARLING_3 = _f64([[1e-4, 1.0, 0.0], [0.0, 1e-4, 0.0], [0.0, 0.0, 1e-4]])


def _dennis_schnabel(y):
    return jnp.stack([y[0] + y[1] - 3.0, y[0] ** 2 + y[1] ** 2 - 9.0])


def _sample_18(y):
    # g_1 = y_2^2 (1 - exp(-y_1^2)) / y_1 and g_2 = y_1 (1 - exp(-y_2^2)) / y_2, each 0
    # where its divisor is 0 (guarded as in `_helical_valley`).
    y1, y2 = y[0], y[1]
    s1 = jnp.where(y1 == 0, 1.0, y1)
    s2 = jnp.where(y2 == 0, 1.0, y2)
    g1 = jnp.where(y1 == 0, 0.0, y2**2 * -jnp.expm1(-(s1**2)) / s1)
    g2 = jnp.where(y2 == 0, 0.0, y1 * -jnp.expm1(-(s2**2)) / s2)
    return jnp.stack([g1, g2])


def _sample_19(y):
    return y * jnp.sum(y**2)


def _scalar(y):
    return y * (y - 5.0) ** 2


def _freudenstein_roth(y):
    y1, y2 = y[0], y[1]
    return jnp.stack(
        [
            y1 - y2**3 + 5.0 * y2**2 - 2.0 * y2 - 13.0,
            y1 + y2**3 + y2**2 - 14.0 * y2 - 29.0,
        ]
    )


def _boggs(y):
    y1, y2 = y[0], y[1]
    return jnp.stack([y1**2 - y2 + 1.0, y1 - jnp.cos(0.5 * math.pi * y2)])


def _chandrasekhar(y):
    # g_i = y_i - 1 / (1 - c / (2n) sum_j mu_i y_j / (mu_i + mu_j)), mu_i = i / n.
    n = y.shape[0]
    c = 0.9
    mu = np.arange(1, n + 1, dtype=np.float64) / n
    kernel = mu[:, None] / (mu[:, None] + mu[None, :])
    return y - 1.0 / (1.0 - c / (2 * n) * (kernel @ y))


def _grid(n: int, f: Callable[[int], float]) -> np.ndarray:
    return _f64([f(i) for i in range(1, n + 1)])


MGH_PROBLEMS: tuple[MGHProblem, ...] = (
    MGHProblem(
        1,
        "rosenbrock",
        "Generalized Rosenbrock function",
        10,
        _rosenbrock,
        _f64([-1.2] + [1.0] * 9),
        np.ones(10),
    ),
    MGHProblem(
        2,
        "powell_singular",
        "Powell singular function",
        4,
        _powell_singular,
        _f64([3.0, -1.0, 0.0, 1.0]),
        np.zeros(4),
        "singular Jacobian at the root",
    ),
    MGHProblem(
        3,
        "powell_badly_scaled",
        "Powell badly scaled function",
        2,
        _powell_badly_scaled,
        _f64([0.0, 1.0]),
        _f64([1.098159e-5, 9.106146]),
        "the library's root has 7 digits: max|g| ~ 1e-6 there",
    ),
    MGHProblem(
        4,
        "wood",
        "Wood function",
        4,
        _wood,
        _f64([-3.0, -1.0, -3.0, -1.0]),
        np.ones(4),
    ),
    MGHProblem(
        5,
        "helical_valley",
        "Helical valley function",
        3,
        _helical_valley,
        _f64([-1.0, 0.0, 0.0]),
        _f64([1.0, 0.0, 0.0]),
        "theta jumps by 1 across y_1 = 0 where y_2 < 0",
    ),
    MGHProblem(
        6,
        "watson",
        "Watson function",
        2,
        _watson,
        np.zeros(2),
    ),
    MGHProblem(
        7,
        "chebyquad",
        "Chebyquad function",
        2,
        _chebyquad,
        _grid(2, lambda i: (2 * i - 2) / 3),
        _f64([2 * 0.2113248654051871 - 1, 2 * 0.7886751345948129 - 1]),
    ),
    MGHProblem(
        8,
        "brown_almost_linear",
        "Brown almost linear function",
        10,
        _brown_almost_linear,
        np.full(10, 0.5),
        np.ones(10),
    ),
    MGHProblem(
        9,
        "discrete_boundary_value",
        "Discrete boundary value function",
        10,
        _discrete_boundary_value,
        _grid(10, lambda i: i * (i - 11) / 121),
    ),
    MGHProblem(
        10,
        "discrete_integral_equation",
        "Discrete integral equation function",
        10,
        _discrete_integral_equation,
        _grid(10, lambda i: i * (i - 11) / 121),
    ),
    MGHProblem(
        11,
        "trigonometric",
        "Trigonometric function",
        10,
        _trigonometric,
        np.full(10, 0.1),
    ),
    MGHProblem(
        12,
        "variably_dimensioned",
        "Variably dimensioned function",
        10,
        _variably_dimensioned,
        _grid(10, lambda i: 1 - i / 10),
        np.ones(10),
    ),
    MGHProblem(
        13,
        "broyden_tridiagonal",
        "Broyden tridiagonal function",
        10,
        _broyden_tridiagonal,
        np.full(10, -1.0),
    ),
    MGHProblem(
        14,
        "broyden_banded",
        "Broyden banded function",
        10,
        _broyden_banded,
        np.full(10, -1.0),
    ),
    MGHProblem(
        15,
        "hammarling_2x2",
        "Hammarling 2 by 2 matrix square root problem",
        4,
        _matrix_square_root(_HAMMARLING_2),
        _f64([1.0, 0.0, 0.0, 1.0]),
        _f64([0.01, 50.0, 0.0, 0.01]),
    ),
    MGHProblem(
        16,
        "hammarling_3x3",
        "Hammarling 3 by 3 matrix square root problem",
        9,
        _matrix_square_root(_HAMMARLING_3),
        _f64([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
        _f64([0.01, 50.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.01]),
    ),
    MGHProblem(
        17,
        "dennis_schnabel",
        "Dennis and Schnabel 2 by 2 example",
        2,
        _dennis_schnabel,
        _f64([1.0, 5.0]),
        _f64([0.0, 3.0]),
    ),
    MGHProblem(
        18,
        "sample_18",
        "Sample problem 18",
        2,
        _sample_18,
        _f64([2.0, 2.0]),
        np.zeros(2),
    ),
    MGHProblem(
        19,
        "sample_19",
        "Sample problem 19",
        2,
        _sample_19,
        _f64([3.0, 3.0]),
        np.zeros(2),
        "triple root at 0: the Jacobian vanishes there",
    ),
    MGHProblem(
        20,
        "scalar",
        "Scalar problem f(x) = x(x - 5)^2",
        1,
        _scalar,
        _f64([1.0]),
        _f64([5.0]),
        "roots 0 (simple) and 5 (double)",
    ),
    MGHProblem(
        21,
        "freudenstein_roth",
        "Freudenstein-Roth function",
        2,
        _freudenstein_roth,
        _f64([0.5, -2.0]),
        _f64([5.0, 4.0]),
    ),
    MGHProblem(
        22,
        "boggs",
        "Boggs function",
        2,
        _boggs,
        _f64([1.0, 0.0]),
        _f64([0.0, 1.0]),
    ),
    MGHProblem(
        23,
        "chandrasekhar",
        "Chandrasekhar function",
        10,
        _chandrasekhar,
        np.ones(10),
    ),
)


def by_name(name: str) -> MGHProblem:
    """The problem called `name` (`MGHProblem.name`); `KeyError` if none."""
    for problem in MGH_PROBLEMS:
        if problem.name == name:
            return problem
    raise KeyError(f"no problem {name!r}; known: {[p.name for p in MGH_PROBLEMS]}")


def numpy_fn(problem: MGHProblem) -> Callable[[np.ndarray], np.ndarray]:
    """``y -> g(y)`` for NumPy callers (SciPy): the jitted JAX function, float64 in and
    out. Call it inside ``jax.enable_x64(True)``."""
    jitted = _jitted(problem)

    def fn(y):
        return np.asarray(jitted(jnp.asarray(np.asarray(y, np.float64))), np.float64)

    return fn


@dataclasses.dataclass(frozen=True, eq=False)
class PaddedProblems:
    """Several problems as one of a common size `n_max`, selected by an integer.

    ``fn(y, index)`` applies ``problems[index].fn`` to the first ``n`` entries of
    ``y`` (``n = problems[index].n``) and ``g_i = y_i`` to the rest (the padding).
    The padding of `y0` is 0, a root of ``g_i = y_i`` that does not depend on the other
    entries: a solver that keeps a zero residual component at zero (Anderson's and
    Broyden's updates do: every difference of iterates and residuals is 0 there)
    solves the padded problem exactly as the unpadded one, with the same max-norm
    residuals. ``fn`` has the signature ``fn(y, args)`` of `optx.root_find`: pass the
    index as `args`; `jax.lax.switch` selects the problem, so one compilation serves
    every index, and `jax.vmap` over the index solves all problems in one call.

    - `problems`: the problems, in order.
    - `n_max`: the largest ``n``.
    - `y0`: the padded starting points, shape ``(len(problems), n_max)``.
    - `sizes`: the ``n`` of each problem.
    """

    problems: tuple[MGHProblem, ...]
    n_max: int
    y0: np.ndarray
    sizes: tuple[int, ...]

    def fn(self, y, index):
        def branch(problem):
            def apply(y):
                return jnp.concatenate([problem.fn(y[: problem.n]), y[problem.n :]])

            return apply

        return jax.lax.switch(index, [branch(p) for p in self.problems], y)

    def unpad(self, y, index: int) -> np.ndarray:
        """The first ``n`` entries of a padded point of problem `index`."""
        return np.asarray(y)[: self.sizes[index]]


def padded(problems: Sequence[MGHProblem] = MGH_PROBLEMS) -> PaddedProblems:
    """`problems` packed into one `PaddedProblems`."""
    problems = tuple(problems)
    n_max = max(p.n for p in problems)
    y0 = np.zeros((len(problems), n_max))
    for i, p in enumerate(problems):
        y0[i, : p.n] = p.y0
    return PaddedProblems(problems, n_max, y0, tuple(p.n for p in problems))
