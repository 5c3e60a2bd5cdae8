"""The jitted training and evaluation steps.

`compiled_steps(config, total_steps)` returns the steps of a run: runs whose settings
differ only in what does not enter a step (`config.NOT_IN_STEP`: data, epochs, output...)
get the same jitted functions, and so share their compilations (the test suite relies on
this). The sharing is an explicit, bounded `functools.lru_cache` keyed on those settings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from fixedpoint import backward_stats, without_backward_stats

from .._correction import correction_weights
from .._norm import has_normalisation, update_normalisation
from .build import make_optimizer
from .config import Config
from .inputs import shift_image


def _tree_all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_update(optimizer: optax.GradientTransformation, grads, model, opt_state, loss):
    """One optimiser update that is applied only if it is sound: ``(model, opt_state,
    finite)``, where `finite` says whether the loss, the gradient, the new parameters
    and the new optimiser state are all finite; if not, the old model and optimiser
    state come back unchanged. (Checking the gradient alone is not enough: a finite
    gradient can still give a non-finite update, e.g. through an overflowing step size
    or optimiser moment.)"""
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    finite = (
        jnp.isfinite(loss)
        & _tree_all_finite(grads)
        & _tree_all_finite(new_model)
        & _tree_all_finite(new_opt_state)
    )

    def select(new, old):
        return jtu.tree_map(
            lambda a, b: jnp.where(finite, a, b) if eqx.is_array(a) else a, new, old
        )

    return select(new_model, model), select(new_opt_state, opt_state), finite


def make_train_step(config: Config, optimizer: optax.GradientTransformation) -> Callable:
    """``step(model, opt_state, images, labels, key, jac_on=True, z0=None) -> (model,
    opt_state, metrics)``, jitted. `metrics` holds batch means (``loss`` =
    cross-entropy of the fixed point, ``acc``, ``fwd_steps``, ``fwd_converged``,
    ``jac_reg``, ``bwd_steps``) and ``finite`` (whether the update was applied: a step
    whose loss, gradient or update is not finite leaves the model and the optimiser
    state unchanged, see `guarded_update`).

    The DEQ toolkit: `jac_on` (a boolean array) says whether this step computes the
    Jacobian regulariser (`config.jac_reg_every`); `z0` (batched states) warm-starts
    the forward solves, and then ``metrics["z_star"]`` holds the fixed points; the
    stored power iteration of a normalised cell is advanced once per applied step; with
    fixed-point correction the loss adds the decaying-weight cross-entropies of the
    corrected states."""
    jac_weight = float(config.jac_reg)
    use_reg = jac_weight > 0
    max_shift = int(config.augment_shift)
    weights = correction_weights(len(config.correction_steps()), config.correction_gamma)

    def loss_fn(model, images, labels, key, jac_on, z0):
        batch = images.shape[0]
        keys = jax.random.split(key, 2 * batch)
        if max_shift:
            images = jax.vmap(lambda im, k: shift_image(im, k, max_shift))(images, keys[batch:])
        reg = jac_on if use_reg else False

        def one(im, k, z0):
            return model.solve(im, key=k, jac_reg=reg, z0=z0)

        logits, record, z_star = jax.vmap(one)(images, keys[:batch], z0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        total = jnp.mean(ce) + jac_weight * jnp.mean(record.jac_reg)
        if weights:
            # record.states: (batch, len(weights), H, W, C); their logits likewise.
            state_logits = jax.vmap(jax.vmap(model.logits))(record.states)
            for j, w in enumerate(weights):
                total = total + w * jnp.mean(
                    optax.softmax_cross_entropy_with_integer_labels(state_logits[:, j], labels)
                )
        aux = dict(
            loss=jnp.mean(ce),
            acc=jnp.mean(jnp.argmax(logits, -1) == labels),
            fwd_steps=jnp.mean(record.num_steps),
            fwd_converged=jnp.mean(record.converged),
            jac_reg=jnp.mean(record.jac_reg),
        )
        if z0 is not None:
            aux["z_star"] = z_star
        return total, aux

    @eqx.filter_jit
    def step(model, opt_state, images, labels, key, jac_on=True, z0=None):
        (total, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, images, labels, key, jac_on, z0
        )
        stats = backward_stats(grads)  # None for `unrolled` (no backward solver)
        grads = without_backward_stats(grads)
        model, opt_state, finite = guarded_update(optimizer, grads, model, opt_state, total)
        if has_normalisation(model):
            # The power iteration follows the new weights; a skipped step changes nothing.
            advanced = update_normalisation(model)
            model = jtu.tree_map(
                lambda a, b: jnp.where(finite, a, b) if eqx.is_array(a) else a, advanced, model
            )
        batch = images.shape[0]
        if stats is None:  # `unrolled`: backpropagation through each forward step once
            bwd_steps = aux["fwd_steps"]
        else:  # summed over the vmapped batch: take the mean
            bwd_steps = stats.num_steps / batch
        aux["bwd_steps"] = jnp.asarray(bwd_steps, jnp.float32)
        aux["total"] = total
        aux["finite"] = finite
        return model, opt_state, aux

    return step


def make_eval_step(config: Config) -> Callable:
    """``evaluate(model, images, labels, mask) -> sums`` of ``loss``, ``correct``,
    ``fwd_steps``, ``fwd_converged``, ``count`` (and ``spectral_radius`` with
    `config.spectral_radius_steps`) over the unmasked samples. The model runs in
    inference mode (`eqx.nn.inference_mode`): the evaluation budget and tolerance, no
    dropout, no power iteration."""
    radius_steps = int(config.spectral_radius_steps)

    @eqx.filter_jit
    def evaluate(model, images, labels, mask):
        model = eqx.nn.inference_mode(model)
        keys = jax.random.split(jax.random.key(0), images.shape[0])

        def one(im, k):
            logits, record, _ = model.solve(im, key=k, spectral_radius=radius_steps)
            return logits, record

        logits, record = jax.vmap(one)(images, keys)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        w = mask.astype(jnp.float32)
        sums = dict(
            loss=jnp.sum(jnp.where(mask, ce, 0.0)),
            correct=jnp.sum(w * (jnp.argmax(logits, -1) == labels)),
            fwd_steps=jnp.sum(w * record.num_steps),
            fwd_converged=jnp.sum(w * record.converged),
            count=jnp.sum(w),
        )
        if radius_steps:
            sums["spectral_radius"] = jnp.sum(w * record.spectral_radius)
        return sums

    return evaluate


def compiled_steps(
    config: Config, total_steps: int
) -> tuple[Callable, Callable, optax.GradientTransformation]:
    """``(train_step, eval_step, optimizer)`` of a run of `total_steps` steps, shared by
    runs with the same step settings (`Config.step_settings`)."""
    return _steps_for(config.step_settings(), total_steps)


@functools.lru_cache(maxsize=8)
def _steps_for(
    settings: tuple[tuple[str, Any], ...], total_steps: int
) -> tuple[Callable, Callable, optax.GradientTransformation]:
    config = Config(**dict(settings))
    optimizer = make_optimizer(config, total_steps)
    return make_train_step(config, optimizer), make_eval_step(config), optimizer
