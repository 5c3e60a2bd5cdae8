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
Add more in `grids.py` (see `grids.spec`).

A problem whose inputs are not on the machine (the MNIST digits, a trained MNIST
checkpoint: see `mnist_deq_cell`) raises `Unavailable` when built; the report lists it
as not run and the tests skip it, saying why.

Modules: `base` (the `Problem` type and its reference solver `newton_reference`),
`families` (the analytic problem families), `mnist` (the MNIST DEQ cell), `grids` (the
registry of problems and their grids). Everything is importable from here.
"""

from .base import (
    cat as cat,
    DENSE_REFERENCE_MAX as DENSE_REFERENCE_MAX,
    named as named,
    newton_reference as newton_reference,
    Problem as Problem,
    Unavailable as Unavailable,
)
from .families import (
    bratu2d as bratu2d,
    broyden_tridiagonal as broyden_tridiagonal,
    h_equation as h_equation,
    linear_contraction as linear_contraction,
    tanh_cell as tanh_cell,
)
from .grids import (
    DEFAULT as DEFAULT,
    FULL as FULL,
    GRIDS as GRIDS,
    problems as problems,
    REGISTRY as REGISTRY,
    registry as registry,
    SMOKE as SMOKE,
    Spec as Spec,
    spec as spec,
    specs as specs,
)
from .mnist import (
    DEFAULT_MNIST_CHECKPOINT as DEFAULT_MNIST_CHECKPOINT,
    ENV_MNIST_CHECKPOINT as ENV_MNIST_CHECKPOINT,
    mnist_data_dir as mnist_data_dir,
    mnist_deq_cell as mnist_deq_cell,
)
