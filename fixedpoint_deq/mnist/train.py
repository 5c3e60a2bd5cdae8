"""Training a deep-equilibrium classifier on MNIST: data-parallel, resumable, logged.

- `train(config)`: the whole run; returns a `Result` (model, optimiser state, history).
- `evaluate`: test loss, accuracy and forward statistics of a model.

The pieces live in modules by concern, and are all importable from here too (for tests,
notebooks and older code):

- `config`: `Config`, every setting (the command line is derived from its fields);
- `build`: `make_solver`, `make_adjoint`, `make_model`, `make_optimizer`;
- `inputs`: `prepare_images`, `load_data`, `epoch_order`, `step_key`;
- `steps`: `make_train_step`, `make_eval_step`, `compiled_steps`;
- `sharding`: `make_mesh`, `put`, `replicate`;
- `checkpoint`: `save_checkpoint`, `load_checkpoint`, `load_model`;
- `metrics`: `write_metrics`, `plot_metrics`.

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
of the number of devices. Multi-host: pass `distributed=True` (`--distributed`) to call
`jax.distributed.initialize()` first; every process then builds the same global batches
and feeds its own shards.

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
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

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
from .build import make_adjoint, make_model, make_optimizer, make_solver
from .checkpoint import (
    CHECKPOINT_JSON,
    CheckpointError,
    has_checkpoint,
    load_checkpoint,
    load_model,
    read_meta,
    remove_leftovers,
    save_checkpoint,
)
from .config import (
    BACKWARD_MODES,
    BACKWARD_SOLVERS,
    Config,
    FORWARD_SOLVERS,
    RESUME_KEYS,
    SetupError,
)
from .inputs import epoch_order, load_data, prepare_images, step_key
from .metrics import METRICS_FILE, PLOT_FILE, plot_metrics, write_metrics
from .sharding import batch_sharding, make_mesh, put, replicate, scalars
from .steps import compiled_steps, make_eval_step, make_train_step
from .warm import WarmStarts


__all__ = [
    "BACKWARD_MODES",
    "BACKWARD_SOLVERS",
    "CHECKPOINT_JSON",
    "CheckpointError",
    "Config",
    "DirectoryInUseError",
    "FORWARD_SOLVERS",
    "METRICS_FILE",
    "PLOT_FILE",
    "Result",
    "SetupError",
    "compiled_steps",
    "epoch_order",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "load_model",
    "make_adjoint",
    "make_eval_step",
    "make_mesh",
    "make_model",
    "make_optimizer",
    "make_solver",
    "make_train_step",
    "plot_metrics",
    "prepare_images",
    "prepare_run",
    "put",
    "replicate",
    "save_checkpoint",
    "step_key",
    "train",
    "TrainingInterrupted",
    "write_metrics",
    "WriteError",
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


def train(
    config: Config,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> Result:
    """Run (or resume) a training run.

    `data`: ``(train_images, train_labels, test_images, test_labels)`` as returned by
    `load_data` (default: `load_data(config)`); images go through `prepare_images`
    unless already float32 ``(N, 1, 28, 28)``. `stop_after_epoch`: stop once that epoch
    is done (to simulate an interruption; the schedule still spans `config.epochs`).
    `progress`: show progress bars. `log`: called with each line of the log.

    The run holds its directories for its whole life (`prepare_run`).

    **Raises:** `SetupError`, `DirectoryInUseError`, `CheckpointError` before anything
    is read (see `prepare_run`); `WriteError` if a checkpoint or ``metrics.jsonl`` cannot
    be written (the message names the file, the fault and the last good checkpoint);
    `TrainingInterrupted` on Ctrl-C.
    """
    config.check()
    if config.distributed:
        jax.distributed.initialize()
        is_main = jax.process_index() == 0
    else:
        is_main = True
    with prepare_run(config, main=is_main), _Interrupts() as interrupts:
        try:
            return _run(config, data, progress, log, stop_after_epoch, is_main, interrupts)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # (a second Ctrl-C: at once, wherever it landed)
            raise interrupts.stop(config, None) from None


def _fault(error: OSError, directory: str | os.PathLike) -> str:
    """`error` in one line that names the file (`WriteError`'s message already does)."""
    if isinstance(error, WriteError):
        return str(error)
    where = error.filename if error.filename is not None else directory
    return f"cannot write {where}: {describe(error)}"


def _run(
    config: Config,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
    progress: bool,
    log: Callable[[str], None],
    stop_after_epoch: int | None,
    is_main: bool,
    interrupts: _Interrupts,
) -> Result:
    """The run of `train`, once its directories are held."""
    mesh = make_mesh()
    ndev = mesh.devices.size
    if config.batch_size % ndev:
        raise ValueError(
            f"The batch size ({config.batch_size}) must be divisible by the number of devices "
            f"({ndev}: {jax.devices()[0].platform}); pick a multiple of {ndev}."
        )
    if data is None:
        data = load_data(config)
    train_x, train_y, test_x, test_y = data
    if train_x.ndim == 3:
        train_x = prepare_images(train_x)
    if test_x.ndim == 3:
        test_x = prepare_images(test_x)
    train_y = np.asarray(train_y, np.int32)
    test_y = np.asarray(test_y, np.int32)
    n = len(train_x)
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"The training set ({n}) is smaller than one batch ({config.batch_size}).")
    total_steps = steps_per_epoch * config.epochs

    base_key = jax.random.key(config.seed)
    model = make_model(config)
    optimizer = compiled_steps(config, total_steps)[2]
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    history: list[dict] = []
    start_epoch = 1
    saved_epoch: int | None = None  # (of the checkpoint this run wrote or resumed)
    warm = WarmStarts(n, config.width, model.state_side) if config.reuse_fixed_points else None
    schedule = JacobianRegSchedule(config.jac_reg, every=config.jac_reg_every)
    if config.resume:

        def check(saved: dict) -> None:
            for k in RESUME_KEYS:
                if saved.get(k) != getattr(config, k):
                    raise ValueError(
                        f"Cannot resume: the checkpoint was written with {k}={saved.get(k)!r}, "
                        f"this run has {k}={getattr(config, k)!r}."
                    )

        assert config.checkpoint_dir is not None  # Config.check: `resume` needs one
        loaded = load_checkpoint(config.checkpoint_dir, model, opt_state, base_key, check)
        if loaded is None:
            log(f"no checkpoint in {config.checkpoint_dir}: starting from scratch")
        else:
            epoch, model, opt_state, base_key, history, saved = loaded
            start_epoch = epoch + 1
            saved_epoch = epoch
            log(f"resumed from {config.checkpoint_dir} after epoch {epoch}")
            if warm is not None:
                warm.load(config.checkpoint_dir, epoch, log)

    model = replicate(model, mesh)
    opt_state = replicate(opt_state, mesh)
    train_step, eval_step, _ = compiled_steps(config, total_steps)
    sharding = batch_sharding(mesh)
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)

    # Points of the training curve: about CURVE_POINTS per epoch.
    curve_every = max(1, steps_per_epoch // CURVE_POINTS)
    if progress and is_main:
        from tqdm.auto import tqdm
    interrupts.saved_epoch = saved_epoch
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.perf_counter()
        order = epoch_order(config.seed, epoch, n)
        sums: dict[str, float] = {}
        applied = skipped = 0
        curve: list[dict[str, float]] = []
        window: dict[str, float] = {}
        bar = None
        if progress and is_main:
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=True)
        for s in range(steps_per_epoch):
            interrupts.epoch, interrupts.steps_done = epoch, s
            if interrupts.requested:
                if bar is not None:
                    bar.close()
                raise interrupts.stop(config, steps_per_epoch)
            idx = order[s * config.batch_size : (s + 1) * config.batch_size]
            x = put(train_x[idx], sharding)
            y = put(train_y[idx], sharding)
            extra: dict[str, Any] = {}
            reg_on = schedule.active((epoch - 1) * steps_per_epoch + s)
            if config.jac_reg_every > 1:  # (else the default: every step)
                extra["jac_on"] = jnp.asarray(reg_on)
            if warm is not None:
                extra["z0"] = put(warm.lookup(idx), sharding)
            model, opt_state, metrics = train_step(
                model, opt_state, x, y, step_key(base_key, epoch, s), **extra
            )
            if warm is not None:
                warm.update(idx, metrics.pop("z_star"))
            m = scalars(metrics)
            if m["finite"] > 0.5:
                applied += 1
                for k in ("loss", "acc", "fwd_steps", "fwd_converged", "bwd_steps"):
                    sums[k] = sums.get(k, 0.0) + m[k]
                    window[k] = window.get(k, 0.0) + m[k]
                window["steps"] = window.get("steps", 0) + 1
                if reg_on:
                    sums["jac_reg"] = sums.get("jac_reg", 0.0) + m["jac_reg"]
                    sums["jac_reg_steps"] = sums.get("jac_reg_steps", 0) + 1
            else:
                skipped += 1
                log(f"epoch {epoch} step {s}: non-finite loss, gradient or update: skipped")
            if (s + 1) % curve_every == 0 or s + 1 == steps_per_epoch:
                # One point of the per-step training curve: the window's means.
                if window.get("steps"):
                    w = window.pop("steps")
                    point = {k: v / w for k, v in window.items()}
                    point["examples"] = ((epoch - 1) * steps_per_epoch + s + 1) * config.batch_size
                    curve.append(point)
                window = {}
            if bar is not None:
                d = max(applied, 1)
                bar.set_postfix(
                    loss=f"{sums.get('loss', math.nan) / d:.4f}",
                    acc=f"{sums.get('acc', math.nan) / d:.4f}",
                    fwd=f"{sums.get('fwd_steps', math.nan) / d:.1f}",
                    bwd=f"{sums.get('bwd_steps', math.nan) / d:.1f}",
                    refresh=False,
                )
                bar.update(1)
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        d = max(applied, 1)
        record = dict(
            epoch=epoch,
            train_loss=sums.get("loss", math.nan) / d,
            train_acc=sums.get("acc", math.nan) / d,
            fwd_steps=sums.get("fwd_steps", math.nan) / d,
            bwd_steps=sums.get("bwd_steps", math.nan) / d,
            fwd_converged=sums.get("fwd_converged", math.nan) / d,
            jac_reg=sums.get("jac_reg", math.nan) / max(sums.get("jac_reg_steps", 0), 1),
            jac_reg_steps=sums.get("jac_reg_steps", 0),
            skipped=skipped,
            examples=epoch * steps_per_epoch * config.batch_size,
            curve=curve,
        )
        if warm is not None:
            record["warm_start_rate"] = warm.take_hit_rate()
        record.update(
            evaluate(
                model,
                test_x,
                test_y,
                batch_size=config.eval_batch_size,
                mesh=mesh,
                eval_step=eval_step,
            )
        )
        record["train_time"] = train_time
        record["wall_time"] = time.perf_counter() - t0
        history.append(record)
        if is_main:
            log(
                f"epoch {epoch}: train loss {record['train_loss']:.4f} acc "
                f"{100 * record['train_acc']:.2f}% | test loss {record['test_loss']:.4f} acc "
                f"{100 * record['test_acc']:.2f}% | fwd {record['fwd_steps']:.1f} steps "
                f"({100 * record['fwd_converged']:.1f}% converged), bwd "
                f"{record['bwd_steps']:.1f} | jac_reg {record['jac_reg']:.3f} | "
                f"skipped {skipped} | {record['wall_time']:.0f} s"
                + "".join(
                    f" | {name} {record[key]:.3f}"
                    for key, name in (
                        ("test_spectral_radius", "spectral radius"),
                        ("warm_start_rate", "warm starts"),
                    )
                    if key in record
                )
            )
            if config.checkpoint_dir is not None:
                try:
                    if warm is not None:  # first: the checkpoint's JSON is the commit point
                        warm.save(config.checkpoint_dir, epoch)
                    save_checkpoint(
                        config.checkpoint_dir, epoch, model, opt_state, base_key, history, config
                    )
                except OSError as e:
                    raise WriteError(
                        f"{_fault(e, config.checkpoint_dir)}; the checkpoint of epoch {epoch} "
                        f"was not saved ({_last_checkpoint(config, saved_epoch)})"
                    ) from e
                saved_epoch = interrupts.saved_epoch = epoch
                if warm is not None:
                    try:
                        warm.prune(config.checkpoint_dir, epoch)
                    except OSError as e:
                        log(f"warning: {_fault(e, config.checkpoint_dir)}")
            if config.out_dir is not None:
                try:
                    write_metrics(config.out_dir, history, warn=log)
                except OSError as e:
                    raise WriteError(
                        f"{_fault(e, config.out_dir)} ({_last_checkpoint(config, saved_epoch)})"
                    ) from e
        interrupts.epoch, interrupts.steps_done = epoch, steps_per_epoch
        if interrupts.requested:
            raise interrupts.stop(config, steps_per_epoch)
    return Result(
        model=model,
        opt_state=opt_state,
        history=history,
        epoch=history[-1]["epoch"] if history else start_epoch - 1,
    )
