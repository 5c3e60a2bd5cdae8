r"""Monitoring a DEQ's fixed-point map: the spectral radius of its Jacobian at the fixed
point, and a schedule for the Jacobian regularisation.

A fixed-point iteration $z \mapsto f(z)$ converges locally when the spectral radius
$\rho(J_f(z^*)) < 1$; the closer it is to 1, the more steps every solver needs (forward
and backward), and above 1 plain iteration diverges. Watching $\rho$ during training
tells whether the model is drifting towards an unstable map, and the Jacobian
regularisation of Bai et al. (2021) ([`fixedpoint.jacobian_regularisation`][], the
`jac_reg` of [`fixedpoint_deq.DEQ`][]) is the usual cure.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from fixedpoint.internal import as_int, check_int, check_real


def spectral_radius(
    f: Callable[[PyTree[Array], PyTree], PyTree[Array]],
    z: PyTree[Array],
    args: PyTree = None,
    *,
    key: PRNGKeyArray,
    steps: int = 10,
) -> Scalar:
    r"""Power-iteration estimate of the spectral radius $\rho(J_f(z))$ of the Jacobian
    of `f` with respect to `z`, matrix-free: `steps` Jacobian-vector products
    (`jax.jvp`), no Jacobian formed.

    From a random unit vector $v_0$: $w_k = J v_{k-1}$, $v_k = w_k / \|w_k\|_2$; the
    estimate is the geometric mean of the last two growth factors,
    $\sqrt{\|w_{k-1}\|\,\|w_k\|}$ (the norm of $J^2$ applied to $v_{k-2}$, square-rooted:
    for a dominant real eigenvalue of either sign both factors tend to $|\lambda_1|$, and
    for a dominant complex pair, where single factors oscillate, their two-step mean
    still does). Power iteration converges at the rate $|\lambda_2 / \lambda_1|$: a few
    steps give the order of magnitude, which is what monitoring needs; for a
    non-normal Jacobian an early estimate may exceed $\rho$ (it measures growth,
    $\|J^k v\|^{1/k}$). No gradient flows through the estimate.

    ```python
    rho = fd.spectral_radius(lambda z, x: cell(z, x), z_star, x, key=key, steps=10)
    ```
    or, inside a DEQ call, `deq(x, key=key, spectral_radius=10)` puts it in
    `record.spectral_radius`.

    **Arguments:**

    - `f`: the map `f(z, args)`, returning a PyTree shaped like `z`.
    - `z`: where to linearise (the fixed point).
    - `args`: passed to `f`.
    - `key`: a PRNG key for the starting vector.
    - `steps`: (>= 1) Jacobian-vector products.

    **Returns:** a non-negative scalar in the dtype of `z`.
    """
    check_int("steps", steps, low=1)
    steps = as_int(steps)
    # (Arrays only: `args` may hold Python values, e.g. a cell's `inference` flags.)
    z, args = jtu.tree_map(lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, (z, args))
    z_flat, unravel = ravel_pytree(z)
    dtype = z_flat.dtype
    tiny = jnp.finfo(dtype).tiny

    def jv(v_flat):
        _, out = jax.jvp(lambda zz: f(zz, args), (z,), (unravel(v_flat),))
        return ravel_pytree(out)[0].astype(dtype)

    v = jax.random.normal(key, z_flat.shape, dtype)
    v = v / jnp.maximum(jnp.linalg.norm(v), tiny)

    def body(_, carry):
        v, _, last = carry
        w = jv(v)
        norm = jnp.linalg.norm(w)
        return w / jnp.maximum(norm, tiny), last, norm

    zero = jnp.zeros((), dtype)
    _, previous, last = jax.lax.fori_loop(0, steps, body, (v, zero, zero))
    estimate = jnp.sqrt(previous * last) if steps > 1 else last
    return jax.lax.stop_gradient(estimate)


class JacobianRegSchedule(eqx.Module):
    r"""When, and with what weight, to add the Jacobian regulariser to the loss:
    `weight` on every `every`-th step from `start` on, 0 elsewhere (Bai et al. 2021
    regularise a fraction of the steps to save its cost; torchdeq's `jac_loss_freq` is
    the same idea drawn at random).

    ```python
    schedule = fd.JacobianRegSchedule(weight=0.5, every=4)
    active = schedule.active(step)            # works for a Python or a traced step
    z, record = deq(x, key=key, jac_reg=active)   # computed only when active
    loss = task_loss + schedule(step) * record.jac_reg
    ```

    A traced `jac_reg` makes the DEQ compute the regulariser under `lax.cond`: one
    compilation, and no Jacobian-vector product on inactive steps.
    """

    weight: float = eqx.field(static=True)
    every: int = eqx.field(static=True, default=1, converter=as_int)
    start: int = eqx.field(static=True, default=0, converter=as_int)

    def __check_init__(self) -> None:
        check_real("weight", self.weight, low=0.0)
        check_int("every", self.every, low=1)
        check_int("start", self.start, low=0)

    def active(self, step: int | Int[ArrayLike, ""]) -> bool | Bool[Array, ""]:
        """Whether the regulariser is computed at `step` (0-based, counted over the
        whole run)."""
        if self.weight == 0:
            return False
        if isinstance(step, int):
            return step >= self.start and (step - self.start) % self.every == 0
        step = jnp.asarray(step)
        return (step >= self.start) & ((step - self.start) % self.every == 0)

    def __call__(self, step: int | Int[ArrayLike, ""]) -> float | Float[Array, ""]:
        """The weight at `step`: `weight` when active, else 0."""
        active = self.active(step)
        if isinstance(active, bool):
            return self.weight if active else 0.0
        return jnp.where(active, self.weight, 0.0)
