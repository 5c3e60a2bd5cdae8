"""Checkpoints: write one atomically after every epoch, read it back to resume, and
`load_model` (the trained model of a checkpoint, rebuilt from its configuration).

A checkpoint (in `checkpoint_dir`) is ``ckpt-XXXX-TOKEN.eqx`` (the arrays of the pytrees,
via `eqx.tree_serialise_leaves`; not their Python scalars, which the saved configuration
rebuilds; ``XXXX`` is the epoch, ``TOKEN`` random, so that no two saves write the same
file) and ``checkpoint.json`` (epoch, file name, history, config). Both are written to
a temporary file and moved into place with `os.replace`; the JSON is written last and
is the commit point, so an interrupted write never leaves a checkpoint that points to a
missing or partial file. A save then removes the one ``.eqx`` file that the JSON it
replaced named, and nothing else: two saves interleaved in one directory leave the
checkpoint of whichever wrote its JSON last, whole. (What an interrupted save leaves,
temporaries and a ``.eqx`` no JSON names, is removed when the next run that owns the
directory starts, `remove_leftovers`.) Files are written with the user's umask. A
model or optimiser state that is not finite is never saved; a save that fails (a full
disk, a read-only directory) raises `WriteError` naming the file and the fault, and
leaves the previous checkpoint as it was.

Reading checks everything it reads: a checkpoint that is not what this code writes
(truncated ``.eqx``, invalid JSON, a missing or mistyped key, a leaf of the wrong shape)
raises `CheckpointError`, naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._files import (
    atomic_write,
    remove_temporaries as _remove_temporaries,
    write_text,
    WriteError,
)
from .build import make_model, make_optimizer
from .config import Config
from .model import DEQClassifier
from .sharding import host_tree


CHECKPOINT_JSON = "checkpoint.json"
#: The names of the files of a checkpoint (glob patterns).
CHECKPOINT_FILES = (CHECKPOINT_JSON, "ckpt-*.eqx")
# The keys of checkpoint.json and their types.
_META_KEYS: dict[str, type | tuple[type, ...]] = dict(
    epoch=int, file=str, history=list, config=dict
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or written by a run whose
    settings this one cannot continue. The message names the file and what is wrong."""


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a (committed) checkpoint, i.e. a ``checkpoint.json``."""
    return (Path(directory) / CHECKPOINT_JSON).exists()


def checkpoint_epoch(directory: str | os.PathLike) -> int | None:
    """The epoch of the checkpoint in `directory` (as its ``checkpoint.json`` says), or
    None if there is none or its JSON cannot be read (nothing else is checked: see
    `read_meta`)."""
    try:
        epoch = json.loads((Path(directory) / CHECKPOINT_JSON).read_text())["epoch"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted save left in `directory`."""
    return _remove_temporaries(Path(directory), CHECKPOINT_FILES)


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted saves left in `directory`: temporary files, and the
    ``ckpt-*.eqx`` files that ``checkpoint.json`` does not name (all of them if there
    is no JSON; none if it cannot be read). Only for a directory this run owns (see
    `fixedpoint_deq.mnist._files.lock_directories`): another run's are files it is
    saving. Returns the removed paths."""
    directory = Path(directory)
    removed = remove_temporaries(directory)
    try:
        keep = _named_file(directory)
    except CheckpointError:
        return removed
    for path in directory.glob("ckpt-*.eqx"):
        if path.name != keep and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _named_file(directory: Path) -> str | None:
    """The ``.eqx`` file that ``checkpoint.json`` in `directory` names (None if there is
    no JSON; `CheckpointError` if it cannot be read, or its 'file' is not a file name
    ending in ``.eqx``)."""
    path = directory / CHECKPOINT_JSON
    try:
        name = json.loads(path.read_text())["file"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".eqx"):
        raise CheckpointError(f"{path}: 'file' should name a .eqx file beside it")
    return name


def read_meta(directory: str | os.PathLike) -> dict:
    """The contents of ``checkpoint.json`` in `directory`, checked: valid JSON, every
    key with its type, and the ``.eqx`` file it names present. Raises
    `CheckpointError` otherwise (and `FileNotFoundError` if there is no JSON)."""
    path = Path(directory) / CHECKPOINT_JSON
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    for key, kind in _META_KEYS.items():
        if key not in meta:
            raise CheckpointError(f"{path}: the key {key!r} is missing")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{path}: {key!r} should be a JSON {_json_type(kind)}, found {value!r:.80}"
            )
    name = meta["file"]
    if Path(name).name != name or not name.endswith(".eqx"):
        raise CheckpointError(f"{path}: 'file' should name a .eqx file beside it, found {name!r}")
    if not (path.parent / name).is_file():
        raise CheckpointError(f"{path}: names {name}, which is missing from {path.parent}")
    return meta


def _json_type(kind) -> str:
    return {int: "integer", str: "string", list: "array", dict: "object"}[kind]


def _all_finite(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in leaves)


def save_checkpoint(
    directory: str | os.PathLike, epoch: int, model, opt_state, key, history, config: Config
) -> Path:
    """Write the checkpoint of the end of `epoch` atomically (see the module docstring);
    returns the path of its ``.eqx`` file.

    **Raises:** `ValueError` (writing nothing) if the model or optimiser state is not
    finite; `WriteError` (naming the file and the fault) if a file cannot be written,
    the previous checkpoint then being as it was."""
    directory = Path(directory)
    if not _all_finite((model, opt_state)):
        raise ValueError(
            f"Refusing to save a checkpoint of epoch {epoch} in {directory}: the model or "
            "optimiser state holds non-finite values."
        )
    name = f"ckpt-{epoch:04d}-{secrets.token_hex(4)}.eqx"
    trees = (model, opt_state, jax.random.key_data(key))
    atomic_write(
        directory / name,
        lambda p: eqx.tree_serialise_leaves(p, host_tree(trees), filter_spec=_write_array),
    )
    try:
        replaced = _named_file(directory)
    except CheckpointError:
        replaced = None  # (left for `remove_leftovers`)
    meta = dict(epoch=epoch, file=name, history=history, config=dataclasses.asdict(config))
    try:
        write_text(directory / CHECKPOINT_JSON, json.dumps(meta, indent=1))
    except WriteError:
        _remove(directory / name)
        raise
    if replaced is not None and replaced != name:
        _remove(directory / replaced)
    return directory / name


def _remove(path: Path) -> None:
    """Remove `path` if it can be (a file that stays is a leftover, `remove_leftovers`)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _write_array(f, x) -> None:
    """Serialise the array leaves only. The Python scalars of the model (the solvers'
    hyperparameters, flags) are not written: `load_model` rebuilds them from the saved
    configuration, so a new field of a solver or layer does not make every existing
    checkpoint unreadable."""
    if eqx.is_array(x):
        eqx.default_serialise_filter_spec(f, x)


