"""fixedpoint_deq: Deep Equilibrium Models on top of `fixedpoint`.

- `DEQ`: an equinox layer returning the fixed point of a cell and a `DEQRecord`.
- `backward_stats`, `without_backward_stats`: read / strip the backward statistics that
  a gradient of a model holding DEQ layers carries.
- `FixedPointSolver`: forward solve, backward solve and regularisation in one call.
- `fixedpoint_deq.mnist`: a DEQ trained on MNIST from the command line.
"""

from ._layer import (
    backward_stats as backward_stats,
    DEQ as DEQ,
    DEQRecord as DEQRecord,
    without_backward_stats as without_backward_stats,
)
from ._seed import FixedPointSolver as FixedPointSolver
