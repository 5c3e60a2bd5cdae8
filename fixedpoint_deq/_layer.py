from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

import fixedpoint as fp
from fixedpoint._validate import as_int, check_bool, check_choice, check_int, check_real


def _cell_fn(z, args):
    cell, x = args
    return cell(z, x)


_INITS = ("zero", "random")


class DEQRecord(eqx.Module):
    """What one call of a [`fixedpoint_deq.DEQ`][] reports (per sample under `vmap`).

    - `num_steps`: forward solver steps (= evaluations of the cell).
    - `residual_norm`: `norm(f(z) - z)` at the returned `z` (the solver's `norm`).
    - `relative_residual`: `residual_norm / norm(z)`.
    - `converged`: whether the forward solve met its tolerance.
    - `result`: the `optx.RESULTS` code of the forward solve.
    - `jac_reg`: the Hutchinson estimate of `||J_f(z*)||_F^2 / d` when asked for
      (`jac_reg=True`), else 0.

    The backward statistics only exist after differentiation: read them from the
    gradient with [`fixedpoint.backward_stats`][].
    """

    num_steps: Int[Array, ""]
    residual_norm: Float[Array, ""]
    relative_residual: Float[Array, ""]
    converged: Bool[Array, ""]
    result: optx.RESULTS
    jac_reg: Float[Array, ""]


class DEQ(eqx.Module):
    r"""A Deep Equilibrium layer: returns the fixed point $z^* = f(z^*, x)$ of a cell.

    The forward pass runs `solver` (any root finder of `fixedpoint` or optimistix)
    through `optx.fixed_point`; the backward pass is `adjoint` (implicit
    differentiation with any backward linear solver, or the Jacobian-free / phantom
    approximations of `fixedpoint`). Gradients flow to every parameter of the cell and
    to the input `x` (the injection).

    Call it on one sample and `jax.vmap` it over a batch: each sample then stops on
    its own tolerance and reports its own statistics.

    ```python
    deq = DEQ(cell)  # cell(z, x) -> z, e.g. an eqx.Module
    z_star, record = deq(x, key=key, jac_reg=True)
    ```
    """

    cell: Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]]
    # Defaults for DEQ states: the RMS norm (the max norm over thousands of elements is
    # needlessly strict for a layer); backward: a purely relative rule (atol tiny),
    # since the cotangent's scale depends on the loss (e.g. 1 / batch size).
    solver: optx.AbstractRootFinder = fp.Anderson(
        m=5, beta=1.0, rtol=1e-3, atol=1e-5, norm=optx.rms_norm
    )
    adjoint: optx.AbstractAdjoint = fp.ImplicitAdjoint(
        fp.linear.Anderson(m=5, rtol=1e-3, atol=1e-9, norm=optx.rms_norm, max_steps=30),
        throw=False,
    )
    max_steps: int = eqx.field(static=True, default=30, converter=as_int)
    init: Literal["zero", "random"] = eqx.field(static=True, default="zero")
    init_scale: float = eqx.field(static=True, default=1.0)
    jac_reg_samples: int = eqx.field(static=True, default=1, converter=as_int)
    throw: bool = eqx.field(static=True, default=False)

    def __check_init__(self) -> None:
        check_choice("init", self.init, _INITS)
        check_int("max_steps", self.max_steps, low=1)
        check_int("jac_reg_samples", self.jac_reg_samples, low=1)
        check_real("init_scale", self.init_scale)
        check_bool("throw", self.throw)

    def initial_state(
        self, like: PyTree[Array], key: PRNGKeyArray | None = None
    ) -> PyTree[Array]:
        """The starting point `init` prescribes, with the structure of `like`."""
        if self.init == "zero":
            return jtu.tree_map(jnp.zeros_like, like)
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

    def __call__(
        self,
        x: PyTree[Array],
        *,
        key: PRNGKeyArray | None = None,
        z0: PyTree[Array] | None = None,
        jac_reg: bool = False,
    ) -> tuple[PyTree[Array], DEQRecord]:
        """**Arguments:**

        - `x`: the input injected into the cell, `cell(z, x)`.
        - `key`: a PRNG key, needed for `init="random"` and for `jac_reg=True`.
        - `z0`: a starting point (warm start). Default: from `init`, with the structure
            of `x` (the usual case of an injection shaped like the state).
        - `jac_reg`: also return the Hutchinson estimate of `||J_f(z*)||_F^2 / d`
            (differentiable; add it to the loss to keep the cell contractive).

        **Returns:** `(z_star, record)`, see [`fixedpoint_deq.DEQRecord`][].
        """
        if jac_reg and key is None:
            raise ValueError("`jac_reg=True` needs a `key`.")
        if key is not None:
            init_key, reg_key = jax.random.split(key)
        else:
            init_key = reg_key = None
        if z0 is None:
            z0 = self.initial_state(x, init_key)
        args = (self.cell, x)
        sol = optx.fixed_point(
            _cell_fn,
            self.solver,
            z0,
            args,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=self.throw,
        )
        z_star = sol.value
        dtype = jnp.result_type(*jtu.tree_leaves(z_star))
        residual = jnp.asarray(sol.stats.get("residual_norm", jnp.nan), dtype)
        norm = getattr(self.solver, "norm", optx.max_norm)
        scale = jnp.asarray(norm(jax.lax.stop_gradient(z_star)), dtype)
        if jac_reg:
            assert reg_key is not None  # checked on entry
            reg = fp.jacobian_regularisation(
                _cell_fn, z_star, args, key=reg_key, samples=self.jac_reg_samples
            )
        else:
            reg = jnp.zeros((), dtype)
        record = DEQRecord(
            num_steps=sol.stats["num_steps"],
            residual_norm=residual,
            relative_residual=residual / (scale + jnp.finfo(dtype).tiny),
            converged=sol.result == optx.RESULTS.successful,
            result=sol.result,
            jac_reg=reg,
        )
        return z_star, record


DEQ.__init__.__doc__ = """**Arguments:**

- `cell`: the map `cell(z, x) -> z`, usually an `eqx.Module` holding the parameters.
- `solver`: the forward root finder; default [`fixedpoint.Anderson`][] with `m = 5`,
    `rtol = 1e-3`, `atol = 1e-5` in the RMS norm.
- `adjoint`: the backward pass; default [`fixedpoint.ImplicitAdjoint`][] with
    [`fixedpoint.linear.Anderson`][] (`rtol = 1e-3`, at most 30 steps) and
    `throw=False`.
- `max_steps`: (>= 1) the most forward steps.
- `init`: the starting point when no `z0` is given: `"zero"`, or `"random"` (normal
    noise of scale `init_scale`, from the call's `key`).
- `init_scale`: the standard deviation of the random start.
- `jac_reg_samples`: (>= 1) probes of the Jacobian penalty (`jac_reg=True`).
- `throw`: raise when the forward solve fails, instead of reporting it in the
    record.
"""
