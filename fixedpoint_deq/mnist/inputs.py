"""What the training loop feeds the model: normalised images, the deterministic order of
each epoch, the key of each step, and the optional shift augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .model import MNIST_MEAN, MNIST_STD


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
    """The key of step `step` of `epoch`: a function of `(base_key, epoch, step)` only."""
    return jax.random.fold_in(jax.random.fold_in(base_key, epoch), step)


def shift_image(image: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translate one ``(1, 28, 28)`` image by up to `max_shift` pixels (zero-filled,
    i.e. filled with the normalised background value)."""
    background = -MNIST_MEAN / MNIST_STD
    padded = jnp.pad(
        image, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)), constant_values=background
    )
    offsets = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(padded, (0, offsets[0], offsets[1]), image.shape)


def _subset(images, labels, n: int | None):
    if n is None or n >= len(images):
        return images, labels
    return images[:n], labels[:n]


def load_data(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: normalised float32 images, int32 labels."""
    from .data import load_mnist

    data = load_mnist(config.data_dir)
    tx, ty = _subset(data.train_images, data.train_labels, config.train_subset)
    vx, vy = _subset(data.test_images, data.test_labels, config.test_subset)
    return prepare_images(tx), ty.astype(np.int32), prepare_images(vx), vy.astype(np.int32)
