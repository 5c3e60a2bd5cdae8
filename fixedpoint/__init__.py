"""fixedpoint: Anderson, Broyden and Neumann fixed-point / root-finding solvers for JAX.

- Root finders (pass them to `optx.root_find` or `optx.fixed_point`): `Anderson`,
  `Broyden`, `Neumann`, on the shared base `AbstractFixedPointRootFinder`;
  `solver_from_name` builds one from its name.
- Backward linear solvers (lineax): `fixedpoint.linear.Anderson`, `.Broyden`,
  `.Neumann`, and `fixedpoint.linear.solver_from_name`.
- Adjoints for implicit and approximate differentiation, with backward statistics:
  `ImplicitAdjoint`, `PhantomAdjoint`, `JacobianFreeAdjoint`, `BackwardStats`, and
  `backward_stats` / `without_backward_stats` to read / strip them from a gradient.
- `jacobian_regularisation`: Hutchinson estimate of ||J_f||_F^2 / d.

The damping of every method is called `beta`, the weight of the new map value:
``y + beta * g(y) = beta * f(y) + (1 - beta) * y`` (optimistix's `damp` is the weight of
the old iterate, ``1 - beta``).
"""

__version__ = "0.2.0"

from . import linear as linear
from ._adjoint import (
    backward_stats as backward_stats,
    BackwardStats as BackwardStats,
    ImplicitAdjoint as ImplicitAdjoint,
    JacobianFreeAdjoint as JacobianFreeAdjoint,
    PhantomAdjoint as PhantomAdjoint,
    without_backward_stats as without_backward_stats,
)
from ._regularisation import jacobian_regularisation as jacobian_regularisation
from ._solver import (
    AbstractFixedPointRootFinder as AbstractFixedPointRootFinder,
    Anderson as Anderson,
    Broyden as Broyden,
    Neumann as Neumann,
    NewtonKrylov as NewtonKrylov,
    Polyalgorithm as Polyalgorithm,
    solver_from_name as solver_from_name,
)
