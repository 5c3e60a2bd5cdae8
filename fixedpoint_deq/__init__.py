"""fixedpoint_deq: Deep Equilibrium Models on top of `fixedpoint`.

- `DEQ`: an equinox layer returning the fixed point of a cell and a `DEQRecord`.
- `FixedPointSolver`: forward solve, backward solve and regularisation in one call.
- `backward_stats`, `without_backward_stats`: read / strip the backward statistics that
  a gradient of a model holding DEQ layers carries (defined in `fixedpoint`, where
  [`fixedpoint.BackwardStats`][] lives; re-exported here).
- The practitioner's toolkit, pieces that work with any cell, solver and adjoint:
  - `normalise`, `NormalisedLayer`, `update_normalisation`, `fold_normalisation`:
    weight / spectral normalisation of a cell's layers;
  - `VariationalDropout`: one dropout mask per sample per solve;
  - `FixedPointCorrection`, `correction_loss`, `correction_weights`: supervised
    intermediate states (Bai et al. 2022);
  - `FixedPointCache`: per-example warm starts;
  - `spectral_radius`, `JacobianRegSchedule`: monitoring and regularisation schedule;
  - evaluation budgets: the `eval_max_steps` / `eval_solver` fields of `DEQ`.
- `fixedpoint_deq.mnist`: a DEQ trained on MNIST from the command line.
"""

from fixedpoint import (
    backward_stats as backward_stats,
    without_backward_stats as without_backward_stats,
)

from ._correction import (
    correction_loss as correction_loss,
    correction_weights as correction_weights,
    FixedPointCorrection as FixedPointCorrection,
)
from ._dropout import VariationalDropout as VariationalDropout
from ._layer import DEQ as DEQ, DEQRecord as DEQRecord
from ._monitor import (
    JacobianRegSchedule as JacobianRegSchedule,
    spectral_radius as spectral_radius,
)
from ._norm import (
    fold_normalisation as fold_normalisation,
    is_linear_or_conv as is_linear_or_conv,
    normalise as normalise,
    NormalisedLayer as NormalisedLayer,
    update_normalisation as update_normalisation,
)
from ._reuse import FixedPointCache as FixedPointCache
from ._seed import FixedPointSolver as FixedPointSolver
