r"""The problem suite of the benchmarks.

Every problem is a `Problem`: a fixed-point problem $z = f(z)$ (``kind="fixed_point"``)
or a root problem $g(z) = 0$ (``kind="root"``). Its function is written once, against
an array namespace ``xp`` (NumPy, `jax.numpy` or `torch`), so that every library gets
a native function: JAX solvers a jitted JAX function, SciPy a NumPy one, torchdeq a
torch one. Functions are written in "row" form (``z @ W_t``), so that they accept a
single state of shape ``(n,)`` and a batch of shape ``(B, n)`` alike.

Conventions, shared by all solvers:

- The residual is ``F(z) = f(z) - z`` for a fixed-point problem and ``F(z) = g(z)``
  for a root problem. Root problems are scaled so that ``z + F(z)`` is a sensible
  (damped, contracting) Picard map, i.e. ``-I`` is a sensible initial guess of the
  inverse Jacobian of ``F`` (the convention of `optx.fixed_point`, SciPy's
  `anderson`/`broyden1` with ``alpha=1`` and torchdeq). Solvers that only take a
  fixed-point map (jaxopt, torchdeq, `optx.FixedPointIteration`) get ``z + F(z)``.
- **The common residual** (the one definition applied to every solver):
  ``||F(z)||_2 / ||F(z_0)||_2``, the 2-norm of the residual relative to the one at
  the (fixed, shared) initial point. For a batch of states ``z`` of shape ``(B, n)``
  the norm is taken per state and the worst state counts:
  ``max_b ||F(z_b)||_2 / max_b ||F(z_{0,b})||_2`` (one absolute threshold for all
  states). See `Problem.relative_residual`.

Problems are registered in grids: ``"smoke"`` (tiny sizes, run once by the default
test run), ``"default"`` (the report's default and the timed `pytest --benchmark-only`
run) and ``"full"`` (the report's ``--full`` grid, `@pytest.mark.slow` in the tests).
Register more with `register`.

A problem whose inputs are not on the machine (the MNIST digits, a trained MNIST
checkpoint: see `mnist_deq_cell`) raises `Unavailable` when built; the report lists it
as not run and the tests skip it, saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fixedpoint_deq.mnist.data import ENV_MNIST_DIR


GRIDS = ("smoke", "default", "full")
SMOKE = ("smoke",)
DEFAULT = ("default", "full")
FULL = ("full",)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One benchmark problem.

    - `name`: unique id (used as pytest id and benchmark group).
    - `family`: the problem family (``linear``, ``tanh``, ...).
    - `kind`: ``"fixed_point"`` (`fn` is the map ``f``) or ``"root"`` (`fn` is ``g``).
    - `fn`: ``fn(z, params, xp) -> array`` like ``z``; ``xp`` is the array namespace.
      Problems of one family share the same `fn` object, so that JAX solvers compiled
      for one are reused for the others of the same shapes (parameters are arguments).
    - `params`: the parameters, NumPy float64 arrays (converted per library).
    - `z0`: the initial point, shape ``(n,)`` or ``(B, n)`` for a batch.
    - `batch_axes`: for a batch, which parameters are per state (axis 0) and which are
      shared (None), as ``jax.vmap``'s ``in_axes``; None for a single state.
    - `description`, `source`, `solution`: documentation (also in the report).
    - `exact`: a closed-form solution, where one exists.
    """

    name: str
    family: str
    kind: str
    fn: Callable[[Any, dict, Any], Any]
    params: dict[str, np.ndarray]
    z0: np.ndarray
    batch_axes: dict[str, int | None] | None = None
    description: str = ""
    source: str = ""
    solution: str = ""
    exact: Callable[[], np.ndarray] | None = None

    def __post_init__(self):
        if self.kind not in ("fixed_point", "root"):
            raise ValueError(f"kind must be 'fixed_point' or 'root', got {self.kind!r}")

    @property
    def batched(self) -> bool:
        return self.batch_axes is not None

    @property
    def batch_size(self) -> int:
        return self.z0.shape[0] if self.batched else 1

    @property
    def dim(self) -> int:
        """Size of one state (``n``)."""
        return self.z0.shape[-1]

    def fixed_point_map(self, z, params, xp):
        """``f(z)``, or the Picard map ``z + g(z)`` of a root problem."""
        out = self.fn(z, params, xp)
        return out if self.kind == "fixed_point" else z + out

    def residual(self, z, params, xp):
        """``F(z)``: ``f(z) - z``, or ``g(z)`` for a root problem."""
        out = self.fn(z, params, xp)
        return out - z if self.kind == "fixed_point" else out

    def params_in(self, xp) -> dict[str, Any]:
        """The parameters as arrays of namespace ``xp`` (float64)."""
        if xp is np:
            return dict(self.params)
        if xp.__name__ == "torch":
            return {k: xp.from_numpy(np.array(v, dtype=np.float64)) for k, v in self.params.items()}
        return {k: xp.asarray(v) for k, v in self.params.items()}

    def lane_params(self, b: int) -> dict[str, np.ndarray]:
        """The parameters of state ``b`` of a batch (NumPy)."""
        assert self.batched
        return {
            k: (v[b] if self.batch_axes.get(k) == 0 else v) for k, v in self.params.items()
        }

    def lane(self, b: int) -> "Problem":
        """State ``b`` of a batch as a single-state problem (its own `scale`)."""
        assert self.batched
        return dataclasses.replace(
            self, name=f"{self.name}[{b}]", params=self.lane_params(b), z0=self.z0[b], batch_axes=None
        )

    def lane_norms(self, residual) -> np.ndarray:
        """Per-state 2-norms of a residual array, shape ``(B,)`` (``(1,)`` if single)."""
        r = np.asarray(residual, dtype=np.float64)
        return np.atleast_1d(np.linalg.norm(r.reshape(-1, self.dim), axis=-1))

    @functools.cached_property
    def scale(self) -> float:
        """``max_b ||F(z_{0,b})||_2``: the denominator of the common residual."""
        return float(self.lane_norms(self.residual(self.z0, self.params, np)).max())

    def lane_residuals(self, z) -> np.ndarray:
        """Common relative residual of each state of ``z`` (NumPy recomputation)."""
        z = np.asarray(z, dtype=np.float64).reshape(self.z0.shape)
        return self.lane_norms(self.residual(z, self.params, np)) / self.scale

    def relative_residual(self, z) -> float:
        """The common residual ``max_b ||F(z_b)||_2 / max_b ||F(z_{0,b})||_2``."""
        return float(self.lane_residuals(z).max())

    def signature(self) -> tuple:
        """What a compiled JAX solver depends on: the function, kind, shapes and the
        batch layout (not the parameter values)."""
        shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in self.params.items()))
        axes = None if self.batch_axes is None else tuple(sorted(self.batch_axes.items()))
        return (self.fn, self.kind, shapes, self.z0.shape, axes)

    def reference(self) -> np.ndarray:
        """The known solution: the closed form if there is one, else Newton's method
        (dense Jacobian, float64) to a residual below 1e-13 (relative)."""
        if self.exact is not None:
            return self.exact()
        return newton_reference(self)


