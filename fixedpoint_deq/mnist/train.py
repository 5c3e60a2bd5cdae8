"""Training a deep-equilibrium classifier on MNIST: data-parallel, resumable, logged.

- `Config`: every setting (the command line maps onto it one to one).
- `train(config)`: the whole run; returns a `Result` (model, optimiser state, history).
- `load_model(directory)`: the trained model of a checkpoint, rebuilt from its config.
- `make_model`, `make_optimizer`, `make_train_step`, `make_eval_step`, `epoch_order`,
  `prepare_images`: the pieces, for tests and notebooks.

**Determinism and resuming.** Every random choice is a function of `(seed, epoch)` or
`(seed, epoch, step)`, never of an RNG stream consumed since the start: the order of the
training set in epoch `e` is ``np.random.default_rng([seed, e]).permutation(n)``, and the
key of step `s` of epoch `e` is ``fold_in(fold_in(key(seed), e), s)``. A checkpoint
written after every epoch holds the model, the optimiser state, the base key and the
epoch (plus the metrics history), so a run resumed after epoch `k` performs exactly the
steps an uninterrupted run performs from epoch `k + 1` on.

**Checkpoints** (in `checkpoint_dir`): ``ckpt-XXXX.eqx`` (the pytrees, via
`eqx.tree_serialise_leaves`) and ``checkpoint.json`` (epoch, file name, history,
config). Both are written to a temporary file and moved into place with `os.replace`;
the JSON is written last and is the commit point, so an interrupted write never leaves
a checkpoint that points to a missing or partial file.

**Data parallelism.** A 1-D `jax.sharding.Mesh` over `jax.devices()` with axis
``"batch"``; each batch is sharded along it, the model and optimiser state are
replicated, and the jitted step is partitioned by XLA. The batch size must be a multiple
of the number of devices. Multi-host: pass `distributed=True` (`--distributed`) to call
`jax.distributed.initialize()` first; every process then builds the same global batches
and feeds its own shards.

**Non-finite steps.** A step whose loss or gradient is not finite leaves the model and
the optimiser state unchanged; such steps are counted (``skipped`` in the metrics).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import optimistix as optx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fixedpoint as fp

from fixedpoint import backward_stats, without_backward_stats
from .model import DEQClassifier, HEADS, MNIST_MEAN, MNIST_STD

FORWARD_SOLVERS = ("anderson", "broyden", "neumann")
BACKWARD_MODES = ("implicit", "jfb", "phantom")
BACKWARD_SOLVERS = ("anderson", "broyden", "neumann")

CHECKPOINT_JSON = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"

# Settings that shape the model or the data stream: a resumed run must agree on them.
_RESUME_KEYS = ("width", "groups", "head", "seed", "batch_size", "train_subset", "augment_shift")


@dataclasses.dataclass
class Config:
    """Every setting of a training run (see ``fixedpoint-mnist --help``)."""

    data_dir: str | None = None
    epochs: int = 3
    batch_size: int = 64
    eval_batch_size: int = 500
    lr: float = 5e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    # Model.
    width: int = 12
    groups: int = 1
    head: str = "pool4"
    # Forward solver.
    solver: str = "anderson"
    anderson_m: int = 5
    beta: float = 1.0
    broyden_memory: int = 30
    max_steps: int = 30
    fwd_tol: float = 1e-2
    # Backward pass.
    backward: str = "phantom"
    backward_solver: str = "anderson"
    backward_max_steps: int = 20
    backward_tol: float = 1e-2
    phantom_steps: int = 5
    phantom_beta: float = 0.5
    # Regularisation and data.
    jac_reg: float = 0.5
    augment_shift: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0
    # Output.
    checkpoint_dir: str | None = None
    resume: bool = False
    out_dir: str | None = None
    distributed: bool = False

    def check(self) -> None:
        """Raise `ValueError` on a setting out of range."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}.")

        for name in (
            "epochs", "batch_size", "eval_batch_size", "lr", "width", "groups", "anderson_m",
            "broyden_memory", "max_steps", "backward_max_steps", "phantom_steps",
            "train_subset", "test_subset",
        ):
            positive(name)
        for name in ("warmup_steps", "weight_decay", "jac_reg", "augment_shift", "fwd_tol",
                     "backward_tol"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}.")
        if self.solver not in FORWARD_SOLVERS:
            raise ValueError(f"`solver` must be one of {FORWARD_SOLVERS}, got {self.solver!r}.")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"`backward` must be one of {BACKWARD_MODES}, got {self.backward!r}.")
        if self.backward_solver not in BACKWARD_SOLVERS:
            raise ValueError(
                f"`backward_solver` must be one of {BACKWARD_SOLVERS}, got {self.backward_solver!r}."
            )
        if self.head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS}, got {self.head!r}.")
        if not 0 < self.beta <= 1 or not 0 < self.phantom_beta <= 1:
            raise ValueError("`beta` and `phantom_beta` must lie in (0, 1].")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("`resume` needs a `checkpoint_dir`.")


