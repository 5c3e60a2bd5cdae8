"""The analytic problem families: a linear contraction, the tanh DEQ cell,
Chandrasekhar's H-equation, Bratu's problem and Broyden's tridiagonal function. Each
factory documents its source and its known solution."""

from __future__ import annotations

import math

import numpy as np

from .base import cat, named, Problem


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _spectral_norm(a: np.ndarray, rng: np.random.Generator) -> float:
    """||a||_2: by a dense SVD up to n = 1024, else by ARPACK (Lanczos, to machine
    precision), which is much faster for the n = 4,096 cells."""
    if a.shape[0] <= 1024:
        return float(np.linalg.norm(a, 2))
    from scipy.sparse.linalg import svds

    v0 = rng.standard_normal(min(a.shape))
    sigma = svds(a, k=1, v0=v0, return_singular_vectors=False, tol=0)
    return float(np.asarray(sigma)[0])


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
    spectrum = (
        "real spectrum in [-s, s]" if variant == "sym" else "eigenvalues in a disk of radius ~s/2"
    )
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
    left = cat(xp, [zero, x[..., :-1]])
    right = cat(xp, [x[..., 1:], zero])
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