#: Largest system (all states together) solved with a dense Jacobian by `newton_reference`.
DENSE_REFERENCE_MAX = 4096


def newton_reference(problem: Problem, max_iter: int = 50) -> np.ndarray:
    """Solve ``F(z) = 0`` by Newton's method in float64, from ``z0``, to a common
    residual below 1e-13: with a dense JAX Jacobian up to `DENSE_REFERENCE_MAX`
    unknowns, else matrix-free (Newton-Krylov: each step solves ``J d = -F`` by
    restarted GMRES on Jacobian-vector products, to a relative 1e-10)."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.sparse.linalg import gmres

    with jax.enable_x64(True):
        params = problem.params_in(jnp)
        shape = problem.z0.shape
        dense = problem.z0.size <= DENSE_REFERENCE_MAX

        def flat_residual(x):
            return problem.residual(x.reshape(shape), params, jnp).ravel()

        @jax.jit
        def newton_step(x):
            r = flat_residual(x)
            if dense:
                return x - jnp.linalg.solve(jax.jacfwd(flat_residual)(x), r)
            _, jvp = jax.linearize(flat_residual, x)
            d, _ = gmres(jvp, -r, tol=1e-10, atol=0.0, restart=60, maxiter=50)
            return x + d

        x = jnp.asarray(problem.z0.ravel())
        for _ in range(max_iter):
            if float(problem.relative_residual(np.asarray(x))) < 1e-13:
                break
            x = newton_step(x)
        return np.asarray(x).reshape(shape)


# ----------------------------------------------------------------------------------
# Registry.


class Unavailable(Exception):
    """Raised by a problem factory whose inputs are not on this machine (the MNIST
    digits, a trained checkpoint). The report lists the problem as skipped with the
    message; the tests skip it with the message."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered problem: its `name` (known without building it), the `grids` it
    belongs to, and `make()`, which builds it once (cached; raises `Unavailable`,
    also cached, when its inputs are not on this machine)."""

    name: str
    grids: tuple[str, ...]
    make: Callable[[], Problem]


_REGISTRY: list[Spec] = []


def register(factory: Callable[..., Problem], /, *, grids: Iterable[str], **kwargs) -> None:
    """Register ``factory(**kwargs)`` in the given grids (a subset of `GRIDS`).

    `factory` must have a ``problem_name(**kwargs)`` attribute (see `named`) giving
    the name of the problem it builds; the factory itself only runs when the problem
    is used, and its result is cached, so expensive set-up (large matrices, loading
    trained weights...) costs nothing until then.
    """
    grids = tuple(grids)
    unknown = set(grids) - set(GRIDS)
    if unknown:
        raise ValueError(f"unknown grids {sorted(unknown)}; use a subset of {GRIDS}")
    name = factory.problem_name(**kwargs)
    if any(spec.name == name for spec in _REGISTRY):
        raise ValueError(f"a problem named {name!r} is already registered")
    _REGISTRY.append(Spec(name, grids, _cached(functools.partial(factory, **kwargs))))


#: Where the trained MNIST DEQ is looked for: ``$FIXEDPOINT_MNIST_CHECKPOINT``, else
#: `DEFAULT_MNIST_CHECKPOINT` (relative to the repository root), where the README's main
#: command writes it. The digits: ``$FIXEDPOINT_MNIST_DIR`` (see `mnist_deq_cell`).
ENV_MNIST_CHECKPOINT = "FIXEDPOINT_MNIST_CHECKPOINT"
DEFAULT_MNIST_CHECKPOINT = "runs/mnist/ckpt"

#: Environment variables that say where a problem's inputs are.
_INPUT_VARIABLES = (ENV_MNIST_CHECKPOINT, ENV_MNIST_DIR)


def _cached(build: Callable[[], Problem]) -> Callable[[], Problem]:
    """`build`, run once per setting of `_INPUT_VARIABLES`: its problem, or its
    `Unavailable`, is remembered."""
    @functools.cache
    def outcome(inputs):
        try:
            return build()
        except Unavailable as e:
            return e

    def make() -> Problem:
        out = outcome(tuple(os.environ.get(v) for v in _INPUT_VARIABLES))
        if isinstance(out, Unavailable):
            raise out
        return out

    return make


def named(problem_name: Callable[..., str]):
    """Decorator: attach the naming function ``problem_name(**kwargs) -> str`` to a
    problem factory (the name must not need the problem to be built)."""

    def wrap(factory):
        factory.problem_name = problem_name
        return factory

    return wrap


def specs(grid: str = "default") -> list[Spec]:
    """The registered problems of one grid, in registration order (not built)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; use one of {GRIDS}")
    return [spec for spec in _REGISTRY if grid in spec.grids]


