"""Checkpoints: write one atomically after every epoch, read it back to resume, and
`load_model` (the trained model of a checkpoint, rebuilt from its configuration).

A checkpoint (in `checkpoint_dir`) is ``ckpt-XXXX.eqx`` (the pytrees, via
`eqx.tree_serialise_leaves`) and ``checkpoint.json`` (epoch, file name, history,
config). Both are written to a temporary file and moved into place with `os.replace`;
the JSON is written last and is the commit point, so an interrupted write never leaves
a checkpoint that points to a missing or partial file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._files import atomic_write, write_text
from .build import make_model, make_optimizer
from .config import Config
from .model import DEQClassifier
from .sharding import host_tree


CHECKPOINT_JSON = "checkpoint.json"


def save_checkpoint(
    directory: str | os.PathLike, epoch: int, model, opt_state, key, history, config: Config
) -> Path:
    """Write the checkpoint of the end of `epoch` atomically (see the module docstring)."""
    directory = Path(directory)
    name = f"ckpt-{epoch:04d}.eqx"
    trees = (model, opt_state, jax.random.key_data(key))
    atomic_write(directory / name, lambda p: eqx.tree_serialise_leaves(p, host_tree(trees)))
    meta = dict(epoch=epoch, file=name, history=history, config=dataclasses.asdict(config))
    write_text(directory / CHECKPOINT_JSON, json.dumps(meta, indent=1))
    for old in directory.glob("ckpt-*.eqx"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / name


def _read_as_like(f, x):
    """Deserialise one leaf in the dtype of `x`: a checkpoint written with 64-bit types
    enabled (or not) loads in a process running the other way."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(np.load(f), dtype=x.dtype)
    return eqx.default_deserialise_filter_spec(f, x)


def load_checkpoint(
    directory: str | os.PathLike,
    model_like,
    opt_state_like,
    key_like,
    check: Callable[[dict], None] | None = None,
):
    """``(epoch, model, opt_state, key, history, saved_config)`` of the checkpoint in
    `directory`, or None if there is none. `check(saved_config)` runs before the
    pytrees are read (to refuse an incompatible checkpoint with a clear message)."""
    directory = Path(directory)
    meta_path = directory / CHECKPOINT_JSON
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if check is not None:
        check(meta["config"])
    like = (model_like, opt_state_like, jax.random.key_data(key_like))
    model, opt_state, key_data = eqx.tree_deserialise_leaves(
        directory / meta["file"], like, filter_spec=_read_as_like
    )
    key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=jax.random.key_impl(key_like))
    return meta["epoch"], model, opt_state, key, meta["history"], meta["config"]


def load_model(directory: str | os.PathLike) -> tuple[DEQClassifier, Config, int]:
    """``(model, config, epoch)`` of the checkpoint in `directory` (for evaluation,
    inspection or benchmarking a trained model; `train` with ``resume`` continues one).

    The model is rebuilt from the configuration saved with the checkpoint, so its
    width, groups, head and solvers are those it was trained with.

    Raises:
        FileNotFoundError: `directory` holds no ``checkpoint.json``.
    """
    directory = Path(directory)
    meta_path = directory / CHECKPOINT_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no checkpoint in {directory} (no {CHECKPOINT_JSON}); write one with "
            f"`python -m fixedpoint_deq.mnist --checkpoint-dir {directory}`"
        )
    config = Config.from_dict(json.loads(meta_path.read_text())["config"])
    with jax.enable_x64(False):  # checkpoints hold float32 arrays, also under x64
        model = make_model(config)
        optimizer = make_optimizer(config, total_steps=1)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        loaded = load_checkpoint(directory, model, opt_state, jax.random.key(0))
    assert loaded is not None  # checked above
    epoch, model = loaded[0], loaded[1]
    return model, config, epoch
