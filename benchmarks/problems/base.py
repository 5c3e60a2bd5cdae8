"""The problem type of the benchmarks (`Problem`), its reference solver
(`newton_reference`), and what the problem modules share (`Unavailable`, `named`,
`cat`). The conventions are described in `benchmarks.problems`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One benchmark problem.

    - `name`: unique id (used as pytest id and benchmark group).
    - `family`: the problem family (``linear``, ``tanh``, ...).
    - `kind`: ``"fixed_point"`` (`fn` is the map ``f``) or ``"root"`` (`fn` is ``g``).
    - `fn`: ``fn(z, params, xp) -> array`` like ``z``; ``xp`` is the array namespace.
      Problems of one family share the same `fn` object, so that JAX solvers compiled
      for one are reused for the others of the same shapes (parameters are arguments).
    - `params`: the parameters, NumPy float64 arrays (converted per library).
    - `z0`: the initial point, shape ``(n,)`` or ``(B, n)`` for a batch.
    - `batch_axes`: for a batch, which parameters are per state (axis 0) and which are
      shared (None), as ``jax.vmap``'s ``in_axes``; None for a single state.
    - `description`, `source`, `solution`: documentation (also in the report).
    - `exact`: a closed-form solution, where one exists.
    """

    name: str
    family: str
    kind: str
    fn: Callable[[Any, dict, Any], Any]
    params: dict[str, np.ndarray]
    z0: np.ndarray
    batch_axes: dict[str, int | None] | None = None
    description: str = ""
    source: str = ""
    solution: str = ""
    exact: Callable[[], np.ndarray] | None = None

    def __post_init__(self):
        if self.kind not in ("fixed_point", "root"):
            raise ValueError(f"kind must be 'fixed_point' or 'root', got {self.kind!r}")

    @property
    def batched(self) -> bool:
        return self.batch_axes is not None

    @property
    def batch_size(self) -> int:
        return self.z0.shape[0] if self.batched else 1

    @property
    def dim(self) -> int:
        """Size of one state (``n``)."""
        return self.z0.shape[-1]

    def fixed_point_map(self, z, params, xp):
        """``f(z)``, or the Picard map ``z + g(z)`` of a root problem."""
        out = self.fn(z, params, xp)
        return out if self.kind == "fixed_point" else z + out

    def residual(self, z, params, xp):
        """``F(z)``: ``f(z) - z``, or ``g(z)`` for a root problem."""
        out = self.fn(z, params, xp)
        return out - z if self.kind == "fixed_point" else out

    def params_in(self, xp) -> dict[str, Any]:
        """The parameters as arrays of namespace ``xp`` (float64)."""
        if xp is np:
            return dict(self.params)
        if xp.__name__ == "torch":
            return {k: xp.from_numpy(np.array(v, dtype=np.float64)) for k, v in self.params.items()}
        return {k: xp.asarray(v) for k, v in self.params.items()}

    def lane_params(self, b: int) -> dict[str, np.ndarray]:
        """The parameters of state ``b`` of a batch (NumPy)."""
        axes = self.batch_axes
        assert axes is not None, "not a batch"
        return {k: (v[b] if axes.get(k) == 0 else v) for k, v in self.params.items()}

    def lane(self, b: int) -> "Problem":
        """State ``b`` of a batch as a single-state problem (its own `scale`)."""
        assert self.batched
        return dataclasses.replace(
            self,
            name=f"{self.name}[{b}]",
            params=self.lane_params(b),
            z0=self.z0[b],
            batch_axes=None,
        )

    def lane_norms(self, residual) -> np.ndarray:
        """Per-state 2-norms of a residual array, shape ``(B,)`` (``(1,)`` if single)."""
        r = np.asarray(residual, dtype=np.float64)
        return np.atleast_1d(np.linalg.norm(r.reshape(-1, self.dim), axis=-1))

    @functools.cached_property
    def scale(self) -> float:
        """``max_b ||F(z_{0,b})||_2``: the denominator of the common residual."""
        return float(self.lane_norms(self.residual(self.z0, self.params, np)).max())

    def lane_residuals(self, z) -> np.ndarray:
        """Common relative residual of each state of ``z`` (NumPy recomputation)."""
        z = np.asarray(z, dtype=np.float64).reshape(self.z0.shape)
        return self.lane_norms(self.residual(z, self.params, np)) / self.scale

    def relative_residual(self, z) -> float:
        """The common residual ``max_b ||F(z_b)||_2 / max_b ||F(z_{0,b})||_2``."""
        return float(self.lane_residuals(z).max())

    def signature(self) -> tuple:
        """What a compiled JAX solver depends on: the function, kind, shapes and the
        batch layout (not the parameter values)."""
        shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in self.params.items()))
        axes = None if self.batch_axes is None else tuple(sorted(self.batch_axes.items()))
        return (self.fn, self.kind, shapes, self.z0.shape, axes)

    def reference(self) -> np.ndarray:
        """The known solution: the closed form if there is one, else Newton's method
        (dense Jacobian, float64) to a residual below 1e-13 (relative)."""
        if self.exact is not None:
            return self.exact()
        return newton_reference(self)


#: Largest system (all states together) solved with a dense Jacobian by `newton_reference`.
DENSE_REFERENCE_MAX = 4096


def newton_reference(problem: Problem, max_iter: int = 50) -> np.ndarray:
    """Solve ``F(z) = 0`` by Newton's method in float64, from ``z0``, to a common
    residual below 1e-13: with a dense JAX Jacobian up to `DENSE_REFERENCE_MAX`
    unknowns, else matrix-free (Newton-Krylov: each step solves ``J d = -F`` by
    restarted GMRES on Jacobian-vector products, to a relative 1e-10)."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.sparse.linalg import gmres

    with jax.enable_x64(True):
        params = problem.params_in(jnp)
        shape = problem.z0.shape
        dense = problem.z0.size <= DENSE_REFERENCE_MAX

        def flat_residual(x):
            return problem.residual(x.reshape(shape), params, jnp).ravel()

        @jax.jit
        def newton_step(x):
            r = flat_residual(x)
            if dense:
                return x - jnp.linalg.solve(jax.jacfwd(flat_residual)(x), r)
            _, jvp = jax.linearize(flat_residual, x)
            d, _ = gmres(jvp, -r, tol=1e-10, atol=0.0, restart=60, maxiter=50)
            return x + d

        x = jnp.asarray(problem.z0.ravel())
        for _ in range(max_iter):
            if float(problem.relative_residual(np.asarray(x))) < 1e-13:
                break
            x = newton_step(x)
        return np.asarray(x).reshape(shape)


class Unavailable(Exception):
    """Raised by a problem factory whose inputs are not on this machine (the MNIST
    digits, a trained checkpoint). The report lists the problem as skipped with the
    message; the tests skip it with the message."""


def named(problem_name: Callable[..., str]):
    """Decorator: attach the naming function ``problem_name(**kwargs) -> str`` to a
    problem factory (the name must not need the problem to be built)."""

    def wrap(factory):
        factory.problem_name = problem_name
        return factory

    return wrap


def cat(xp, arrays, axis=-1):
    """Concatenate along `axis`, in any of the three namespaces."""
    if xp.__name__ == "torch":
        return xp.cat(arrays, dim=axis)
    return xp.concatenate(arrays, axis=axis)