def problems(grid: str = "default") -> list[Problem]:
    """The problems of one grid, built."""
    return [spec.make() for spec in specs(grid)]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _spectral_norm(a: np.ndarray, rng: np.random.Generator) -> float:
    """||a||_2: by a dense SVD up to n = 1024, else by ARPACK (Lanczos, to machine
    precision), which is much faster for the n = 4,096 cells."""
    if a.shape[0] <= 1024:
        return float(np.linalg.norm(a, 2))
    from scipy.sparse.linalg import svds

    v0 = rng.standard_normal(min(a.shape))
    return float(svds(a, k=1, v0=v0, return_singular_vectors=False, tol=0)[0])


def _cat(xp, arrays, axis=-1):
    """Concatenate along `axis`, in any of the three namespaces."""
    if xp.__name__ == "torch":
        return xp.cat(arrays, dim=axis)
    return xp.concatenate(arrays, axis=axis)


# ----------------------------------------------------------------------------------
# Linear contraction z = A z + b.


def _linear_fn(z, p, xp):
    return z @ p["At"] + p["b"]


@named(lambda n, rho, seed=0: f"linear-n{n}-rho{rho:g}" + (f"-seed{seed}" if seed else ""))
def linear_contraction(n: int, rho: float, seed: int = 0) -> Problem:
    r"""Linear contraction $z = A z + b$ with spectral radius `rho`.

    $A = Q \operatorname{diag}(\lambda) Q^\top$ with $Q$ a random orthogonal matrix and
    the eigenvalues $\lambda$ equally spaced in $[-\rho, \rho]$ (so $\|A\|_2 = \rho$);
    $b \sim N(0, I)$, $z_0 = 0$.

    Source: the linear model problem of fixed-point acceleration; on it Anderson
    acceleration is essentially GMRES (Walker & Ni 2011, SIAM J. Numer. Anal. 49(4)),
    and plain iteration contracts by exactly `rho` per step, so it needs about
    $\log(\mathrm{tol}) / \log \rho$ evaluations (1,833 for rho=0.99, tol=1e-8).

    Solution (closed form): $z^* = (I - A)^{-1} b = Q \operatorname{diag}(1/(1 -
    \lambda)) Q^\top b$.
    """
    rng = _rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rho * np.linspace(-1.0, 1.0, n)
    a = (q * lam) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.standard_normal(n)
    return Problem(
        name=linear_contraction.problem_name(n=n, rho=rho, seed=seed),
        family="linear",
        kind="fixed_point",
        fn=_linear_fn,
        params={"At": a.T.copy(), "b": b},
        z0=np.zeros(n),
        description=f"z = A z + b, A symmetric, eigenvalues equally spaced in [-{rho:g}, {rho:g}], n={n}",
        source="linear model problem (Walker & Ni 2011: Anderson ~ GMRES on it)",
        solution="closed form z* = (I - A)^{-1} b",
        exact=lambda: q @ ((q.T @ b) / (1.0 - lam)),
    )


