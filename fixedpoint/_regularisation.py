from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._validate import as_int, check_choice, check_int


def jacobian_regularisation(
    f: Callable[[PyTree[Array], PyTree], PyTree[Array]],
    z: PyTree[Array],
    args: PyTree = None,
    *,
    key: PRNGKeyArray,
    samples: int = 1,
    probe: Literal["gaussian", "rademacher"] = "gaussian",
) -> Scalar:
    r"""Hutchinson estimate of $\|J_f(z)\|_F^2 / d$ (Bai et al. 2021, "Stabilizing
    Equilibrium Models by Jacobian Regularization").

    With $d$ = the number of elements of `z` and probes $\varepsilon_i$ with
    $E[\varepsilon \varepsilon^\top] = I$,

    $$\frac{1}{d}\|J\|_F^2 = \frac{1}{d} E\big[\|J \varepsilon\|_2^2\big]
        \approx \frac{1}{d\,s}\sum_{i=1}^{s} \|J \varepsilon_i\|_2^2,$$

    each $J\varepsilon_i$ one forward-mode product (`jax.jvp`), no Jacobian formed. The
    estimate is unbiased, non-negative, and differentiable with respect to `args` (the
    parameters of `f`) and `z`; add `weight * jacobian_regularisation(...)` to a loss to
    keep a DEQ's fixed-point map contractive. Rademacher probes ($\pm 1$) have lower
    variance than Gaussian ones.

    **Arguments:**

    - `f`: the map `f(z, args)`, returning a PyTree of the same structure as `z`.
    - `z`: where to evaluate the Jacobian (usually the fixed point; it is *not*
        stopped from gradients here: wrap it in `jax.lax.stop_gradient` if you want).
    - `args`: passed to `f`.
    - `key`: a JAX PRNG key for the probes.
    - `samples`: (>= 1) the number of probes averaged.
    - `probe`: `"gaussian"` (standard normal) or `"rademacher"` (uniform $\pm 1$).

    **Returns:** a scalar in the dtype of `z`.
    """
    check_int("samples", samples, low=1)
    check_choice("probe", probe, ("gaussian", "rademacher"))
    samples = as_int(samples)
    z_flat, unravel = ravel_pytree(z)
    dim = z_flat.size
    shape = (samples, dim)
    if probe == "gaussian":
        eps = jax.random.normal(key, shape, z_flat.dtype)
    else:
        eps = jax.random.rademacher(key, shape, z_flat.dtype)

    def fz(zz):
        return f(zz, args)

    def squared_norm(e):
        _, jv = jax.jvp(fz, (z,), (unravel(e),))
        return sum(jnp.sum(x**2) for x in jtu.tree_leaves(jv))

    return jnp.mean(jax.vmap(squared_norm)(eps)) / dim
