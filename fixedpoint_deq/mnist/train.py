"""Training a deep-equilibrium classifier on MNIST: data-parallel, resumable, logged.

- `train(config)`: the whole run; returns a `Result` (model, optimiser state, history).
- `evaluate`: test loss, accuracy and forward statistics of a model.
- `prepare_run`: what `train` does to the run's directories before it reads any data.
- The errors of a run: `DirectoryInUseError`, `WriteError` and `TrainingInterrupted`
  (importable from here), `SetupError` (`fixedpoint_deq.mnist.config`),
  `CheckpointError` (`fixedpoint_deq.mnist.checkpoint`) and `MNISTDataError`
  (`fixedpoint_deq.mnist.data`).

The pieces of a run live in modules by concern; import them from there:

- `config`: `Config`, every setting (the command line is derived from its fields);
- `build`: `make_solver`, `make_adjoint`, `make_model`, `make_optimizer`;
- `inputs`: `prepare_images`, `load_data`, `epoch_order`, `step_key`;
- `steps`: `make_train_step`, `make_eval_step`, `compiled_steps`;
- `sharding`: `make_mesh`, `put`, `replicate`;
- `checkpoint`: `save_checkpoint`, `load_checkpoint`, `load_model`;
- `metrics`: `write_metrics`, `plot_metrics`;
- `warm`: the warm starts of ``reuse_fixed_points``.

**Determinism and resuming.** Every random choice is a function of `(seed, epoch)` or
`(seed, epoch, step)`, never of an RNG stream consumed since the start: the order of the
training set in epoch `e` is ``np.random.default_rng([seed, e]).permutation(n)``, and the
key of step `s` of epoch `e` is ``fold_in(fold_in(key(seed), e), s)``. A checkpoint
written after every epoch holds the model, the optimiser state, the base key and the
epoch (plus the metrics history), so a run resumed after epoch `k` performs exactly the
steps an uninterrupted run performs from epoch `k + 1` on.

**Checkpoints** (in `checkpoint_dir`): see `fixedpoint_deq.mnist.checkpoint`; written
atomically after every epoch.

**Data parallelism.** A 1-D `jax.sharding.Mesh` over `jax.devices()` with axis
``"batch"``; each batch is sharded along it, the model and optimiser state are
replicated, and the jitted step is partitioned by XLA. The batch size must be a multiple
of the number of devices. Multi-host: pass `distributed=True` (`--distributed`) to join
the other processes first (`fixedpoint_deq.mnist.distributed`: a cluster JAX detects, or
`coordinator_address`, `num_processes` and `process_id`); every process then builds the
same global batches and feeds its own shards.

**Non-finite steps.** A step whose loss, gradient or update (the new parameters and
optimiser state) is not finite leaves the model and the optimiser state unchanged; such
steps are counted (``skipped`` in the metrics). A non-finite model is never saved.

**Before the first step** (`prepare_run`): the checkpoint and output directories are
created and checked to be writable, then locked: a run owns them until it ends, however
it ends, and another run that starts on one of them meanwhile is refused
(`DirectoryInUseError`, naming the holder). Then what an interrupted save left is
removed, and a directory that holds a checkpoint is refused unless the run resumes it
(``resume``) or replaces it (``overwrite``): a run never deletes a model silently.

**Faults and interruptions.** A checkpoint or ``metrics.jsonl`` that cannot be written
(a full disk, a read-only directory) stops the run with a `WriteError` naming the file,
the fault and the last good checkpoint, which is kept; a plot that cannot be written is
a warning. Ctrl-C (SIGINT) stops the run between two steps, never inside a save:
`TrainingInterrupted` says where and what was saved (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from .._monitor import JacobianRegSchedule
from ._files import (
    describe,
    DirectoryInUseError,
    DirectoryLock,
    ensure_writable_directory,
    lock_directories,
    remove_temporaries,
    WriteError,
)
from .build import make_model
from .checkpoint import (
    checkpoint_epoch,
    CHECKPOINT_JSON,
    has_checkpoint,
    load_checkpoint,
    read_meta,
    remove_leftovers,
    save_checkpoint,
)
from .config import Config, RESUME_KEYS, SetupError
from .distributed import initialize as initialize_distributed
from .inputs import epoch_order, load_data, prepare_images, step_key
from .metrics import METRICS_FILE, PLOT_FILE, write_metrics
from .sharding import batch_sharding, make_mesh, put, replicate, scalars
from .steps import compiled_steps
from .warm import WarmStarts


__all__ = [
    "DirectoryInUseError",
    "Result",
    "TrainingInterrupted",
    "WriteError",
    "evaluate",
    "prepare_run",
    "train",
]


@dataclasses.dataclass
class Result:
    """What `train` returns: the final (replicated) model and optimiser state, the
    metrics of every epoch, and the last epoch done."""

    model: Any
    opt_state: Any
    history: list[dict]
    epoch: int


#: Points per epoch of the per-step training curve (``record["curve"]``).
CURVE_POINTS = 40


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT). The message says where, and what was saved;
    `saved_epoch` is the epoch of the checkpoint in `checkpoint_dir` that this run
    wrote or resumed (None if none)."""

    def __init__(self, message: str, saved_epoch: int | None):
        super().__init__(message)
        self.saved_epoch = saved_epoch