# ----------------------------------------------------------------------------------
# DEQ cell z = tanh(W z + U x).


def _tanh_fn(z, p, xp):
    return xp.tanh(z @ p["Wt"] + p["u"])


def _tanh_name(n, s, variant="sym", batch=None, d=16, seed=0):
    batch_tag = "" if batch is None else f"-B{batch}"
    extra = (f"-d{d}" if d != 16 else "") + (f"-seed{seed}" if seed else "")
    return f"tanh-{variant}{batch_tag}-n{n}-s{s:g}{extra}"


@named(_tanh_name)
def tanh_cell(
    n: int, s: float, variant: str = "sym", batch: int | None = None, d: int = 16, seed: int = 0
) -> Problem:
    r"""The DEQ cell $z = \tanh(W z + U x)$ with $\|W\|_2 = s < 1$.

    - ``variant="gauss"``: $W = s\,G / \|G\|_2$ with $G$ i.i.d. Gaussian. Its
      eigenvalues fill a disk of radius about $s/2$ (circular law, scaled by the
      spectral norm $\approx 2\sqrt n$), so plain iteration already contracts by about
      $s/2$ per step and Krylov/Anderson acceleration gains little.
    - ``variant="sym"``: $W = s\,(G + G^\top) / \|G + G^\top\|_2$, a symmetric matrix
      whose real spectrum fills $[-s, s]$ (semicircle law): plain iteration contracts
      only by about $s$ per step, and acceleration pays off.

    $U \in \mathbb R^{n \times d}$ with $N(0, 1/d)$ entries and $x \sim N(0, I_d)$
    (one $x$ per state of a batch), so the injection $U x$ has unit-variance entries;
    $z_0 = 0$.

    Source: the weight-tied cell of Deep Equilibrium Models (Bai, Kolter & Koltun,
    NeurIPS 2019) in its simplest (single tanh layer) form.

    Solution: unique, since $z \mapsto \tanh(Wz + Ux)$ is a contraction with factor
    $s$ in the 2-norm (Banach); no closed form (reference: Newton's method).
    """
    if variant not in ("gauss", "sym"):
        raise ValueError(f"variant must be 'gauss' or 'sym', got {variant!r}")
    rng = _rng(seed)
    g = rng.standard_normal((n, n))
    if variant == "sym":
        g = g + g.T
    w = s * g / _spectral_norm(g, rng)
    u_mat = rng.standard_normal((n, d)) / math.sqrt(d)
    shape = (n,) if batch is None else (batch, n)
    x = rng.standard_normal(shape[:-1] + (d,))
    u = x @ u_mat.T
    spectrum = "real spectrum in [-s, s]" if variant == "sym" else "eigenvalues in a disk of radius ~s/2"
    return Problem(
        name=_tanh_name(n, s, variant, batch, d, seed),
        family="tanh" if batch is None else "tanh-batched",
        kind="fixed_point",
        fn=_tanh_fn,
        params={"Wt": w.T.copy(), "u": u},
        z0=np.zeros(shape),
        batch_axes=None if batch is None else {"Wt": None, "u": 0},
        description=(
            f"z = tanh(W z + U x), {variant} W with ||W||_2 = {s:g} ({spectrum}), n={n}"
            + ("" if batch is None else f", batch of {batch} inputs x (solved per state)")
        ),
        source="Deep Equilibrium Model cell (Bai, Kolter & Koltun 2019)",
        solution="unique (contraction with factor s); reference by Newton's method",
    )


