"""Warm starts of the training run (``--reuse-fixed-points``): a per-digit cache of
fixed points (`fixedpoint_deq.FixedPointCache`), read before each step and written
after it, saved next to each checkpoint so that a resumed run warm-starts exactly as an
uninterrupted one.

The cache file of epoch `e` is ``fixed-points-XXXX.npz`` (states and filled flags; the
checkpoint of epoch `e` names it by its epoch), written atomically *before* the
checkpoint of that epoch (whose JSON is the commit point), so a checkpoint never refers
to a missing cache. Once the checkpoint is written, `WarmStarts.prune` removes the cache
files it makes obsolete, and only those: the ones this run wrote for other epochs, and
the one of the checkpoint it replaced. Any other ``fixed-points-*.npz`` in the directory
is left alone. A resumed run without the file starts cold (and says so).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._reuse import FixedPointCache
from ._files import atomic_write


def _file(epoch: int) -> str:
    return f"fixed-points-{epoch:04d}.npz"


@functools.partial(jax.jit, donate_argnums=0)
def _update(cache: FixedPointCache, indices, z) -> FixedPointCache:
    return cache.update(indices, z)


@jax.jit
def _lookup(cache: FixedPointCache, indices):
    return cache.lookup(indices)


class WarmStarts:
    """The cache of a run over `size` training digits with DEQ states of shape
    ``(side, side, width)`` (float32; `side` is 28, or 14 with a stride-2 stem)."""

    def __init__(self, size: int, width: int, side: int = 28):
        self.like = jax.ShapeDtypeStruct((side, side, width), jnp.float32)
        self.cache = FixedPointCache(size, self.like)
        self.hits = 0
        self.lookups = 0
        # The cache files written by `save` and not yet removed by `prune`.
        self._written: set[Path] = set()

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """The warm starts of the digits `indices` (zeros where none is cached)."""
        z0, hit = _lookup(self.cache, jnp.asarray(indices))
        self.hits += int(np.sum(np.asarray(hit)))
        self.lookups += len(indices)
        return np.asarray(z0)

    def update(self, indices: np.ndarray, z_star) -> None:
        """Store the fixed points `z_star` of the digits `indices` (non-finite ones are
        not stored)."""
        self.cache = _update(self.cache, jnp.asarray(indices), jnp.asarray(np.asarray(z_star)))

    def take_hit_rate(self) -> float:
        """The fraction of warm-started lookups since the last call."""
        rate = self.hits / max(self.lookups, 1)
        self.hits = self.lookups = 0
        return rate

    def save(self, directory: str | os.PathLike, epoch: int) -> Path:
        """Write the cache of the end of `epoch` (atomically) into `directory`; returns
        the path of the file."""
        states = np.asarray(self.cache.states)
        filled = np.asarray(self.cache.filled)

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, states=states, filled=filled)

        path = Path(directory) / _file(epoch)
        atomic_write(path, write)
        self._written.add(path)
        return path

    def prune(
        self, directory: str | os.PathLike, epoch: int, replaced_epoch: int | None = None
    ) -> list[Path]:
        """Remove the cache files in `directory` that the checkpoint of `epoch` makes
        obsolete: those `save` wrote for other epochs, and the one of the checkpoint
        that the checkpoint of `epoch` replaced. Other files are left alone.

        **Arguments:**

        - `directory`: the checkpoint directory.
        - `epoch`: the epoch of the checkpoint just written (its cache file is kept).
        - `replaced_epoch`: the epoch of the checkpoint it replaced (None if none).

        Returns the removed paths. **Raises:** `OSError` if a file cannot be removed (the
        next call tries it again)."""
        directory = Path(directory)
        obsolete = {path for path in self._written if path.parent == directory}
        if replaced_epoch is not None:
            obsolete.add(directory / _file(replaced_epoch))
        obsolete.discard(directory / _file(epoch))
        removed = []
        for path in sorted(obsolete):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
            self._written.discard(path)
        return removed

    def load(self, directory: str | os.PathLike, epoch: int, log: Callable[[str], None]) -> None:
        """Read the cache saved with the checkpoint of `epoch`, if there is one.

        **Raises:** `ValueError` (naming `size`) if it holds another number of digits."""
        path = Path(directory) / _file(epoch)
        if not path.is_file():
            log(f"no fixed-point cache {path.name} in {directory}: warm starts begin cold")
            return
        with np.load(path) as saved:
            self.cache = FixedPointCache(
                self.cache.size, self.like, states=saved["states"], filled=saved["filled"]
            )
