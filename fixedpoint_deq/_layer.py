from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

import fixedpoint as fp
from fixedpoint.internal import (
    as_int,
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_solver_name,
    DEQ_BACKWARD,
    DEQ_FORWARD,
    root_finder,
    solver_names,
)

from ._correction import FixedPointCorrection
from ._dropout import prepare_dropout
from ._monitor import spectral_radius as _spectral_radius
from ._norm import prepare_normalised_cell


def _cell_fn(z, args):
    cell, x = args
    return cell(z, x)


_INITS = ("zero", "random")

# What a name given as `DEQ(solver=...)` / `DEQ(adjoint=...)` builds: the forward solver of
# that name (the names of `fixedpoint.internal.SOLVERS`) with the layer's default
# tolerances and norm (`fixedpoint.internal.DEQ_FORWARD`, see `DEQ`), and the adjoints.
SOLVER_NAMES = solver_names()
ADJOINT_NAMES = ("implicit", "phantom", "jfb")
_SOLVER_KINDS = (
    optx.AbstractRootFinder,
    optx.AbstractFixedPointSolver,
    optx.AbstractLeastSquaresSolver,
    optx.AbstractMinimiser,
)


def _default_adjoint() -> fp.ImplicitAdjoint:
    return fp.ImplicitAdjoint(fp.linear.Anderson(m=5, max_steps=30, **DEQ_BACKWARD()), throw=False)


def _as_solver(
    solver: optx.AbstractRootFinder | str, name: str = "solver"
) -> optx.AbstractRootFinder:
    """Field converter: a name becomes the root finder of that name (DEQ defaults).
    `name` is the field's, for the error message."""
    if isinstance(solver, str):
        check_solver_name(name, solver)
        return root_finder(solver, **DEQ_FORWARD())
    return solver


def _as_adjoint(adjoint: optx.AbstractAdjoint | str) -> optx.AbstractAdjoint:
    """Field converter: a name becomes the adjoint of that name."""
    if isinstance(adjoint, str):
        check_choice("adjoint", adjoint, ADJOINT_NAMES)
        if adjoint == "implicit":
            return _default_adjoint()
        return fp.PhantomAdjoint() if adjoint == "phantom" else fp.JacobianFreeAdjoint()
    return adjoint


def _describe(tree: PyTree) -> str:
    return str(jtu.tree_map(lambda s: f"{s.dtype}{list(s.shape)}", tree))


class DEQRecord(eqx.Module):
    """What one call of a [`fixedpoint_deq.DEQ`][] reports (per sample under `vmap`).

    - `num_steps`: forward solver steps (= evaluations of the cell).
    - `residual_norm`: `norm(f(z) - z)` at the returned `z` (the solver's `norm`).
    - `relative_residual`: `residual_norm / norm(z)`.
    - `converged`: whether the forward solve met its tolerance.
    - `result`: the `optx.RESULTS` code of the forward solve.
    - `jac_reg`: the Hutchinson estimate of `||J_f(z*)||_F^2 / d` when asked for
      (`jac_reg=True`), else 0.
    - `spectral_radius`: a power-iteration estimate of the spectral radius of
      `J_f(z*)` when asked for (`spectral_radius=k` steps), else `None`; no gradient.
    - `states`: the fixed-point-correction states (stacked, in the order of
      `correction.steps`) when the DEQ has a `correction` and is not in inference mode,
      else `None`.

    The backward statistics only exist after differentiation: read them from the
    gradient with [`fixedpoint.backward_stats`][].
    """

    num_steps: Int[Array, ""]
    residual_norm: Float[Array, ""]
    relative_residual: Float[Array, ""]
    converged: Bool[Array, ""]
    result: optx.RESULTS
    jac_reg: Float[Array, ""]
    spectral_radius: Float[Array, ""] | None = None
    states: PyTree[Array] | None = None


