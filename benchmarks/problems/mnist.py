"""The MNIST problem: the convolutional DEQ cell of `fixedpoint_deq.mnist` on test
digits, at its initialisation or at trained weights (from a checkpoint)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from fixedpoint_deq.mnist.data import ENV_MNIST_DIR

from .base import cat, named, Problem, Unavailable


#: Where the trained MNIST DEQ is looked for: ``$FIXEDPOINT_MNIST_CHECKPOINT``, else the
#: first of `DEFAULT_MNIST_CHECKPOINTS` (relative to the repository root) that holds a
#: checkpoint: the default full run's (``runs/mnist-full/ckpt``, see the README's MNIST
#: section), else the README's main command's quick run. The digits:
#: ``$FIXEDPOINT_MNIST_DIR`` (see `mnist_deq_cell`).
ENV_MNIST_CHECKPOINT = "FIXEDPOINT_MNIST_CHECKPOINT"
DEFAULT_MNIST_CHECKPOINTS = ("runs/mnist-full/ckpt", "runs/mnist/ckpt")
DEFAULT_MNIST_CHECKPOINT = DEFAULT_MNIST_CHECKPOINTS[-1]

#: Environment variables that say where this problem's inputs are.
INPUT_VARIABLES = (ENV_MNIST_CHECKPOINT, ENV_MNIST_DIR)


# ----------------------------------------------------------------------------------
# The MNIST DEQ cell of fixedpoint_deq.


_ROOT = Path(__file__).resolve().parents[2]  # the repository

_GELU_C = math.sqrt(2.0 / math.pi)


def _mnist_cell_fn(z, p, xp):
    # f(z) = GroupNorm(GELU(conv3x3(z) + bias)) + x_inj on channels-last H x H x C states
    # (H = 28, or 14 behind a stride-2 stem), flattened to n = H^2 C; written with ops
    # NumPy, JAX and torch share.
    c = p["bias"].shape[-1]
    hw = p["x"].shape[-1] // c
    h = int(round(math.sqrt(hw)))
    lead = tuple(z.shape[:-1])
    u = z.reshape(lead + (h, h, c))
    zero_row = u[..., :1, :, :] * 0
    u = cat(xp, [zero_row, u, zero_row], -3)
    zero_col = u[..., :, :1, :] * 0
    u = cat(xp, [zero_col, u, zero_col], -2)  # zero padding: (..., H + 2, H + 2, C)
    patches = cat(xp, [u[..., i : i + h, j : j + h, :] for i in range(3) for j in range(3)], -1)
    y = patches.reshape(lead + (hw, 9 * c)) @ p["K"] + p["bias"]
    y = 0.5 * y * (1.0 + xp.tanh(_GELU_C * (y + 0.044715 * y**3)))  # GELU (tanh form)
    mean = (y.sum(-2) @ p["G"]) / hw  # GroupNorm: per group over space and channels
    d = y - mean[..., None, :]
    var = ((d * d).sum(-2) @ p["G"]) / hw
    out = d / ((var + p["eps"]) ** 0.5)[..., None, :] * p["gn_w"] + p["gn_b"]
    return out.reshape(lead + (hw * c,)) + p["x"]


def mnist_data_dir() -> str | None:
    """Where the digits are: ``$FIXEDPOINT_MNIST_DIR``, else ``../shared/data/mnist``
    beside the repository, else None (the download cache)."""
    if os.environ.get(ENV_MNIST_DIR):
        return os.environ[ENV_MNIST_DIR]
    shared = _ROOT.parent / "shared" / "data" / "mnist"
    return str(shared) if shared.is_dir() else None


def _mnist_checkpoint(checkpoint):
    if checkpoint is not None:
        return Path(checkpoint)
    if os.environ.get(ENV_MNIST_CHECKPOINT):
        path = Path(os.environ[ENV_MNIST_CHECKPOINT])
        return path if path.is_absolute() else _ROOT / path
    candidates = [_ROOT / p for p in DEFAULT_MNIST_CHECKPOINTS]
    return next((p for p in candidates if (p / "checkpoint.json").is_file()), candidates[-1])


def _mnist_name(weights, batch=8, width=12, seed=0, checkpoint=None):
    extra = f"-seed{seed}" if seed else ""
    return f"mnist-deq-{weights}-B{batch}" + (f"-w{width}" if weights == "random" else "") + extra


@named(_mnist_name)
def mnist_deq_cell(
    weights: str, batch: int = 8, width: int = 12, seed: int = 0, checkpoint: str | None = None
) -> Problem:
    r"""The convolutional DEQ cell of `fixedpoint_deq.mnist` on a batch of test digits:

    $$z = f(z) = \mathrm{GroupNorm}\big(\mathrm{GELU}(K * z + c)\big) + x_{\mathrm{inj}},
    \qquad z_0 = 0,$$

    with $z$ a channels-last $H \times H \times C$ state ($n = H^2 C$ unknowns per
    digit; $H = 14$ behind the default stride-2 stem, 28 without it), $K * z$ the $3 \times 3$ zero-padded
    convolution, GELU in its tanh form and GroupNorm with its affine weights, exactly
    `fixedpoint_deq.mnist.model.ConvCell` (a test checks it against the model); the
    injection $x_{\mathrm{inj}}$ is the model's stem applied to the first `batch` MNIST
    test digits. One state per digit, solved per state (as the DEQ layer does).

    - ``weights="random"``: the model at its initialisation (`seed`, `width`).
    - ``weights="trained"``: the model of the checkpoint in `checkpoint`, else
      ``$FIXEDPOINT_MNIST_CHECKPOINT``, else ``runs/mnist-full/ckpt`` (the default full
      run's, see the README), else ``runs/mnist/ckpt`` (which the README's main command
      writes). Training shapes the cell's Jacobian (the Jacobian
      regulariser pushes it towards a contraction, the loss away from one), so the
      two differ in difficulty.

    Source: `fixedpoint_deq.mnist` (a single-scale version of the convolutional DEQ of Bai,
    Kolter & Koltun 2019 and the DEQ examples this project started from); the digits
    are MNIST's (LeCun et al. 1998), read from ``$FIXEDPOINT_MNIST_DIR``, else
    ``../shared/data/mnist``, else the download cache (never downloaded here).

    Solution: no closed form and no uniqueness guarantee (GroupNorm is not a
    contraction in general); the reference is Newton-Krylov from $z_0 = 0$
    (`newton_reference`), and all solvers start from $z_0 = 0$.

    Raises:
        Unavailable: the digits or the trained checkpoint are not on this machine.
    """
    if weights not in ("random", "trained"):
        raise ValueError(f"weights must be 'random' or 'trained', got {weights!r}")
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from fixedpoint_deq.mnist.build import make_model
    from fixedpoint_deq.mnist.checkpoint import CHECKPOINT_JSON, load_model
    from fixedpoint_deq.mnist.config import Config
    from fixedpoint_deq.mnist.data import load_mnist, MNISTDataError
    from fixedpoint_deq.mnist.inputs import prepare_images

    if weights == "random":
        config = Config(width=width, seed=seed)
        with jax.enable_x64(False):  # the float32 initialisation training starts from
            model = make_model(config)
        where = f"initialisation (seed {seed})"
    else:
        path = _mnist_checkpoint(checkpoint)
        try:
            model, config, epoch = load_model(path)
        except FileNotFoundError as e:
            raise Unavailable(
                f"{e}; or set ${ENV_MNIST_CHECKPOINT} to a checkpoint directory"
            ) from None
        accuracy = ""
        history = json.loads((path / CHECKPOINT_JSON).read_text())["history"]
        if history:
            accuracy = f", test accuracy {100 * history[-1]['test_acc']:.2f}%"
        where = f"checkpoint {path} (epoch {epoch}{accuracy})"
    try:
        data = load_mnist(mnist_data_dir(), download=False, verify=False)
    except MNISTDataError as e:
        raise Unavailable(f"MNIST digits not found: {e}") from None
    images = prepare_images(data.test_images[:batch])
    with jax.enable_x64(True):
        model64 = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, model
        )
        x_inj = jax.vmap(model64.inject)(jnp.asarray(images, jnp.float64))
        x_inj = np.asarray(x_inj).reshape(batch, -1)
    cell = model.deq.cell
    c = cell.conv.weight.shape[0]
    n = x_inj.shape[-1]
    groups = cell.norm.groups
    kernel = np.transpose(np.asarray(cell.conv.weight, np.float64), (2, 3, 1, 0))  # (3, 3, I, O)
    group_of = np.arange(c) // (c // groups)
    params = {
        "K": kernel.reshape(9 * c, c),
        "bias": np.asarray(cell.conv.bias, np.float64).reshape(c),
        "G": (group_of[:, None] == group_of[None, :]) / float(c // groups),
        "eps": np.asarray(float(cell.norm.eps)),
        "gn_w": np.asarray(cell.norm.weight, np.float64),
        "gn_b": np.asarray(cell.norm.bias, np.float64),
        "x": x_inj,
    }
    return Problem(
        name=_mnist_name(weights, batch, width, seed),
        family=f"mnist-deq-{weights}",
        kind="fixed_point",
        fn=_mnist_cell_fn,
        params=params,
        z0=np.zeros((batch, n)),
        batch_axes={k: (0 if k == "x" else None) for k in params},
        description=(
            f"MNIST DEQ cell z = GroupNorm(GELU(conv3x3(z))) + x_inj, C={c} (n={n} per digit), "
            f"{batch} test digits, weights from the {where}"
        ),
        source="fixedpoint_deq.mnist (conv DEQ cell, Bai et al. 2019); MNIST test digits",
        solution="no closed form; reference by Newton-Krylov from z0 = 0",
    )
