"""Adapters of every solver compared: ours (`fixedpoint`) and the peers (optimistix,
jaxopt, SciPy, torchdeq), one module per library over a small shared base.

Every adapter solves a `problems.Problem` to the common tolerance (absolute threshold
``tol * problem.scale`` on the per-state 2-norm of the residual ``F``) within the
common budget of evaluations, and exposes

- `prepare(problem, tol, budget)` -> `Prepared` (compiles JAX solvers),
- `Prepared.run()`: one solve (the timed call; no tracing in it),
- `Prepared.trace()`: the common residual of every point at which the solver
  evaluated the problem function (see `harness.Trace`).

Settings shared for fairness: mixing/damping ``beta = 1`` and initial inverse
Jacobian ``-I`` everywhere (SciPy ``alpha=1``; jaxopt Broyden ``gamma=-1``); Anderson
history is matched in *differences*: our ``m`` differences = SciPy ``M = m`` =
jaxopt ``history_size = m + 1`` and torchdeq ``m + 1`` stored iterates (their
constrained least-squares problem over ``k`` iterates has ``k - 1`` degrees of
freedom); Broyden memory is the number of rank-one updates kept (ours restarts when
full, like SciPy's ``reduction_method="restart"``; jaxopt and torchdeq drop the oldest).

How each is stopped and counted:

- ours: ``rtol=0, atol=tol_abs, norm=optx.two_norm`` is exactly the common criterion;
  f evals = ``stats["num_steps"]``; the trace is ``stats["residual_trace"]`` of the
  timed run itself (``trace_length = budget``).
- optimistix FixedPointIteration/Newton/Chord: ``rtol=0, atol=tol_abs,
  norm=optx.two_norm`` (FixedPointIteration stops on ``||f(y) - y||``, i.e. the common
  criterion; Newton/Chord on ``||F(y)||`` *and* the Newton step). Traced by driving
  the solver's own ``init``/``step``/``terminate`` eagerly, exactly as
  ``optx.root_find`` does, and recording the residual of the point each step
  evaluates. Newton forms one dense Jacobian per step, Chord one at ``y0``.
- jaxopt: ``tol = tol_abs`` (all three stop on the 2-norm of the residual at the
  point just evaluated: the common criterion). Traced by an eager run
  (``jit=False``) of the same solver with a recording wrapper. AndersonAcceleration's
  ``init_state`` evaluates ``f(x0)`` only for ``aux``; XLA removes that call from the
  compiled run, so it is not counted.
- SciPy: ``f_tol = tol_abs`` with ``tol_norm`` = the worst per-state 2-norm: the
  common criterion. The NumPy function is wrapped with a counter (a hard cap at the
  budget) that also records the residual in the trace run. SciPy has no batch mode:
  by default it solves a batch as one system (one history shared by all states);
  ``scipy.anderson(M=5,per_state)`` solves state after state, each with the budget,
  like the vmapped JAX solvers (the slowest state's evaluations are counted).
  newton_krylov's evaluations include those of its finite-difference
  Jacobian-vector products.
- torchdeq: ``stop_mode="abs", tol = tol_abs`` (per-state 2-norm of ``f(x) - x`` at
  the point just evaluated: the common criterion), ``max_iter = budget``; the torch
  function is wrapped like SciPy's. Its anderson and fixed_point_iter return the
  *image* ``f(x)`` of their best point, so their final residual is that of ``f(x)``.

JAX solvers run one state per solve; a batch is `jax.vmap`-ed (as `fixedpoint_deq`
does), so every state stops on its own. Peers that are not installed are skipped with
a note; so is a method that does not apply (dense Newton/Chord above 2,048 unknowns).

Modules: `base` (`Adapter`, `Prepared`, `JaxAdapter`, `PyAdapter`, `CompileCache`),
`ours`, `optimistix_peer`, `jaxopt_peer`, `scipy_peer`, `torchdeq_peer` (one per
library), `grid` (`solvers`, `availability`). Everything is importable from here.
"""

from .base import (
    Adapter as Adapter,
    CompileCache as CompileCache,
    DENSE_MAX as DENSE_MAX,
    JaxAdapter as JaxAdapter,
    Prepared as Prepared,
    PyAdapter as PyAdapter,
)
from .grid import availability as availability, solvers as solvers
from .jaxopt_peer import Jaxopt as Jaxopt
from .optimistix_peer import Optx as Optx
from .ours import Ours as Ours
from .scipy_peer import Scipy as Scipy
from .torchdeq_peer import TorchDEQ as TorchDEQ
