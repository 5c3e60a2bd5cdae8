"""For packages built on `fixedpoint` (such as `fixedpoint_deq` and the benchmarks):
the pieces they share with `fixedpoint` itself. Not part of the stable API: it may
change between minor versions.

- Validation of hyperparameters, raising `ValueError` naming the parameter:
  `check_real`, `check_int`, `check_bool`, `check_choice`, `check_callable`, and the
  field converters `as_int`, `as_bool`.
- The solver names (`SOLVERS`, `SolverName`, `solver_names`, `check_solver_name`,
  `root_finder`, `linear_solver`) and the stopping rules built from one tolerance
  (`StoppingRule`; `DEQ_FORWARD`, `DEQ_BACKWARD`, `SEED`, `TRAINER_FORWARD`,
  `TRAINER_BACKWARD`).
- For solver wrappers and adjoints: `keeps_finished_state` (whether a batch of solves
  of a solver may run as one loop, and how a wrapper opts in), `iterate` (optimistix's
  solve loop with that batching, opted into by `one_loop=`), `while_loop`, the named
  layouts of optimistix's loop inputs and outputs (`IterateInputs`, `as_inputs`,
  `IterateResidual`, `as_residual`), and `backward_stats_like` (a
  `fixedpoint.BackwardStats` with the shapes and dtypes of another).
"""

from ._adjoint import _stats_like as backward_stats_like
from ._iterate import keeps_finished_state as keeps_finished_state
from ._optx_compat import (
    as_inputs as as_inputs,
    as_residual as as_residual,
    iterate as iterate,
    IterateInputs as IterateInputs,
    IterateResidual as IterateResidual,
    while_loop as while_loop,
)
from ._registry import (
    check_solver_name as check_solver_name,
    DEQ_BACKWARD as DEQ_BACKWARD,
    DEQ_FORWARD as DEQ_FORWARD,
    linear_solver as linear_solver,
    root_finder as root_finder,
    SEED as SEED,
    solver_names as solver_names,
    SolverName as SolverName,
    SOLVERS as SOLVERS,
    StoppingRule as StoppingRule,
    TRAINER_BACKWARD as TRAINER_BACKWARD,
    TRAINER_FORWARD as TRAINER_FORWARD,
)
from ._validate import (
    as_bool as as_bool,
    as_int as as_int,
    check_bool as check_bool,
    check_callable as check_callable,
    check_choice as check_choice,
    check_int as check_int,
    check_real as check_real,
)


__all__ = [
    "as_bool",
    "as_inputs",
    "as_int",
    "as_residual",
    "backward_stats_like",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_real",
    "check_solver_name",
    "DEQ_BACKWARD",
    "DEQ_FORWARD",
    "iterate",
    "IterateInputs",
    "IterateResidual",
    "keeps_finished_state",
    "linear_solver",
    "root_finder",
    "SEED",
    "solver_names",
    "SolverName",
    "SOLVERS",
    "StoppingRule",
    "TRAINER_BACKWARD",
    "TRAINER_FORWARD",
    "while_loop",
]