# ----------------------------------------------------------------------------------
# Chandrasekhar's H-equation.


def _h_fn(h, p, xp):
    return 1.0 / (1.0 - h @ p["Kt"])


@named(lambda n, c: f"hequation-n{n}-c{c:g}")
def h_equation(n: int, c: float) -> Problem:
    r"""Chandrasekhar's H-equation of radiative transfer, discretised by the midpoint
    rule on $n$ nodes $\mu_i = (i - 1/2)/n$:

    $$H_i = \Big(1 - \frac{c}{2n} \sum_{j=1}^n \frac{\mu_i H_j}{\mu_i + \mu_j}\Big)^{-1},
    \qquad H_0 = (1, \dots, 1).$$

    Source: Chandrasekhar, *Radiative Transfer* (1960); the standard test problem of
    Anderson acceleration and Newton-Krylov methods (Kelley, *Iterative Methods for
    Linear and Nonlinear Equations*, SIAM 1995, §5.6; Walker & Ni 2011; Toth & Kelley,
    SIAM J. Numer. Anal. 53(2), 2015). Picard iteration converges for $c < 1$ but
    slows down as $c \to 1$ (the Jacobian becomes singular at $c = 1$).

    Solution: the discrete equation has a unique solution with positive entries for
    $0 < c < 1$ (reference: Newton's method). It approximates the H-function, whose
    zeroth moment is known in closed form, $\int_0^1 H(\mu)\,d\mu = 2(1 - \sqrt{1 -
    c})/c$; the discrete mean $\frac1n \sum_i H_i$ matches it to $O(1/n)$.
    """
    mu = (np.arange(n) + 0.5) / n
    k = (c / (2 * n)) * mu[:, None] / (mu[:, None] + mu[None, :])
    return Problem(
        name=h_equation.problem_name(n=n, c=c),
        family="hequation",
        kind="fixed_point",
        fn=_h_fn,
        params={"Kt": k.T.copy()},
        z0=np.ones(n),
        description=f"Chandrasekhar H-equation, c={c:g}, midpoint rule with n={n}",
        source="Kelley 1995 §5.6; Walker & Ni 2011; Toth & Kelley 2015",
        solution=f"reference by Newton; mean(H) ~ 2(1-sqrt(1-c))/c = {2 * (1 - math.sqrt(1 - c)) / c:.6f}",
    )


# ----------------------------------------------------------------------------------
# Bratu's problem on the unit square.


def _bratu_fn(u, p, xp):
    s = p["S"]
    grid = s.shape[0]
    lead = tuple(u.shape[:-1])
    e = xp.exp(u).reshape(lead + (grid, grid))
    # L^{-1} e with L = -Laplacian (5-point, Dirichlet): diagonal in the sine basis.
    w = s @ ((s @ e @ s) * p["inv_eig"]) @ s
    return p["lam"] * w.reshape(lead + (grid * grid,)) - u


@named(lambda grid, lam: f"bratu2d-N{grid}-lam{lam:g}")
def bratu2d(grid: int, lam: float) -> Problem:
    r"""Bratu's problem $-\Delta u = \lambda e^u$ on the unit square, $u = 0$ on the
    boundary, 5-point finite differences on a ``grid`` x ``grid`` interior mesh
    ($h = 1/(\mathrm{grid}+1)$), posed as the (Picard-preconditioned) root problem

    $$g(u) = \lambda L_h^{-1} e^u - u = 0,\qquad u_0 = 0,$$

    with $L_h = -\Delta_h$ applied in its eigenbasis (the orthonormal discrete sine
    transform, as dense matrix products). The raw residual $-\Delta_h u - \lambda e^u$
    has condition number $O(h^{-2})$ and no unpreconditioned Anderson/Broyden method
    solves it in a reasonable budget; $L_h^{-1}$ is the standard (exact, fast)
    preconditioner. The Jacobian of the Picard map, $\lambda L_h^{-1}
    \operatorname{diag}(e^u)$, has spectral radius approaching 1 as $\lambda$
    approaches the turning point $\lambda^* \approx 6.808$.

    Source: the Bratu-Gelfand problem (Bratu 1914; Gelfand 1963), a standard nonlinear
    elliptic benchmark of Newton-Krylov and Anderson methods (e.g. Kelley, *Solving
    Nonlinear Equations with Newton's Method*, SIAM 2003; PETSc SNES ex5).

    Solution: for $0 < \lambda < \lambda^*$ two solutions exist; from $u_0 = 0$ the
    solvers find the lower (minimal, stable) branch; reference by Newton's method.
    """
    n = grid
    j = np.arange(1, n + 1)
    s = math.sqrt(2.0 / (n + 1)) * np.sin(np.pi * np.outer(j, j) / (n + 1))
    h = 1.0 / (n + 1)
    eig = (4.0 / h**2) * np.sin(j * np.pi * h / 2) ** 2
    inv_eig = 1.0 / (eig[:, None] + eig[None, :])
    return Problem(
        name=bratu2d.problem_name(grid=grid, lam=lam),
        family="bratu2d",
        kind="root",
        fn=_bratu_fn,
        params={"S": s, "inv_eig": inv_eig, "lam": np.asarray(float(lam))},
        z0=np.zeros(n * n),
        description=(
            f"Bratu -Lap u = lam e^u, lam={lam:g}, {grid}x{grid} grid (n={n * n}), "
            "root problem g(u) = lam L^-1 e^u - u"
        ),
        source="Bratu-Gelfand problem; Kelley 2003; PETSc SNES ex5",
        solution="lower branch (lambda < 6.808); reference by Newton",
    )