def train(
    config: Config,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> Result:
    """Run (or resume) a training run.

    **Arguments:**

    - `config`: the run's settings.
    - `data`: ``(train_images, train_labels, test_images, test_labels)`` as returned by
      `load_data` (default: `load_data(config)`); images go through `prepare_images`
      unless already float32 ``(N, 1, 28, 28)``.
    - `progress`: show progress bars.
    - `log`: called with each line of the log.
    - `stop_after_epoch`: stop once that epoch is done (to simulate an interruption; the
      schedule still spans `config.epochs`).

    The run holds its directories for its whole life (`prepare_run`).

    **Raises:** `ValueError` for invalid settings (`Config.check`), a batch size that is
    not a multiple of the number of devices, or a training set smaller than one batch;
    `SetupError`, `DirectoryInUseError`, `CheckpointError` before anything is read (see
    `prepare_run`); `MNISTDataError` if the data cannot be read; `WriteError` if a
    checkpoint or ``metrics.jsonl`` cannot be written (the message names the file, the
    fault and the last good checkpoint); `TrainingInterrupted` on Ctrl-C.
    """
    config.check()
    is_main = _start_processes(config)
    with prepare_run(config, main=is_main), _Interrupts() as interrupts:
        try:
            mesh = _mesh_for(config)
            data = _prepare_data(config, data)
            steps_per_epoch = _steps_per_epoch(config, len(data.train_x))
            train_step, eval_step, optimizer = compiled_steps(
                config, steps_per_epoch * config.epochs
            )
            loop = _Loop(config, mesh, data, train_step, steps_per_epoch, progress and is_main, log)
            state = _initial_state(config, optimizer, len(data.train_x), mesh, log)
            interrupts.saved_epoch = state.saved_epoch
            last_epoch = config.epochs if stop_after_epoch is None else stop_after_epoch
            for epoch in range(state.start_epoch, min(config.epochs, last_epoch) + 1):
                start = time.perf_counter()
                record = _train_epoch(loop, state, epoch, interrupts)
                train_time = time.perf_counter() - start
                record.update(
                    evaluate(
                        state.model,
                        data.test_x,
                        data.test_y,
                        batch_size=config.eval_batch_size,
                        mesh=mesh,
                        eval_step=eval_step,
                    )
                )
                record.update(train_time=train_time, wall_time=time.perf_counter() - start)
                state.history.append(record)
                if is_main:
                    log(_summary(record))
                    _save(config, state, epoch, interrupts, log)
                interrupts.epoch, interrupts.steps_done = epoch, steps_per_epoch
                if interrupts.requested:
                    raise interrupts.stop(config, steps_per_epoch)
            return state.result()
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # (a second Ctrl-C: at once, wherever it landed)
            raise interrupts.stop(config, None) from None


# --------------------------------------------------------------------------- the steps of `train`


def _start_processes(config: Config) -> bool:
    """Join the other processes of a multi-host run (``distributed``: calls
    `fixedpoint_deq.mnist.distributed.initialize`). Returns whether this process is the main one (the
    first), which alone writes the run's files."""
    if not config.distributed:
        return True
    initialize_distributed(
        config.coordinator_address,
        config.num_processes,
        config.process_id,
        timeout=config.coordinator_timeout,
    )
    return jax.process_index() == 0


def _mesh_for(config: Config) -> Mesh:
    """The mesh over all devices (`make_mesh`).

    **Raises:** `ValueError` if the batch size is not a multiple of the number of
    devices."""
    mesh = make_mesh()
    ndev = mesh.devices.size
    if config.batch_size % ndev:
        raise ValueError(
            f"The batch size ({config.batch_size}) must be divisible by the number of devices "
            f"({ndev}: {jax.devices()[0].platform}); pick a multiple of {ndev}."
        )
    return mesh


class _Data(NamedTuple):
    """The data of a run: normalised float32 images ``(N, 1, 28, 28)``, int32 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _prepare_data(
    config: Config, data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
) -> _Data:
    """The data of the run: `data` as given to `train` (``(N, 28, 28)`` images are
    normalised by `prepare_images`), or `load_data(config)` if it is None."""
    if data is None:
        data = load_data(config)
    train_x, train_y, test_x, test_y = data
    if train_x.ndim == 3:
        train_x = prepare_images(train_x)
    if test_x.ndim == 3:
        test_x = prepare_images(test_x)
    return _Data(train_x, np.asarray(train_y, np.int32), test_x, np.asarray(test_y, np.int32))


def _steps_per_epoch(config: Config, n: int) -> int:
    """The number of steps per epoch over `n` training digits (the last partial batch
    is dropped).

    **Raises:** `ValueError` if the training set is smaller than one batch."""
    steps = n // config.batch_size
    if steps == 0:
        raise ValueError(f"The training set ({n}) is smaller than one batch ({config.batch_size}).")
    return steps


@dataclasses.dataclass(frozen=True)
class _Loop:
    """What stays fixed over the epochs of a run: its settings, mesh and data, the
    jitted training step, the number of steps per epoch, whether to show progress bars,
    and the log."""

    config: Config
    mesh: Mesh
    data: _Data
    train_step: Callable
    steps_per_epoch: int
    progress: bool
    log: Callable[[str], None]

    @functools.cached_property
    def sharding(self) -> NamedSharding:
        """How a batch is split over the mesh."""
        return batch_sharding(self.mesh)

    @functools.cached_property
    def schedule(self) -> JacobianRegSchedule:
        """On which steps the Jacobian regulariser is computed."""
        return JacobianRegSchedule(self.config.jac_reg, every=self.config.jac_reg_every)


@dataclasses.dataclass
class _State:
    """What the epochs of a run change: the (replicated) model and optimiser state, the
    base key, the metrics of every epoch, the first epoch to train, the epoch of the
    checkpoint this run wrote or resumed (None if none), and the warm starts (None
    without ``reuse_fixed_points``)."""

    model: Any
    opt_state: Any
    base_key: jax.Array
    history: list[dict]
    start_epoch: int
    saved_epoch: int | None
    warm: WarmStarts | None

    def result(self) -> Result:
        """What `train` returns."""
        last = self.history[-1]["epoch"] if self.history else self.start_epoch - 1
        return Result(model=self.model, opt_state=self.opt_state, history=self.history, epoch=last)


def _initial_state(
    config: Config,
    optimizer: optax.GradientTransformation,
    n: int,
    mesh: Mesh,
    log: Callable[[str], None],
) -> _State:
    """A new model and optimiser state, or (``resume``) those of the checkpoint in
    `checkpoint_dir`, replicated over `mesh`.

    **Arguments:**

    - `config`: the run's settings.
    - `optimizer`: the run's optimiser (`compiled_steps`).
    - `n`: the number of training digits (for the warm starts).
    - `mesh`: the devices.
    - `log`: called with each line of the log.

    **Raises:** `CheckpointError` for a checkpoint that cannot be read or was written
    with other `RESUME_KEYS` settings."""
    model = make_model(config)
    state = _State(
        model=model,
        opt_state=optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        base_key=jax.random.key(config.seed),
        history=[],
        start_epoch=1,
        saved_epoch=None,
        warm=WarmStarts(n, config.width, model.state_side) if config.reuse_fixed_points else None,
    )
    if config.resume:
        _resume(config, state, log)
    state.model = replicate(state.model, mesh)
    state.opt_state = replicate(state.opt_state, mesh)
    return state


def _resume(config: Config, state: _State, log: Callable[[str], None]) -> None:
    """Replace the model, optimiser state, key, history and warm starts of `state` by
    those of the checkpoint in `checkpoint_dir`; with no checkpoint there, start from
    scratch (and say so)."""
    assert config.checkpoint_dir is not None  # Config.check: `resume` needs one
    loaded = load_checkpoint(
        config.checkpoint_dir,
        state.model,
        state.opt_state,
        state.base_key,
        functools.partial(_check_resumable, config),
    )
    if loaded is None:
        log(f"no checkpoint in {config.checkpoint_dir}: starting from scratch")
        return
    epoch, state.model, state.opt_state, state.base_key, state.history, _ = loaded
    state.start_epoch = epoch + 1
    state.saved_epoch = epoch
    log(f"resumed from {config.checkpoint_dir} after epoch {epoch}")
    if state.warm is not None:
        state.warm.load(config.checkpoint_dir, epoch, log)


def _check_resumable(config: Config, saved: dict) -> None:
    """Refuse (`ValueError`) a checkpoint whose saved configuration `saved` differs from
    `config` in a setting that a resumed run must share (`RESUME_KEYS`)."""
    for k in RESUME_KEYS:
        if saved.get(k) != getattr(config, k):
            raise ValueError(
                f"Cannot resume: the checkpoint was written with {k}={saved.get(k)!r}, "
                f"this run has {k}={getattr(config, k)!r}."
            )


def _train_epoch(loop: _Loop, state: _State, epoch: int, interrupts: _Interrupts) -> dict:
    """Train `epoch`: one step per batch, in the order `epoch_order` gives, with a
    progress bar if `loop.progress`; a step that is not finite is skipped (and logged).
    Before each step, a Ctrl-C since the last one stops the run (`TrainingInterrupted`).

    Returns the training part of the epoch's record: the means over the applied steps,
    the count of skipped ones, the training curve, and the warm-start rate (with
    ``reuse_fixed_points``)."""
    config, steps = loop.config, loop.steps_per_epoch
    order = epoch_order(config.seed, epoch, len(loop.data.train_x))
    sums = _EpochSums()
    curve_every = max(1, steps // CURVE_POINTS)  # (about CURVE_POINTS points per epoch)
    bar = None
    if loop.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=True)
    for s in range(steps):
        interrupts.epoch, interrupts.steps_done = epoch, s
        if interrupts.requested:
            if bar is not None:
                bar.close()
            raise interrupts.stop(config, steps)
        indices = order[s * config.batch_size : (s + 1) * config.batch_size]
        reg_on = bool(loop.schedule.active((epoch - 1) * steps + s))  # (a Python bool)
        metrics = _step(loop, state, indices, reg_on, step_key(state.base_key, epoch, s))
        if metrics["finite"] > 0.5:
            sums.add(metrics, reg_on)
        else:
            sums.skipped += 1
            loop.log(f"epoch {epoch} step {s}: non-finite loss, gradient or update: skipped")
        if (s + 1) % curve_every == 0 or s + 1 == steps:
            sums.end_window(examples=((epoch - 1) * steps + s + 1) * config.batch_size)
        if bar is not None:
            bar.set_postfix(
                loss=f"{sums.mean('loss'):.4f}",
                acc=f"{sums.mean('acc'):.4f}",
                fwd=f"{sums.mean('fwd_steps'):.1f}",
                bwd=f"{sums.mean('bwd_steps'):.1f}",
                refresh=False,
            )
            bar.update(1)
    if bar is not None:
        bar.close()
    record = sums.record(epoch, examples=epoch * steps * config.batch_size)
    if state.warm is not None:
        record["warm_start_rate"] = state.warm.take_hit_rate()
    return record


def _step(
    loop: _Loop, state: _State, indices: np.ndarray, reg_on: bool, key: jax.Array
) -> dict[str, float]:
    """One training step on the digits `indices` (the model and optimiser state of
    `state` are updated in place; a step that is not finite leaves them as they were).

    **Arguments:**

    - `loop`, `state`: the run.
    - `indices`: the batch, as indices into the training set.
    - `reg_on`: whether the Jacobian regulariser is computed on this step.
    - `key`: the step's key (`step_key`).

    Returns the step's metrics as floats."""
    x = put(loop.data.train_x[indices], loop.sharding)
    y = put(loop.data.train_y[indices], loop.sharding)
    extra: dict[str, Any] = {}
    if loop.config.jac_reg_every > 1:  # (else the default: every step)
        extra["jac_on"] = jnp.asarray(reg_on)
    if state.warm is not None:
        extra["z0"] = put(state.warm.lookup(indices), loop.sharding)
    state.model, state.opt_state, metrics = loop.train_step(
        state.model, state.opt_state, x, y, key, **extra
    )
    if state.warm is not None:
        state.warm.update(indices, metrics.pop("z_star"))
    return scalars(metrics)


class _EpochSums:
    """The sums of the metrics of an epoch's applied steps (for the epoch's means and
    the progress bar), and of the current window of steps (for the training curve)."""

    _SUMMED = ("loss", "acc", "fwd_steps", "fwd_converged", "bwd_steps")

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.window: dict[str, float] = {}
        self.curve: list[dict[str, float]] = []
        self.applied = 0
        self.skipped = 0

    def add(self, metrics: dict[str, float], reg_on: bool) -> None:
        """Count an applied step with `metrics` (`reg_on`: whether it computed the
        Jacobian regulariser)."""
        self.applied += 1
        for k in self._SUMMED:
            self.sums[k] = self.sums.get(k, 0.0) + metrics[k]
            self.window[k] = self.window.get(k, 0.0) + metrics[k]
        self.window["steps"] = self.window.get("steps", 0) + 1
        if reg_on:
            self.sums["jac_reg"] = self.sums.get("jac_reg", 0.0) + metrics["jac_reg"]
            self.sums["jac_reg_steps"] = self.sums.get("jac_reg_steps", 0) + 1

    def end_window(self, examples: int) -> None:
        """Close the window: one point of the training curve (the window's means, at
        `examples` examples seen), unless it holds no applied step."""
        if self.window.get("steps"):
            w = self.window.pop("steps")
            point = {k: v / w for k, v in self.window.items()}
            point["examples"] = examples
            self.curve.append(point)
        self.window = {}

    def mean(self, key: str) -> float:
        """The mean of `key` over the applied steps (NaN if none)."""
        return self.sums.get(key, math.nan) / max(self.applied, 1)

    def record(self, epoch: int, examples: int) -> dict:
        """The training part of the record of `epoch`, `examples` examples seen at its
        end."""
        return dict(
            epoch=epoch,
            train_loss=self.mean("loss"),
            train_acc=self.mean("acc"),
            fwd_steps=self.mean("fwd_steps"),
            bwd_steps=self.mean("bwd_steps"),
            fwd_converged=self.mean("fwd_converged"),
            jac_reg=self.sums.get("jac_reg", math.nan) / max(self.sums.get("jac_reg_steps", 0), 1),
            jac_reg_steps=self.sums.get("jac_reg_steps", 0),
            skipped=self.skipped,
            examples=examples,
            curve=self.curve,
        )


def _summary(record: dict) -> str:
    """The line of the log for an epoch's `record`."""
    return (
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc "
        f"{100 * record['train_acc']:.2f}% | test loss {record['test_loss']:.4f} acc "
        f"{100 * record['test_acc']:.2f}% | fwd {record['fwd_steps']:.1f} steps "
        f"({100 * record['fwd_converged']:.1f}% converged), bwd "
        f"{record['bwd_steps']:.1f} | jac_reg {record['jac_reg']:.3f} | "
        f"skipped {record['skipped']} | {record['wall_time']:.0f} s"
        + "".join(
            f" | {name} {record[key]:.3f}"
            for key, name in (
                ("test_spectral_radius", "spectral radius"),
                ("warm_start_rate", "warm starts"),
            )
            if key in record
        )
    )


def _save(
    config: Config,
    state: _State,
    epoch: int,
    interrupts: _Interrupts,
    log: Callable[[str], None],
) -> None:
    """Write the checkpoint of `epoch` (with its warm starts) to `checkpoint_dir` and
    the metrics files to `out_dir` (where set). The warm-start files that the new
    checkpoint makes obsolete are removed; one that cannot be is a warning.

    **Raises:** `WriteError` if the checkpoint or ``metrics.jsonl`` cannot be written,
    naming the file, the fault and the last good checkpoint."""
    if config.checkpoint_dir is not None:
        warm = state.warm
        replaced = checkpoint_epoch(config.checkpoint_dir) if warm is not None else None
        try:
            if warm is not None:  # first: the checkpoint's JSON is the commit point
                warm.save(config.checkpoint_dir, epoch)
            save_checkpoint(
                config.checkpoint_dir,
                epoch,
                state.model,
                state.opt_state,
                state.base_key,
                state.history,
                config,
            )
        except OSError as e:
            raise WriteError(
                f"{_fault(e, config.checkpoint_dir)}; the checkpoint of epoch {epoch} "
                f"was not saved ({_last_checkpoint(config, state.saved_epoch)})"
            ) from e
        state.saved_epoch = interrupts.saved_epoch = epoch
        if warm is not None:
            try:
                warm.prune(config.checkpoint_dir, epoch, replaced)
            except OSError as e:
                log(f"warning: {_fault(e, config.checkpoint_dir)}")
    if config.out_dir is not None:
        try:
            write_metrics(config.out_dir, state.history, warn=log)
        except OSError as e:
            raise WriteError(
                f"{_fault(e, config.out_dir)} ({_last_checkpoint(config, state.saved_epoch)})"
            ) from e


# --------------------------------------------------------------------------- evaluation, directories, faults


def evaluate(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    mesh: Mesh,
    eval_step: Callable,
) -> dict[str, float]:
    """Test loss, accuracy and forward statistics over all of `images` (padded batches)."""
    n = len(images)
    ndev = mesh.devices.size
    batch_size = max(ndev, (min(batch_size, n) + ndev - 1) // ndev * ndev)
    sharding = batch_sharding(mesh)
    sums: dict[str, float] = {}
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        mask = np.ones(len(x), bool)
        if len(x) < batch_size:
            pad = batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, bool)])
        out = scalars(eval_step(model, put(x, sharding), put(y, sharding), put(mask, sharding)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
    count = max(sums["count"], 1.0)
    out = dict(
        test_loss=sums["loss"] / count,
        test_acc=sums["correct"] / count,
        test_fwd_steps=sums["fwd_steps"] / count,
        test_fwd_converged=sums["fwd_converged"] / count,
    )
    if "spectral_radius" in sums:
        out["test_spectral_radius"] = sums["spectral_radius"] / count
    return out


def prepare_run(config: Config, *, main: bool = True) -> DirectoryLock:
    """What `train` does before it reads any data (see the module docstring): returns
    the lock on the run's directories, which the caller releases (`DirectoryLock.release`,
    or ``with prepare_run(config):``) when the run ends.

    **Arguments:**

    - `config`: the run's settings.
    - `main`: whether this is the process that writes the files (the first of a
      multi-host run); the others only check, and neither lock nor remove anything.

    **Raises:** `SetupError` for a directory that cannot be written or a checkpoint in
    the way, `DirectoryInUseError` for a directory another run holds, and
    `CheckpointError` for a checkpoint to resume that cannot be read."""
    directories = [("checkpoint_dir", config.checkpoint_dir), ("out_dir", config.out_dir)]
    for name, directory in directories:
        if directory is None:
            continue
        try:
            ensure_writable_directory(directory)
        except OSError as e:
            raise SetupError(f"`{name}`: {e}") from e
    if not main:
        _check_checkpoint(config)
        return DirectoryLock()
    try:
        lock = lock_directories(d for _, d in directories if d is not None)
    except OSError as e:
        raise SetupError(f"cannot lock the run's directories: {e}") from e
    try:
        if config.out_dir is not None:
            remove_temporaries(Path(config.out_dir), (METRICS_FILE, PLOT_FILE))
        if config.checkpoint_dir is not None:
            remove_leftovers(config.checkpoint_dir)
        _check_checkpoint(config)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_checkpoint(config: Config) -> None:
    """Refuse a checkpoint in the way; read the one to resume (so that a corrupt
    checkpoint fails now, not after loading the data)."""
    if config.checkpoint_dir is None or not has_checkpoint(config.checkpoint_dir):
        return
    if config.resume:
        read_meta(config.checkpoint_dir)
    elif not config.overwrite:
        path = Path(config.checkpoint_dir) / CHECKPOINT_JSON
        raise SetupError(
            f"{path} holds the checkpoint of an earlier run: pass `resume` to continue it, or "
            "`overwrite` to start afresh and replace it (or pick another `checkpoint_dir`)."
        )


def _last_checkpoint(config: Config, saved_epoch: int | None) -> str:
    """What the checkpoint directory holds of this run, in words."""
    if config.checkpoint_dir is None:
        return "nothing saved (no `checkpoint_dir`)"
    if saved_epoch is None:
        if config.overwrite and has_checkpoint(config.checkpoint_dir):
            return (
                f"nothing saved (the earlier run's checkpoint in {config.checkpoint_dir} is kept)"
            )
        return "nothing saved"
    return f"last good checkpoint: epoch {saved_epoch} in {config.checkpoint_dir}"


def _fault(error: OSError, directory: str | os.PathLike) -> str:
    """`error` in one line that names the file (`WriteError`'s message already does)."""
    if isinstance(error, WriteError):
        return str(error)
    where = error.filename if error.filename is not None else directory
    return f"cannot write {where}: {describe(error)}"


class _Interrupts:
    """While entered (in the main thread): Ctrl-C sets `requested`, which the training
    loop checks between steps, instead of raising `KeyboardInterrupt` wherever the
    interpreter happens to be (inside a save, or inside a callback of JAX's garbage
    collector, which would swallow it). A second Ctrl-C raises at once. The previous
    handler is restored on exit; an ignored SIGINT stays ignored."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False
        # Where the run is, for the message (set by the training loop).
        self.epoch = 0
        self.steps_done = 0
        self.saved_epoch: int | None = None

    def stop(self, config: Config, steps_per_epoch: int | None) -> TrainingInterrupted:
        """The exception that stops the run: where it stopped (`steps_per_epoch`: None if
        it stopped at once, inside a step), and what was saved."""
        if self.epoch == 0:
            where = "before the first step"
        elif steps_per_epoch is None:
            where = f"in epoch {self.epoch}"
        elif self.steps_done == steps_per_epoch:
            where = f"after epoch {self.epoch}"
        else:
            where = f"in epoch {self.epoch} after {self.steps_done} of {steps_per_epoch} steps"
        saved = _last_checkpoint(config, self.saved_epoch)
        if self.saved_epoch is not None:
            saved += " (continue it with `resume`)"
        return TrainingInterrupted(f"interrupted {where}; {saved}", self.saved_epoch)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            previous = self._previous
            signal.signal(
                signal.SIGINT, signal.default_int_handler if previous is None else previous
            )
            self._installed = False