def _read_as_like(f, x):
    """Deserialise one array leaf in the dtype of `x` (a checkpoint written with 64-bit
    types enabled, or not, loads in a process running the other way; the shape must
    match); a non-array leaf is not in the file (see `_write_array`) and stays `x`."""
    if not eqx.is_array(x):
        return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
        value = np.load(f)
        if value.shape != x.shape:
            raise ValueError(f"a leaf of shape {value.shape} where {x.shape} was expected")
        return jnp.asarray(value, dtype=x.dtype)
    return eqx.default_deserialise_filter_spec(f, x)


def _read_trees(path: Path, like):
    """The pytrees of the ``.eqx`` file `path`, shaped like `like`; `CheckpointError`
    if it cannot be (truncated, corrupt, another model's) or holds more."""
    try:
        with open(path, "rb") as f:
            trees = eqx.tree_deserialise_leaves(f, like, filter_spec=_read_as_like)
            trailing = f.read(1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    except Exception as e:
        cause = e.__cause__ or e  # equinox wraps the leaf's error in a TreePathError
        raise CheckpointError(
            f"{path}: not a checkpoint of this model, or truncated or corrupt ({e}: "
            f"{type(cause).__name__}: {cause})"
        ) from e
    if trailing:
        raise CheckpointError(
            f"{path}: holds more data than this model's parameters and optimiser state "
            "(a checkpoint of another model?)"
        )
    return trees


def load_checkpoint(
    directory: str | os.PathLike,
    model_like,
    opt_state_like,
    key_like,
    check: Callable[[dict], None] | None = None,
):
    """``(epoch, model, opt_state, key, history, saved_config)`` of the checkpoint in
    `directory`, or None if there is none. `check(saved_config)` runs before the
    pytrees are read (to refuse an incompatible checkpoint with a clear message: a
    `ValueError` it raises becomes a `CheckpointError` naming the file). Raises
    `CheckpointError` for a checkpoint that cannot be read (see `read_meta`)."""
    directory = Path(directory)
    if not has_checkpoint(directory):
        return None
    meta = read_meta(directory)
    if check is not None:
        try:
            check(meta["config"])
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{directory / CHECKPOINT_JSON}: {e}") from e
    like = (model_like, opt_state_like, jax.random.key_data(key_like))
    model, opt_state, key_data = _read_trees(directory / meta["file"], like)
    key = jax.random.wrap_key_data(jnp.asarray(key_data), impl=jax.random.key_impl(key_like))
    return meta["epoch"], model, opt_state, key, meta["history"], meta["config"]


def load_model(directory: str | os.PathLike) -> tuple[DEQClassifier, Config, int]:
    """``(model, config, epoch)`` of the checkpoint in `directory` (for evaluation,
    inspection or benchmarking a trained model; `train` with ``resume`` continues one).

    The model is rebuilt from the configuration saved with the checkpoint, so its
    width, groups, head and solvers are those it was trained with.

    Raises:
        FileNotFoundError: `directory` holds no ``checkpoint.json``.
        CheckpointError: the checkpoint cannot be read (the message says why).
    """
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(
            f"no checkpoint in {directory} (no {CHECKPOINT_JSON}); write one with "
            f"`python -m fixedpoint_deq.mnist --checkpoint-dir {directory}`"
        )
    saved = read_meta(directory)["config"]
    try:
        config = Config.from_dict(saved)
        config.check()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CHECKPOINT_JSON}: invalid 'config' ({e})") from e
    with jax.enable_x64(False):  # checkpoints hold float32 arrays, also under x64
        model = make_model(config)
        optimizer = make_optimizer(config, total_steps=1)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        loaded = load_checkpoint(directory, model, opt_state, jax.random.key(0))
    assert loaded is not None  # checked above
    epoch, model = loaded[0], loaded[1]
    return model, config, epoch