# --------------------------------------------------------------------------- building


def make_solver(config: Config) -> optx.AbstractRootFinder:
    """The forward root finder. Its stopping rule is relative, in the RMS norm:
    ``rms(r / (tol + tol * |z|)) < 1``."""
    tol = dict(rtol=config.fwd_tol, atol=config.fwd_tol, norm=optx.rms_norm)
    if config.solver == "anderson":
        return fp.Anderson(m=config.anderson_m, beta=config.beta, **tol)
    if config.solver == "broyden":
        return fp.Broyden(memory=config.broyden_memory, beta=config.beta, **tol)
    return fp.Neumann(beta=config.beta, **tol)


def make_adjoint(config: Config) -> optx.AbstractAdjoint:
    """The backward pass. For `implicit`, the backward linear solve stops on a purely
    relative rule (the cotangent's scale depends on the batch size, so an absolute
    tolerance would be meaningless): ``rms(r / (1e-9 + tol * |w|)) < 1``."""
    if config.backward == "jfb":
        return fp.JacobianFreeAdjoint()
    if config.backward == "phantom":
        return fp.PhantomAdjoint(steps=config.phantom_steps, beta=config.phantom_beta)
    kwargs = dict(
        rtol=config.backward_tol, atol=1e-9, max_steps=config.backward_max_steps,
        norm=optx.rms_norm,
    )
    if config.backward_solver == "anderson":
        linear_solver = fp.linear.Anderson(m=config.anderson_m, **kwargs)
    elif config.backward_solver == "broyden":
        linear_solver = fp.linear.Broyden(memory=config.broyden_memory, **kwargs)
    else:
        linear_solver = fp.linear.Neumann(**kwargs)
    return fp.ImplicitAdjoint(linear_solver, throw=False)


def make_model(config: Config, key: jax.Array | None = None) -> DEQClassifier:
    """The classifier, initialised from `key` (default: derived from `config.seed`)."""
    if key is None:
        key = jax.random.fold_in(jax.random.key(config.seed), 10**6)
    return DEQClassifier(
        config.width,
        solver=make_solver(config),
        adjoint=make_adjoint(config),
        max_steps=config.max_steps,
        groups=config.groups,
        head=config.head,
        key=key,
    )


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


# --------------------------------------------------------------------------- data