# ----------------------------------------------------------------------------------
# Broyden's tridiagonal function.


def _tridiag_fn(x, p, xp):
    zero = x[..., :1] * 0
    left = _cat(xp, [zero, x[..., :-1]])
    right = _cat(xp, [x[..., 1:], zero])
    return p["scale"] * ((3.0 - 2.0 * x) * x - left - 2.0 * right + 1.0)


@named(lambda n: f"broyden-tridiag-n{n}")
def broyden_tridiagonal(n: int) -> Problem:
    r"""Broyden's tridiagonal function, the root problem

    $$F_i(x) = (3 - 2x_i)x_i - x_{i-1} - 2x_{i+1} + 1 = 0 \quad (x_0 = x_{n+1} = 0),
    \qquad x_0 = (-1, \dots, -1),$$

    solved as $g(x) = -F(x)/5 = 0$: the equations are scaled by $-1/5$ so that
    $J_g \approx -I$ near the solution (the diagonal of $J_F$ is $3 - 4x_i \approx
    5$ there), the convention of every solver compared (see the module docstring).

    Source: Broyden, Math. Comp. 19 (1965), problem 5; Moré, Garbow & Hillstrom, ACM
    TOMS 7 (1981), problem 30.

    Solution: no closed form; $F(x^*) = 0$ (reference: Newton's method; the entries of
    $x^*$ lie in about $[-0.71, -0.41]$).
    """
    return Problem(
        name=broyden_tridiagonal.problem_name(n=n),
        family="broyden-tridiag",
        kind="root",
        fn=_tridiag_fn,
        params={"scale": np.asarray(-0.2)},
        z0=-np.ones(n),
        description=f"Broyden tridiagonal function, n={n}, scaled by -1/5",
        source="Broyden 1965; More, Garbow & Hillstrom 1981 (problem 30)",
        solution="F(x*) = 0, no closed form; reference by Newton",
    )


# ----------------------------------------------------------------------------------
# The MNIST DEQ cell of fixedpoint_deq.


_ROOT = Path(__file__).resolve().parent.parent

_GELU_C = math.sqrt(2.0 / math.pi)


def _mnist_cell_fn(z, p, xp):
    # f(z) = GroupNorm(GELU(conv3x3(z) + bias)) + x_inj on channels-last 28 x 28 x C
    # states, flattened to n = 784 C; written with ops NumPy, JAX and torch share.
    c = p["bias"].shape[-1]
    lead = tuple(z.shape[:-1])
    u = z.reshape(lead + (28, 28, c))
    zero_row = u[..., :1, :, :] * 0
    u = _cat(xp, [zero_row, u, zero_row], -3)
    zero_col = u[..., :, :1, :] * 0
    u = _cat(xp, [zero_col, u, zero_col], -2)  # zero padding: (..., 30, 30, C)
    patches = _cat(xp, [u[..., i : i + 28, j : j + 28, :] for i in range(3) for j in range(3)], -1)
    y = patches.reshape(lead + (784, 9 * c)) @ p["K"] + p["bias"]
    y = 0.5 * y * (1.0 + xp.tanh(_GELU_C * (y + 0.044715 * y**3)))  # GELU (tanh form)
    mean = (y.sum(-2) @ p["G"]) / 784  # GroupNorm: per group over space and channels
    d = y - mean[..., None, :]
    var = ((d * d).sum(-2) @ p["G"]) / 784
    out = d / ((var + p["eps"]) ** 0.5)[..., None, :] * p["gn_w"] + p["gn_b"]
    return out.reshape(lead + (784 * c,)) + p["x"]


