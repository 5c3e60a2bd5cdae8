"""The model, its solvers and the optimiser of a training run, built from a `Config`."""

from __future__ import annotations

from typing import Any, cast, Literal

import equinox as eqx
import jax
import jax.tree_util as jtu
import optax
import optimistix as optx

import fixedpoint as fp
from fixedpoint.internal import linear_solver, root_finder, TRAINER_BACKWARD, TRAINER_FORWARD

from .._correction import FixedPointCorrection
from .._norm import normalise
from .config import Config
from .model import ConvCell, DEQClassifier


def make_solver(config: Config, tol: float | None = None) -> fp.AbstractFixedPointRootFinder:
    """The forward root finder. Its stopping rule (`TRAINER_FORWARD`) is relative, in the
    RMS norm: ``rms(r / (tol + tol * |z|)) < 1`` with `tol` (default `config.fwd_tol`)."""
    tol = config.fwd_tol if tol is None else tol
    kwargs = TRAINER_FORWARD(tol)
    kwargs.update(beta=config.beta, **_history(config, config.solver))
    return root_finder(config.solver, **kwargs)


def make_adjoint(config: Config) -> optx.AbstractAdjoint:
    """The backward pass. For `implicit`, the backward linear solve stops on a purely
    relative rule (`TRAINER_BACKWARD`: the cotangent's scale depends on the batch size,
    so an absolute tolerance would be meaningless): ``rms(r / (1e-9 + tol * |w|)) < 1``.
    `unrolled` is optimistix's `RecursiveCheckpointAdjoint`: backpropagation through
    the forward solver's iterations (the ablation of the DEQ)."""
    if config.backward == "jfb":
        return fp.JacobianFreeAdjoint()
    if config.backward == "unrolled":
        return optx.RecursiveCheckpointAdjoint()
    if config.backward == "phantom":
        return fp.PhantomAdjoint(steps=config.phantom_steps, beta=config.phantom_beta)
    kwargs = TRAINER_BACKWARD(config.backward_tol)
    kwargs.update(max_steps=config.backward_max_steps, **_history(config, config.backward_solver))
    return fp.ImplicitAdjoint(linear_solver(config.backward_solver, **kwargs), throw=False)


def _history(config: Config, name: str) -> dict[str, Any]:
    """The history setting of the solver `name` (Anderson's m, Broyden's memory)."""
    if name == "anderson":
        return dict(m=config.anderson_m)
    if name == "broyden":
        return dict(memory=config.broyden_memory)
    return {}


def make_model(config: Config, key: jax.Array | None = None) -> DEQClassifier:
    """The classifier, initialised from `key` (default: derived from `config.seed`),
    with the DEQ toolkit's settings: normalisation of the cell's convolution, dropout,
    evaluation budget, fixed-point correction."""
    if key is None:
        key = jax.random.fold_in(jax.random.key(config.seed), 10**6)
    steps = config.correction_steps()
    model = DEQClassifier(
        config.width,
        solver=make_solver(config),
        adjoint=make_adjoint(config),
        max_steps=config.max_steps,
        groups=config.groups,
        head=cast(Literal["mean", "pool4", "pool7"], config.head),  # checked by Config.check
        stem_stride=config.stem_stride,
        stem_width=config.stem_width,
        dropout=config.dropout,
        eval_max_steps=config.eval_max_steps,
        eval_solver=None
        if config.eval_fwd_tol is None
        else make_solver(config, config.eval_fwd_tol),
        correction=FixedPointCorrection(steps) if steps else None,
        key=key,
    )
    if config.norm != "none":
        cell = model.deq.cell
        assert isinstance(cell, ConvCell)
        cell = normalise(
            cell,
            config.norm,
            key=jax.random.fold_in(key, 1),
            filter=lambda node: node is cell.conv,
            target=config.norm_target,
            clip=config.norm_clip,
            learn_scale=config.norm_learn_scale if config.norm == "weight" else None,
            power_iterations=config.power_iterations,
        )
        model = eqx.tree_at(lambda m: m.deq.cell, model, cell)
    return model


def _decay_mask(params):
    # Weight decay on the convolution and linear weights only (not biases or norms).
    return jtu.tree_map(lambda x: x is not None and x.ndim >= 2, params)


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW on a linear-warmup + cosine-decay schedule."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, warmup, max(total_steps, warmup + 1), end_value=config.lr * 1e-2
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask),
    )
