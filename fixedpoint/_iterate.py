r"""Batched solves in one loop: which solvers opt in.

Under `jax.vmap` a solve of this package's adjoints runs as one loop over the batch
instead of JAX's batched `lax.while_loop`, which selects the whole carry (the solver's
history included) every step; the loop itself lives in `fixedpoint._optx_compat` (it
re-implements optimistix's private solve loop) and is opted into explicitly:
`iterate(primal_fn, inputs, one_loop=...)`. An adjoint passes
`one_loop=keeps_finished_state(solver)`:

- this package's root finders keep the contract the one loop needs (a `step` taken
  from a finished state leaves the iterate, the state and every statistic unchanged;
  see [`fixedpoint.AbstractFixedPointRootFinder`][]) and say so;
- any other solver opts in with a method `keeps_finished_state()` returning `True`
  (a wrapper, e.g. one recording iterates, returns what `keeps_finished_state` says
  of the solver it wraps);
- every other solver is batched as JAX batches any loop (the same results, slower).
"""

from __future__ import annotations

from typing import Any

from ._optx_compat import iterate as iterate, while_loop as while_loop


def keeps_finished_state(solver: Any) -> bool:
    """Whether a batch of solves of `solver` may run as one loop: its `step` leaves a
    finished state and its iterate unchanged, which it declares with a method
    `keeps_finished_state()` returning True (as this package's root finders do)."""
    declared = getattr(solver, "keeps_finished_state", None)
    return bool(declared()) if callable(declared) else False