class DEQ(eqx.Module):
    r"""A Deep Equilibrium layer: returns the fixed point $z^* = f(z^*, x)$ of a cell.

    The forward pass runs `solver` (any root finder of `fixedpoint` or optimistix)
    through `optx.fixed_point`; the backward pass is `adjoint` (implicit
    differentiation with any backward linear solver, or the Jacobian-free / phantom
    approximations of `fixedpoint`). Gradients flow to every parameter of the cell and
    to the input `x` (the injection).

    `solver` and `adjoint` may also be given by name: `solver="anderson"`,
    `"broyden"`, `"neumann"` or `"picard"` (built by [`fixedpoint.solver_from_name`][]
    with the default's tolerances and norm: `rtol=1e-3, atol=1e-5, norm=optx.rms_norm`);
    `adjoint="implicit"` (the default), `"phantom"` ([`fixedpoint.PhantomAdjoint`][]) or
    `"jfb"` ([`fixedpoint.JacobianFreeAdjoint`][]). Another value raises `ValueError`.

    Call it on one sample and `jax.vmap` it over a batch: each sample then stops on
    its own tolerance and reports its own statistics.

    ```python
    deq = DEQ(cell)  # cell(z, x) -> z, e.g. an eqx.Module
    z_star, record = deq(x, key=key, jac_reg=True)
    ```

    **Training and evaluation.** `eqx.nn.inference_mode(deq)` (which also switches off
    variational dropout and the power iteration of normalised layers in the cell)
    solves with `eval_solver` and `eval_max_steps` when they are set, e.g. a larger
    budget and a tighter tolerance at evaluation, without rebuilding the model:

    ```python
    deq = DEQ(cell, max_steps=12, eval_max_steps=40,
              eval_solver=fp.Anderson(m=5, rtol=1e-4, atol=1e-6, norm=optx.rms_norm))
    z_eval, record = eqx.nn.inference_mode(deq)(x)   # 40 steps, rtol 1e-4
    ```

    (torchdeq's `eval_factor` is `eval_max_steps / max_steps`.) The toolkit pieces that
    live in the cell ([`fixedpoint_deq.normalise`][],
    [`fixedpoint_deq.VariationalDropout`][]) are prepared once per call, before the
    solve, so the map is one fixed function during the solve and its backward pass.
    """

    cell: Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]]
    # Defaults for DEQ states (`DEQ_FORWARD`, `DEQ_BACKWARD`): the RMS norm (the max
    # norm over thousands of elements is needlessly strict for a layer); backward: a
    # purely relative rule (atol tiny), since the cotangent's scale depends on the loss
    # (e.g. 1 / batch size).
    solver: optx.AbstractRootFinder = eqx.field(
        default=fp.Anderson(m=5, beta=1.0, **DEQ_FORWARD()), converter=_as_solver
    )
    adjoint: optx.AbstractAdjoint = eqx.field(default=_default_adjoint(), converter=_as_adjoint)
    max_steps: int = eqx.field(static=True, default=30, converter=as_int)
    init: Literal["zero", "random"] = eqx.field(static=True, default="zero")
    init_scale: float = eqx.field(static=True, default=1.0)
    jac_reg_samples: int = eqx.field(static=True, default=1, converter=as_int)
    throw: bool = eqx.field(static=True, default=False)
    inference: bool = False
    eval_max_steps: int | None = eqx.field(static=True, default=None, converter=as_int)
    eval_solver: optx.AbstractRootFinder | None = eqx.field(
        default=None, converter=lambda s: None if s is None else _as_solver(s, "eval_solver")
    )
    correction: FixedPointCorrection | None = None

    def __check_init__(self) -> None:
        if not isinstance(self.solver, _SOLVER_KINDS):
            raise ValueError(
                "`solver` must be an optimistix root finder or fixed-point solver (e.g. "
                f"`fixedpoint.Anderson()`) or one of the names {SOLVER_NAMES}; got "
                f"{self.solver!r}."
            )
        if not isinstance(self.adjoint, optx.AbstractAdjoint):
            raise ValueError(
                "`adjoint` must be an `optx.AbstractAdjoint` (e.g. "
                f"`fixedpoint.ImplicitAdjoint()`) or one of the names {ADJOINT_NAMES}; got "
                f"{self.adjoint!r}."
            )
        check_choice("init", self.init, _INITS)
        check_int("max_steps", self.max_steps, low=1)
        check_int("jac_reg_samples", self.jac_reg_samples, low=1)
        check_real("init_scale", self.init_scale, low=0.0, finite=True)
        check_bool("throw", self.throw)
        check_bool("inference", self.inference)
        if self.eval_solver is not None and not isinstance(self.eval_solver, _SOLVER_KINDS):
            raise ValueError(
                "`eval_solver` must be None, an optimistix root finder or fixed-point solver "
                f"or one of the names {SOLVER_NAMES}; got {self.eval_solver!r}."
            )
        check_int("eval_max_steps", self.eval_max_steps, low=1, allow_none=True)
        if self.correction is not None:
            if not isinstance(self.correction, FixedPointCorrection):
                raise ValueError(
                    "`correction` must be a fixedpoint_deq.FixedPointCorrection, got "
                    f"{type(self.correction).__name__}."
                )
            self.correction.check_budget(self.max_steps)

    def initial_state(self, like: PyTree[Array], key: PRNGKeyArray | None = None) -> PyTree[Array]:
        """The starting point `init` prescribes, with the structure, shapes and dtypes of
        `like` (arrays or `jax.ShapeDtypeStruct`s)."""
        if self.init == "zero":
            return jtu.tree_map(
                lambda leaf: (
                    jnp.zeros(leaf.shape, leaf.dtype)
                    if isinstance(leaf, jax.ShapeDtypeStruct)
                    else jnp.zeros_like(leaf)
                ),
                like,
            )
        if key is None:
            raise ValueError("`init='random'` needs a `key`.")
        leaves, treedef = jtu.tree_flatten(like)
        keys = jax.random.split(key, len(leaves))
        return jtu.tree_unflatten(
            treedef,
            [
                self.init_scale * jax.random.normal(k, leaf.shape, leaf.dtype)
                for k, leaf in zip(keys, leaves)
            ],
        )

    def prepared_cell(
        self, key: PRNGKeyArray | None = None, *, inference: bool | None = None
    ) -> Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]]:
        """The cell exactly as a call with this `key` solves with it: normalised layers
        (see [`fixedpoint_deq.normalise`][]) folded into plain weights after the call's
        power iteration (none in inference mode), variational dropout given the call's
        masks (off in inference mode). The fixed point of a call is a fixed point of
        `prepared_cell(key)`."""
        inference = self.inference if inference is None else inference
        cell = prepare_normalised_cell(self.cell, inference)
        drop_key = None if key is None else jax.random.fold_in(key, 1)
        return prepare_dropout(cell, drop_key, inference)

    def __call__(
        self,
        x: PyTree[Array],
        *,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        jac_reg: bool | Bool[Array, ""] = False,
        spectral_radius: int = 0,
        inference: bool | None = None,
    ) -> tuple[PyTree[Array], DEQRecord]:
        """**Arguments:**

        - `x`: the input injected into the cell, `cell(z, x)`.
        - `key`: a PRNG key, needed for `init="random"`, for `jac_reg`, and for a cell
            holding an active [`fixedpoint_deq.VariationalDropout`][] (one key per
            sample under `vmap`: one mask per sample).
        - `z0`: a starting point (warm start, see [`fixedpoint_deq.FixedPointCache`][]),
            or `jax.ShapeDtypeStruct`s giving the state's structure, shapes and dtypes
            (the start is then from `init`). Default: from `init`, with the structure of
            `x` (the usual case of an injection shaped like the state); a state shaped
            otherwise needs `z0`.
        - `jac_reg`: also return the Hutchinson estimate of `||J_f(z*)||_F^2 / d`
            (differentiable; add it to the loss to keep the cell contractive). A traced
            boolean computes it under `lax.cond` (see
            [`fixedpoint_deq.JacobianRegSchedule`][]).
        - `spectral_radius`: (>= 0) if positive, that many power-iteration steps
            estimate the spectral radius of `J_f(z*)` into `record.spectral_radius`.
        - `inference`: override the `inference` field for this call.

        **Returns:** `(z_star, record)`, see [`fixedpoint_deq.DEQRecord`][].
        """
        static_reg = isinstance(jac_reg, (bool, np.bool_))
        if (jac_reg if static_reg else True) and key is None:
            raise ValueError("`jac_reg=True` needs a `key`.")
        check_int("spectral_radius", spectral_radius, low=0)
        if key is not None:
            init_key, reg_key = jax.random.split(key)
        else:
            init_key = reg_key = None
        default_start = z0 is None
        if z0 is None:
            z0 = self.initial_state(x, init_key)
        elif any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jtu.tree_leaves(z0)):
            z0 = self.initial_state(z0, init_key)
        inference = self.inference if inference is None else inference
        solver, max_steps = self.solver, self.max_steps
        if inference:
            solver = solver if self.eval_solver is None else self.eval_solver
            max_steps = max_steps if self.eval_max_steps is None else self.eval_max_steps
        correction = None if inference else self.correction
        args = (self.prepared_cell(key, inference=inference), x)
        self._check_state(z0, args, default_start)
        sol = optx.fixed_point(
            _cell_fn,
            solver if correction is None else correction.recording(solver),
            z0,
            args,
            max_steps=max_steps,
            adjoint=self.adjoint,
            throw=self.throw,
        )
        z_star = sol.value
        dtype = jnp.result_type(*jtu.tree_leaves(z_star))
        residual = jnp.asarray(sol.stats.get("residual_norm", jnp.nan), dtype)
        norm = getattr(solver, "norm", optx.max_norm)
        scale = jnp.asarray(norm(jax.lax.stop_gradient(z_star)), dtype)

        def regularisation():
            assert reg_key is not None  # checked on entry
            return jnp.asarray(
                fp.jacobian_regularisation(
                    _cell_fn, z_star, args, key=reg_key, samples=self.jac_reg_samples
                ),
                dtype,
            )

        if not static_reg:
            zero = jnp.zeros((), dtype)
            reg = jax.lax.cond(jnp.asarray(jac_reg), regularisation, lambda: zero)
        elif jac_reg:
            reg = regularisation()
        else:
            reg = jnp.zeros((), dtype)
        radius = None
        if spectral_radius:
            radius_key = jax.random.key(0) if key is None else jax.random.fold_in(key, 2)
            radius = _spectral_radius(
                _cell_fn, z_star, args, key=radius_key, steps=spectral_radius
            ).astype(dtype)
        states = None if correction is None else correction.states(sol, _cell_fn, args)
        record = DEQRecord(
            num_steps=sol.stats["num_steps"],
            residual_norm=residual,
            relative_residual=residual / (scale + jnp.finfo(dtype).tiny),
            converged=sol.result == optx.RESULTS.successful,
            result=sol.result,
            jac_reg=reg,
            spectral_radius=radius,
            states=states,
        )
        return z_star, record

    def _check_state(self, z0: PyTree[Array], args, default_start: bool) -> None:
        """At trace time: the cell must map a state like `z0` to one like it. Without
        `z0` the start is shaped like `x`, the usual cause of a mismatch: say so."""
        z0 = jtu.tree_map(lambda z: jax.ShapeDtypeStruct(jnp.shape(z), jnp.result_type(z)), z0)
        hint = (
            "Without `z0` the starting state is shaped like the input `x` "
            f"({_describe(z0)}); if the state is shaped otherwise, pass `z0` (a starting "
            "state, or `jax.ShapeDtypeStruct`s of the state, started from `init`)."
        )
        try:
            out = eqx.filter_eval_shape(_cell_fn, z0, args)
        except Exception as e:
            if default_start:
                raise ValueError(f"DEQ: the cell failed on the starting state: {e}\n{hint}") from e
            raise ValueError(
                f"DEQ: the cell failed on the starting state `z0` ({_describe(z0)}): {e}"
            ) from e
        same = jtu.tree_structure(out) == jtu.tree_structure(z0) and all(
            (o.shape, o.dtype) == (z.shape, z.dtype)
            for o, z in zip(jtu.tree_leaves(out), jtu.tree_leaves(z0))
        )
        if not same:
            message = (
                "DEQ: the cell must return a state with the structure, shapes and dtypes of "
                f"the state it is given; it maps {_describe(z0)} to {_describe(out)}."
            )
            if default_start:
                message += "\n" + hint
            else:
                message += " Check `z0` against what the cell returns."
            raise ValueError(message)


