"""fixedpoint: Anderson, Broyden and Neumann fixed-point / root-finding solvers for JAX.

- Root finders (pass them to `optx.root_find` or `optx.fixed_point`): `Anderson`,
  `Broyden`, `Neumann`.
- Backward linear solvers (lineax): `fixedpoint.linear.Anderson`, `.Broyden`, `.Neumann`.
- Adjoints for implicit and approximate differentiation, with backward statistics:
  `ImplicitAdjoint`, `PhantomAdjoint`, `JacobianFreeAdjoint`, `BackwardStats`.
- `jacobian_regularisation`: Hutchinson estimate of ||J_f||_F^2 / d.
"""

from . import linear as linear
from ._adjoint import (
    BackwardStats as BackwardStats,
    ImplicitAdjoint as ImplicitAdjoint,
    JacobianFreeAdjoint as JacobianFreeAdjoint,
    PhantomAdjoint as PhantomAdjoint,
)
from ._regularisation import jacobian_regularisation as jacobian_regularisation
from ._solver import Anderson as Anderson, Broyden as Broyden, Neumann as Neumann

__version__ = "0.1.0"
