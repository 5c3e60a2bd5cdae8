"""fixedpoint_deq: Deep Equilibrium Models on top of `fixedpoint`.

- `DEQ`: an equinox layer returning the fixed point of a cell and a `DEQRecord`.
- `FixedPointSolver`: forward solve, backward solve and regularisation in one call.
- `backward_stats`, `without_backward_stats`: read / strip the backward statistics that
  a gradient of a model holding DEQ layers carries (defined in `fixedpoint`, where
  [`fixedpoint.BackwardStats`][] lives; re-exported here).
- `fixedpoint_deq.mnist`: a DEQ trained on MNIST from the command line.
"""

from fixedpoint import (
    backward_stats as backward_stats,
    without_backward_stats as without_backward_stats,
)

from ._layer import DEQ as DEQ, DEQRecord as DEQRecord
from ._seed import FixedPointSolver as FixedPointSolver