def prepare_images(images: np.ndarray) -> np.ndarray:
    """``(N, 28, 28)`` images -> normalised float32 ``(N, 1, 28, 28)``.

    uint8 images are scaled from 0..255 to [0, 1] first; float images are taken to be in
    [0, 1] already (and pass through unchanged otherwise, NaN included)."""
    images = np.asarray(images)
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x = x / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD)[:, None].astype(np.float32)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` training samples in `epoch` (1-based): a function of
    `(seed, epoch)` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_key(base_key: jax.Array, epoch: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(base_key, epoch), step)


def _shift(image: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translate one ``(1, 28, 28)`` image by up to `max_shift` pixels (zero-filled,
    i.e. filled with the normalised background value)."""
    background = -MNIST_MEAN / MNIST_STD
    padded = jnp.pad(image, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)),
                     constant_values=background)
    offsets = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(padded, (0, offsets[0], offsets[1]), image.shape)


# --------------------------------------------------------------------------- steps


def _tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(config: Config, optimizer: optax.GradientTransformation) -> Callable:
    """``step(model, opt_state, images, labels, key) -> (model, opt_state, metrics)``,
    jitted. `metrics` holds batch means (``loss`` = cross-entropy, ``acc``,
    ``fwd_steps``, ``fwd_converged``, ``jac_reg``, ``bwd_steps``) and ``finite``
    (whether the update was applied)."""
    jac_weight = float(config.jac_reg)
    use_reg = jac_weight > 0
    max_shift = int(config.augment_shift)

    def loss_fn(model, images, labels, key):
        batch = images.shape[0]
        keys = jax.random.split(key, 2 * batch)
        if max_shift:
            images = jax.vmap(lambda im, k: _shift(im, k, max_shift))(images, keys[batch:])
        logits, record = jax.vmap(lambda im, k: model(im, key=k, jac_reg=use_reg))(
            images, keys[:batch]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        total = jnp.mean(ce) + jac_weight * jnp.mean(record.jac_reg)
        aux = dict(
            loss=jnp.mean(ce),
            acc=jnp.mean(jnp.argmax(logits, -1) == labels),
            fwd_steps=jnp.mean(record.num_steps),
            fwd_converged=jnp.mean(record.converged),
            jac_reg=jnp.mean(record.jac_reg),
        )
        return total, aux

    @eqx.filter_jit
    def step(model, opt_state, images, labels, key):
        (total, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, images, labels, key
        )
        stats = backward_stats(grads)
        grads = without_backward_stats(grads)
        finite = jnp.isfinite(total) & _tree_all_finite(grads)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_model = eqx.apply_updates(model, updates)
        select = lambda new, old: jtu.tree_map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b) if eqx.is_array(a) else a, new, old
        )
        model = select(new_model, model)
        opt_state = select(new_opt_state, opt_state)
        batch = images.shape[0]
        # Backward statistics are summed over the vmapped batch: take the mean.
        bwd_steps = stats.num_steps / batch
        aux["bwd_steps"] = jnp.asarray(bwd_steps, jnp.float32)
        aux["total"] = total
        aux["finite"] = finite
        return model, opt_state, aux

    return step


def make_eval_step(config: Config) -> Callable:
    """``evaluate(model, images, labels, mask) -> sums`` of ``loss``, ``correct``,
    ``fwd_steps``, ``fwd_converged`` and ``count`` over the unmasked samples."""
    del config

    @eqx.filter_jit
    def evaluate(model, images, labels, mask):
        logits, record = jax.vmap(lambda im: model(im))(images)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        w = mask.astype(jnp.float32)
        return dict(
            loss=jnp.sum(jnp.where(mask, ce, 0.0)),
            correct=jnp.sum(w * (jnp.argmax(logits, -1) == labels)),
            fwd_steps=jnp.sum(w * record.num_steps),
            fwd_converged=jnp.sum(w * record.converged),
            count=jnp.sum(w),
        )

    return evaluate


# --------------------------------------------------------------------------- sharding


def make_mesh() -> Mesh:
    """A 1-D mesh over all (global) devices with the axis ``"batch"``."""
    return Mesh(np.array(jax.devices()), ("batch",))


def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh: Mesh):
    """Every array of `tree` replicated over `mesh` (works on several hosts too)."""
    sharding = NamedSharding(mesh, P())
    return jtu.tree_map(
        lambda x: _put(_host(x), sharding) if eqx.is_array(x) and not _is_key(x) else x, tree
    )


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x) -> np.ndarray:
    """A host copy of a (replicated or single-device) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def _scalars(tree: dict) -> dict[str, float]:
    return {k: float(_host(v)) for k, v in tree.items()}


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text))


def _host_tree(tree):
    return jtu.tree_map(lambda x: _host(x) if eqx.is_array(x) else x, tree)


def save_checkpoint(directory: str | os.PathLike, epoch: int, model, opt_state, key, history,
                    config: Config) -> Path:
    """Write the checkpoint of the end of `epoch` atomically (see the module docstring)."""
    directory = Path(directory)
    name = f"ckpt-{epoch:04d}.eqx"
    trees = (model, opt_state, jax.random.key_data(key))
    _atomic_write(directory / name, lambda p: eqx.tree_serialise_leaves(p, _host_tree(trees)))
    meta = dict(epoch=epoch, file=name, history=history, config=dataclasses.asdict(config))
    _write_text(directory / CHECKPOINT_JSON, json.dumps(meta, indent=1))
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


def load_checkpoint(directory: str | os.PathLike, model_like, opt_state_like, key_like,
                    check: Callable[[dict], None] | None = None):
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
    saved = json.loads(meta_path.read_text())["config"]
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in saved.items() if k in fields})
    with jax.enable_x64(False):  # checkpoints hold float32 arrays, also under x64
        model = make_model(config)
        optimizer = make_optimizer(config, total_steps=1)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        loaded = load_checkpoint(directory, model, opt_state, jax.random.key(0))
    epoch, model = loaded[0], loaded[1]
    return model, config, epoch


def write_metrics(out_dir: str | os.PathLike, history: Sequence[dict]) -> None:
    """`metrics.jsonl` (one JSON object per epoch) and the plot `metrics.png`."""
    out_dir = Path(out_dir)
    _write_text(out_dir / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))
    if history:
        plot_metrics(history, out_dir / PLOT_FILE)


def plot_metrics(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Accuracy, loss and solver steps per epoch, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax.plot(epochs, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax.set(title="accuracy (%)", xlabel="epoch")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax.set(title="cross-entropy", xlabel="epoch", yscale="log")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [h["fwd_steps"] for h in history], "o-", label="forward (train)")
    ax.plot(epochs, [h["test_fwd_steps"] for h in history], "s-", label="forward (test)")
    ax.plot(epochs, [h["bwd_steps"] for h in history], "^-", label="backward")
    ax.set(title="mean solver steps per sample", xlabel="epoch")
    ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()

    def save(p):
        with open(p, "wb") as f:
            fig.savefig(f, format="png", dpi=100)

    _atomic_write(Path(path), save)
    plt.close(fig)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class Result:
    model: Any
    opt_state: Any
    history: list[dict]
    epoch: int


def evaluate(model, images: np.ndarray, labels: np.ndarray, *, batch_size: int, mesh: Mesh,
             eval_step: Callable) -> dict[str, float]:
    """Test loss, accuracy and forward statistics over all of `images` (padded batches)."""
    n = len(images)
    ndev = mesh.devices.size
    batch_size = max(ndev, (min(batch_size, n) + ndev - 1) // ndev * ndev)
    sharding = NamedSharding(mesh, P("batch"))
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
        out = _scalars(eval_step(model, _put(x, sharding), _put(y, sharding), _put(mask, sharding)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
    count = max(sums["count"], 1.0)
    return dict(
        test_loss=sums["loss"] / count,
        test_acc=sums["correct"] / count,
        test_fwd_steps=sums["fwd_steps"] / count,
        test_fwd_converged=sums["fwd_converged"] / count,
    )


# Settings that do not change the computation of a step (so runs differing only in
# them share the jitted steps and their compilations).
_NOT_IN_STEP = ("data_dir", "epochs", "train_subset", "test_subset", "checkpoint_dir",
                "resume", "out_dir", "distributed", "eval_batch_size")
_STEP_CACHE: dict = {}


def _compiled_steps(config: Config, total_steps: int):
    """``(train_step, eval_step, optimizer)``, shared by runs with the same settings."""
    fields = dataclasses.asdict(config)
    key = (total_steps,) + tuple(sorted((k, v) for k, v in fields.items() if k not in _NOT_IN_STEP))
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) > 8:
            _STEP_CACHE.clear()
        optimizer = make_optimizer(config, total_steps)
        _STEP_CACHE[key] = (make_train_step(config, optimizer), make_eval_step(config), optimizer)
    return _STEP_CACHE[key]


def _subset(images, labels, n: int | None):
    if n is None or n >= len(images):
        return images, labels
    return images[:n], labels[:n]


def load_data(config: Config):
    """``(train_x, train_y, test_x, test_y)``: normalised float32 images, int32 labels."""
    from .data import load_mnist

    data = load_mnist(config.data_dir)
    tx, ty = _subset(data.train_images, data.train_labels, config.train_subset)
    vx, vy = _subset(data.test_images, data.test_labels, config.test_subset)
    return prepare_images(tx), ty.astype(np.int32), prepare_images(vx), vy.astype(np.int32)


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
    """
    config.check()
    if config.distributed:
        jax.distributed.initialize()
    is_main = jax.process_index() == 0
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
    optimizer = _compiled_steps(config, total_steps)[2]
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    history: list[dict] = []
    start_epoch = 1
    if config.resume:
        def check(saved: dict) -> None:
            for k in _RESUME_KEYS:
                if saved.get(k) != getattr(config, k):
                    raise ValueError(
                        f"Cannot resume: the checkpoint was written with {k}={saved.get(k)!r}, "
                        f"this run has {k}={getattr(config, k)!r}."
                    )

        loaded = load_checkpoint(config.checkpoint_dir, model, opt_state, base_key, check)
        if loaded is None:
            log(f"no checkpoint in {config.checkpoint_dir}: starting from scratch")
        else:
            epoch, model, opt_state, base_key, history, saved = loaded
            start_epoch = epoch + 1
            log(f"resumed from {config.checkpoint_dir} after epoch {epoch}")

    model = replicate(model, mesh)
    opt_state = replicate(opt_state, mesh)
    train_step, eval_step, _ = _compiled_steps(config, total_steps)
    batch_sharding = NamedSharding(mesh, P("batch"))
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)

    if progress and is_main:
        from tqdm.auto import tqdm
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.perf_counter()
        order = epoch_order(config.seed, epoch, n)
        sums: dict[str, float] = {}
        applied = skipped = 0
        bar = None
        if progress and is_main:
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", leave=True)
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size]
            x = _put(train_x[idx], batch_sharding)
            y = _put(train_y[idx], batch_sharding)
            model, opt_state, metrics = train_step(
                model, opt_state, x, y, step_key(base_key, epoch, s)
            )
            m = _scalars(metrics)
            if m["finite"] > 0.5:
                applied += 1
                for k in ("loss", "acc", "fwd_steps", "fwd_converged", "jac_reg", "bwd_steps"):
                    sums[k] = sums.get(k, 0.0) + m[k]
            else:
                skipped += 1
                log(f"epoch {epoch} step {s}: non-finite loss or gradient, update skipped")
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
            jac_reg=sums.get("jac_reg", math.nan) / d,
            skipped=skipped,
        )
        record.update(
            evaluate(model, test_x, test_y, batch_size=config.eval_batch_size, mesh=mesh,
                     eval_step=eval_step)
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
            )
            if config.checkpoint_dir is not None:
                save_checkpoint(config.checkpoint_dir, epoch, model, opt_state, base_key,
                                history, config)
            if config.out_dir is not None:
                write_metrics(config.out_dir, history)
    return Result(model=model, opt_state=opt_state, history=history,
                  epoch=history[-1]["epoch"] if history else start_epoch - 1)