DEQ.__init__.__doc__ = """**Arguments:**

- `cell`: the map `cell(z, x) -> z`, usually an `eqx.Module` holding the parameters.
- `solver`: the forward root finder; default [`fixedpoint.Anderson`][] with `m = 5`,
    `rtol = 1e-3`, `atol = 1e-5` in the RMS norm. Or a name: `"anderson"`,
    `"broyden"`, `"neumann"`, `"picard"` (that solver with these tolerances and norm).
- `adjoint`: the backward pass; default [`fixedpoint.ImplicitAdjoint`][] with
    [`fixedpoint.linear.Anderson`][] (`rtol = 1e-3`, at most 30 steps) and
    `throw=False`. Or a name: `"implicit"` (the default), `"phantom"`
    ([`fixedpoint.PhantomAdjoint`][]), `"jfb"` ([`fixedpoint.JacobianFreeAdjoint`][]).
- `max_steps`: (>= 1) the most forward steps.
- `init`: the starting point when no `z0` is given: `"zero"`, or `"random"` (normal
    noise of scale `init_scale`, from the call's `key`).
- `init_scale`: (finite, >= 0) the standard deviation of the random start.
- `jac_reg_samples`: (>= 1) probes of the Jacobian penalty (`jac_reg=True`).
- `throw`: raise when the forward solve fails, instead of reporting it in the
    record.
- `inference`: evaluation mode (usually set by `eqx.nn.inference_mode`): solve with
    `eval_solver` / `eval_max_steps`, no dropout, no power iteration, no correction
    states.
- `eval_max_steps`: (>= 1 or None) the forward budget in inference mode (default:
    `max_steps`).
- `eval_solver`: the forward solver in inference mode, e.g. a tighter tolerance, or a
    name as for `solver` (default: `solver`).
- `correction`: a [`fixedpoint_deq.FixedPointCorrection`][]: also return
    phantom-differentiable states of the forward solve in `record.states` (training
    mode); its steps must lie within `max_steps`.
"""