def _mnist_data_dir():
    if os.environ.get(ENV_MNIST_DIR):
        return os.environ[ENV_MNIST_DIR]
    shared = _ROOT.parent / "shared" / "data" / "mnist"
    return str(shared) if shared.is_dir() else None


def _mnist_checkpoint(checkpoint):
    if checkpoint is not None:
        return Path(checkpoint)
    path = os.environ.get(ENV_MNIST_CHECKPOINT) or DEFAULT_MNIST_CHECKPOINT
    path = Path(path)
    return path if path.is_absolute() else _ROOT / path


def _mnist_name(weights, batch=8, width=12, seed=0, checkpoint=None):
    extra = f"-seed{seed}" if seed else ""
    return f"mnist-deq-{weights}-B{batch}" + (f"-w{width}" if weights == "random" else "") + extra


@named(_mnist_name)
def mnist_deq_cell(
    weights: str, batch: int = 8, width: int = 12, seed: int = 0, checkpoint: str | None = None
) -> Problem:
    r"""The convolutional DEQ cell of `fixedpoint_deq.mnist` on a batch of test digits:

    $$z = f(z) = \mathrm{GroupNorm}\big(\mathrm{GELU}(K * z + c)\big) + x_{\mathrm{inj}},
    \qquad z_0 = 0,$$

    with $z$ a channels-last $28 \times 28 \times C$ state ($n = 784\,C$ unknowns per
    digit; $C = 12$ for the trained model), $K * z$ the $3 \times 3$ zero-padded
    convolution, GELU in its tanh form and GroupNorm with its affine weights, exactly
    `fixedpoint_deq.mnist.model.ConvCell` (a test checks it against the model); the
    injection $x_{\mathrm{inj}}$ is the model's projection of the first `batch` MNIST
    test digits. One state per digit, solved per state (as the DEQ layer does).

    - ``weights="random"``: the model at its initialisation (`seed`, `width`).
    - ``weights="trained"``: the model of the checkpoint in `checkpoint`, else
      ``$FIXEDPOINT_MNIST_CHECKPOINT``, else ``runs/mnist/ckpt`` (which the README's
      main command writes). Training shapes the cell's Jacobian (the Jacobian
      regulariser pushes it towards a contraction, the loss away from one), so the
      two differ in difficulty.

    Source: `fixedpoint_deq.mnist` (a single-scale version of the convolutional DEQ of Bai,
    Kolter & Koltun 2019 and the DEQ examples this project started from); the digits
    are MNIST's (LeCun et al. 1998), read from ``$FIXEDPOINT_MNIST_DIR``, else
    ``../shared/data/mnist``, else the download cache (never downloaded here).

    Solution: no closed form and no uniqueness guarantee (GroupNorm is not a
    contraction in general); the reference is Newton-Krylov from $z_0 = 0$
    (`newton_reference`), and all solvers start from $z_0 = 0$.

    Raises:
        Unavailable: the digits or the trained checkpoint are not on this machine.
    """
    if weights not in ("random", "trained"):
        raise ValueError(f"weights must be 'random' or 'trained', got {weights!r}")
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from fixedpoint_deq.mnist.data import load_mnist, MNISTDataError
    from fixedpoint_deq.mnist import train as mnist_train

    if weights == "random":
        config = mnist_train.Config(width=width, seed=seed)
        with jax.enable_x64(False):  # the float32 initialisation training starts from
            model = mnist_train.make_model(config)
        where = f"initialisation (seed {seed})"
    else:
        path = _mnist_checkpoint(checkpoint)
        try:
            model, config, epoch = mnist_train.load_model(path)
        except FileNotFoundError as e:
            raise Unavailable(
                f"{e}; or set ${ENV_MNIST_CHECKPOINT} to a checkpoint directory"
            ) from None
        accuracy = ""
        history = json.loads((path / mnist_train.CHECKPOINT_JSON).read_text())["history"]
        if history:
            accuracy = f", test accuracy {100 * history[-1]['test_acc']:.2f}%"
        where = f"checkpoint {path} (epoch {epoch}{accuracy})"
    try:
        data = load_mnist(_mnist_data_dir(), download=False, verify=False)
    except MNISTDataError as e:
        raise Unavailable(f"MNIST digits not found: {e}") from None
    images = mnist_train.prepare_images(data.test_images[:batch])
    with jax.enable_x64(True):
        model64 = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, model
        )
        x_inj = jax.vmap(
            lambda im: jnp.moveaxis(model64.project_norm(jax.nn.gelu(model64.project(im))), 0, -1)
        )(jnp.asarray(images, jnp.float64))
        x_inj = np.asarray(x_inj).reshape(batch, -1)
    cell = model.deq.cell
    c = cell.conv.weight.shape[0]
    groups = cell.norm.groups
    kernel = np.transpose(np.asarray(cell.conv.weight, np.float64), (2, 3, 1, 0))  # (3, 3, I, O)
    group_of = np.arange(c) // (c // groups)
    params = {
        "K": kernel.reshape(9 * c, c),
        "bias": np.asarray(cell.conv.bias, np.float64).reshape(c),
        "G": (group_of[:, None] == group_of[None, :]) / float(c // groups),
        "eps": np.asarray(float(cell.norm.eps)),
        "gn_w": np.asarray(cell.norm.weight, np.float64),
        "gn_b": np.asarray(cell.norm.bias, np.float64),
        "x": x_inj,
    }
    return Problem(
        name=_mnist_name(weights, batch, width, seed),
        family=f"mnist-deq-{weights}",
        kind="fixed_point",
        fn=_mnist_cell_fn,
        params=params,
        z0=np.zeros((batch, 784 * c)),
        batch_axes={k: (0 if k == "x" else None) for k in params},
        description=(
            f"MNIST DEQ cell z = GroupNorm(GELU(conv3x3(z))) + x_inj, C={c} (n={784 * c} per digit), "
            f"{batch} test digits, weights from the {where}"
        ),
        source="fixedpoint_deq.mnist (conv DEQ cell, Bai et al. 2019); MNIST test digits",
        solution="no closed form; reference by Newton-Krylov from z0 = 0",
    )


# ----------------------------------------------------------------------------------
# The grids.

# Smoke: tiny versions of every family, run once by the default test run.
register(linear_contraction, grids=SMOKE, n=50, rho=0.9)
register(tanh_cell, grids=SMOKE, n=32, s=0.9, variant="gauss")
register(tanh_cell, grids=SMOKE, n=32, s=0.9, variant="sym")
register(tanh_cell, grids=SMOKE, n=32, s=0.9, variant="sym", batch=4)
register(h_equation, grids=SMOKE, n=100, c=0.9)
register(bratu2d, grids=SMOKE, grid=12, lam=6.0)
register(broyden_tridiagonal, grids=SMOKE, n=100)
register(mnist_deq_cell, grids=SMOKE, weights="random", batch=2, width=4)
register(mnist_deq_cell, grids=SMOKE, weights="trained", batch=2)

# Default: the report's default and the timed benchmarks (a few minutes on 2 cores).
for _rho in (0.5, 0.9, 0.99):
    register(linear_contraction, grids=DEFAULT, n=100, rho=_rho)
register(tanh_cell, grids=DEFAULT, n=64, s=0.9, variant="gauss")
register(tanh_cell, grids=DEFAULT, n=64, s=0.9, variant="sym")
register(tanh_cell, grids=DEFAULT, n=64, s=0.99, variant="sym")
register(tanh_cell, grids=DEFAULT, n=64, s=0.9, variant="sym", batch=8)
for _c in (0.5, 0.9, 0.99):
    register(h_equation, grids=DEFAULT, n=500, c=_c)
register(bratu2d, grids=DEFAULT, grid=32, lam=6.0)
register(broyden_tridiagonal, grids=DEFAULT, n=1000)
register(mnist_deq_cell, grids=DEFAULT, weights="random", batch=4)
register(mnist_deq_cell, grids=DEFAULT, weights="trained", batch=4)

# Full: the bigger grid of the issue (report --full; `slow` in the tests).
for _rho in (0.5, 0.9, 0.99):
    register(linear_contraction, grids=FULL, n=1000, rho=_rho)
for _n in (64, 512, 4096):
    for _s in (0.5, 0.9, 0.99):
        for _variant in ("gauss", "sym"):
            if (_n, _s, _variant) in {(64, 0.9, "gauss"), (64, 0.9, "sym"), (64, 0.99, "sym")}:
                continue  # already in the default grid
            register(tanh_cell, grids=FULL, n=_n, s=_s, variant=_variant)
register(tanh_cell, grids=FULL, n=512, s=0.9, variant="gauss", batch=16)
register(tanh_cell, grids=FULL, n=512, s=0.99, variant="sym", batch=16)
register(bratu2d, grids=FULL, grid=32, lam=1.0)
register(bratu2d, grids=FULL, grid=64, lam=6.5)
register(broyden_tridiagonal, grids=FULL, n=10000)
register(mnist_deq_cell, grids=FULL, weights="random", batch=32)
register(mnist_deq_cell, grids=FULL, weights="trained", batch=32)


