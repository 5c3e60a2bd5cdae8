r"""Anderson, Broyden and Neumann as lineax linear solvers.

Each class here solves $A u = b$ by running the root finder of the same name on

$$r(u) = A u - b,$$

so no method is implemented twice: `fixedpoint.linear.Anderson(...)` holds a
`fixedpoint.Anderson(...)` and calls it through `optx.root_find`. The convention is the
one of the forward solvers: they iterate $u \mapsto u + \beta\,r(u)$ (Anderson and
Neumann accelerate or damp that map). In implicit differentiation of a fixed point
$z^* = f(z^*)$ optimistix solves with $A = J_f - I$ (or its transpose), so the
iterated map is $u \mapsto (1-\beta) u + \beta (J_f u - b)$, which contracts exactly
when the forward fixed-point map does: a problem the forward solver converges on also
converges backwards.

They are matrix-free (one `operator.mv` per step: under reverse mode, one VJP of $f$),
never materialise the matrix, and work on PyTree operators. Use them as
`optx.ImplicitAdjoint(linear_solver=fixedpoint.linear.Anderson(...))`,
[`fixedpoint.ImplicitAdjoint`][] or `lx.linear_solve(operator, vector, solver)`.

`lx.linear_solve(...).stats` holds `num_steps` (= matrix-vector products) and
`residual_norm` (`norm(A u - b)` at the returned `u`; real, also for complex
operators). Failure codes: out of steps -> `lx.RESULTS.max_steps_reached`; an operator
or right-hand side holding NaN or inf (the first residual $A u_0 - b$ is not finite) ->
`lx.RESULTS.nonfinite_input`; divergence, or values that become non-finite later ->
`lx.RESULTS.breakdown` (the iteration does not converge for this operator).
float16, bfloat16 and complex operators are supported.

With `rtol = atol = 0` a solver runs exactly `max_steps` steps from `u_0 = 0` (set
`throw=False` in `lx.linear_solve`): `Neumann(rtol=0, atol=0, max_steps=k)` returns the
truncated Neumann series $-\sum_{i<k} (A + I)^i b$, which for $A = J^\top - I$ is the
truncated-series backward pass of a fixed point with $k$ terms.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from equinox.internal import ω
from jaxtyping import Array, PyTree

from ._iterate import iterate, while_loop
from ._solver import (
    AbstractFixedPointRootFinder,
    Anderson as _AndersonRoot,
    Broyden as _BroydenRoot,
    Neumann as _NeumannRoot,
)
from ._validate import as_int, check_int


def _residual(u, operator_and_vector):
    operator, vector = operator_and_vector
    return (operator.mv(u) ** ω - vector**ω).ω


def _to_lineax_result(result: optx.RESULTS, num_steps) -> lx.RESULTS:
    # Non-finite at the first evaluation, A u_0 - b with a finite u_0 (0 by default):
    # the operator or the right-hand side holds NaN or inf (0 * NaN is NaN), not a
    # failure of the iteration.
    bad_input = (result == optx.RESULTS.nonfinite) & (num_steps <= 1)
    return lx.RESULTS.where(
        result == optx.RESULTS.successful,
        lx.RESULTS.successful,
        lx.RESULTS.where(
            result == optx.RESULTS.nonlinear_max_steps_reached,
            lx.RESULTS.max_steps_reached,
            lx.RESULTS.where(bad_input, lx.RESULTS.nonfinite_input, lx.RESULTS.breakdown),
        ),
    )


class _PrimalAdjoint(optx.AbstractAdjoint):
    """The adjoint of the solve inside `compute`: none is needed, since lineax
    differentiates a linear solve by further linear solves and never through
    `compute`. It runs the solve so that a batch (`vmap`) is solved in one loop
    (this package's root finders keep a finished state: `fixedpoint._iterate`)."""

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        del rewrite_fn, tags
        return iterate(primal_fn, inputs + (while_loop,), one_loop=True)


class AbstractFixedPointLinearSolver(lx.AbstractLinearSolver):
    """The shared base of this module's solvers: a lineax solver that runs one of this
    package's root finders (`root_finder`) on $r(u) = A u - b$, for at most `max_steps`
    steps (matrix-vector products)."""

    root_finder: eqx.AbstractVar[AbstractFixedPointRootFinder]
    max_steps: eqx.AbstractVar[int]

    def __check_init__(self) -> None:
        check_int("max_steps", self.max_steps, low=1)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not eqx.tree_equal(operator.in_structure(), operator.out_structure()):
            raise ValueError(
                f"`{type(self).__name__}` solves square systems only: the operator's "
                "input and output structures differ."
            )
        return lx.linearise(operator)

    def compute(
        self,
        state: lx.AbstractLinearOperator,
        vector: PyTree[Array],
        options: dict[str, Any],
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        operator = state
        y0 = options.get("y0", jtu.tree_map(jnp.zeros_like, vector))
        sol = optx.root_find(
            _residual,
            self.root_finder,
            y0,
            (operator, vector),
            max_steps=self.max_steps,
            adjoint=_PrimalAdjoint(),
            throw=False,
        )
        stats = {
            "num_steps": sol.stats["num_steps"],
            "max_steps": self.max_steps,
            "residual_norm": sol.stats["residual_norm"],
        }
        return sol.value, _to_lineax_result(sol.result, sol.stats["num_steps"]), stats

    def transpose(self, state, options: dict[str, Any]):
        return state.transpose(), {}

    def conj(self, state, options: dict[str, Any]):
        return lx.conj(state), {}

    def assume_full_rank(self) -> bool:
        return True


class AndersonLinearSolver(AbstractFixedPointLinearSolver):
    r"""Anderson acceleration as a lineax linear solver: [`fixedpoint.Anderson`][] run
    on $r(u) = A u - b$ from $u_0 = 0$ (or `options["y0"]`). On a linear problem
    Anderson mixing is a Krylov method closely related to restarted GMRES($m$).
    """

    root_finder: _AndersonRoot
    max_steps: int = eqx.field(converter=as_int)

    def __init__(self, rtol: float = 1e-4, atol: float = 1e-6, max_steps: int = 256, **kwargs: Any):
        """**Arguments:** `rtol`, `atol` and every other keyword (`norm`, `m`, `beta`,
        `regularisation`, `safeguard_factor`, `divergence_factor`,
        `divergence_patience`, `adaptive_beta`, `periodic_restart`) as for
        [`fixedpoint.Anderson`][]; `max_steps` (>= 1) the most matrix-vector products.
        """
        self.root_finder = _AndersonRoot(rtol=rtol, atol=atol, **kwargs)
        self.max_steps = max_steps


class BroydenLinearSolver(AbstractFixedPointLinearSolver):
    r"""Broyden's method as a lineax linear solver: [`fixedpoint.Broyden`][] run on
    $r(u) = A u - b$ from $u_0 = 0$ (or `options["y0"]`). On a linear problem good
    Broyden terminates in at most $2n$ steps in exact arithmetic (Gay 1979).
    """

    root_finder: _BroydenRoot
    max_steps: int = eqx.field(converter=as_int)

    def __init__(self, rtol: float = 1e-4, atol: float = 1e-6, max_steps: int = 256, **kwargs: Any):
        """**Arguments:** `rtol`, `atol` and every other keyword (`norm`, `memory`,
        `beta`, `line_search`, `max_backtracks`, `divergence_factor`,
        `divergence_patience`, `update`) as for
        [`fixedpoint.Broyden`][]; `max_steps` (>= 1) the most matrix-vector products.
        """
        self.root_finder = _BroydenRoot(rtol=rtol, atol=atol, **kwargs)
        self.max_steps = max_steps


class NeumannLinearSolver(AbstractFixedPointLinearSolver):
    r"""The (damped) Neumann series as a lineax linear solver: [`fixedpoint.Neumann`][]
    run on $r(u) = A u - b$ from $u_0 = 0$ (or `options["y0"]`), i.e.
    $u_{k+1} = u_k + \beta (A u_k - b)$. With $\beta = 1$ and $A = M - I$ the iterates
    are the partial sums $-\sum_{i<k} M^i b$ of the Neumann series of $(I - M)^{-1}$.
    """

    root_finder: _NeumannRoot
    max_steps: int = eqx.field(converter=as_int)

    def __init__(self, rtol: float = 1e-4, atol: float = 1e-6, max_steps: int = 256, **kwargs: Any):
        """**Arguments:** `rtol`, `atol` and every other keyword (`norm`, `beta`,
        `divergence_factor`, `divergence_patience`) as for [`fixedpoint.Neumann`][];
        `max_steps` (>= 1) the most matrix-vector products. With `rtol = atol = 0` exactly `max_steps` terms of the
        series are summed.
        """
        self.root_finder = _NeumannRoot(rtol=rtol, atol=atol, **kwargs)
        self.max_steps = max_steps


# The public names: `fixedpoint.linear.Anderson` etc. The classes carry the suffix
# `LinearSolver` so that printing a solver (e.g. an `ImplicitAdjoint` holding one) never
# confuses it with the root finder of the same name that it wraps.
Anderson = AndersonLinearSolver
Broyden = BroydenLinearSolver
Neumann = NeumannLinearSolver


def solver_from_name(name: str, **kwargs: Any) -> AbstractFixedPointLinearSolver:
    """The linear solver called `name`, built with `kwargs`.

    **Arguments:**

    - `name`: `"anderson"` ([`fixedpoint.linear.Anderson`][]), `"broyden"`
        ([`fixedpoint.linear.Broyden`][]), `"neumann"` or its alias `"picard"`
        ([`fixedpoint.linear.Neumann`][]).
    - `kwargs`: the keyword arguments of that class (e.g. `rtol`, `max_steps`, `m`).

    **Returns:** the solver. **Raises:** `ValueError` for an unknown name (the message
    lists the known ones); the class's own errors for invalid keyword arguments.

    The root finders have the same factory, [`fixedpoint.solver_from_name`][].
    """
    from ._registry import linear_solver  # (the registry imports this module)

    return linear_solver(name, **kwargs)
