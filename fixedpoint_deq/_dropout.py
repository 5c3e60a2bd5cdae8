r"""Variational dropout for DEQ cells: one mask per sample per solve.

Ordinary dropout draws a new mask at every evaluation of the cell: inside a fixed-point
solve the map would change at every iteration, so there is no fixed point, and the
backward pass (which evaluates the cell again at $z^*$) would see yet another map.
[`fixedpoint_deq.VariationalDropout`][] draws its mask from a key that a
[`fixedpoint_deq.DEQ`][] call sets once, before the solve: every iteration of the
forward solve and every product of the backward pass use the same mask, so the solve
finds the fixed point of one map, $z^* = f_m(z^*, x)$ with $f_m$ the cell under mask
$m$, and its gradient is that map's.

- Inverted scaling: kept units are multiplied by $1 / (1 - \text{rate})$, so the
  expected output equals the input and nothing changes at inference.
- Off at inference: `eqx.nn.inference_mode(model)` (or a DEQ called with
  `inference=True`) turns it into the identity.
- One key per sample under `vmap`: pass a batch of keys to the vmapped DEQ call; each
  sample gets its own mask (each dropout layer of a cell its own stream).
- Dense states: `shared_axes=()` (one Bernoulli draw per element). Channel dropout
  for 2-D spatial states: share the mask over the spatial axes, e.g.
  `shared_axes=(0, 1)` for channels-last ``(H, W, C)`` states, `(1, 2)` for
  channels-first ``(C, H, W)`` (torchdeq's `VariationalDropout2d`).

```python
class Cell(eqx.Module):
    lin: eqx.nn.Linear
    drop: fd.VariationalDropout
    def __call__(self, z, x):
        return self.drop(jnp.tanh(self.lin(z) + x))

deq = fd.DEQ(Cell(eqx.nn.Linear(8, 8, key=k), fd.VariationalDropout(0.1)))
z, record = jax.vmap(lambda x, k: deq(x, key=k))(xs, jax.random.split(key, len(xs)))
z_eval, _ = jax.vmap(eqx.nn.inference_mode(deq))(xs)          # no dropout, no key
```

**Differences from `eqx.nn.Dropout`:** that layer takes its key at every call and
draws a new mask each time; this one reads the key the DEQ stores in it (or a `key`
passed to the call), so that the mask is a fixed function of the key during a solve.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from fixedpoint.internal import check_bool, check_real


class VariationalDropout(eqx.Module):
    """Dropout whose mask is fixed by a key for a whole fixed-point solve (see the
    "Variational dropout" on the DEQ toolkit page)."""

    rate: float = eqx.field(static=True)
    shared_axes: tuple[int, ...] = eqx.field(static=True)
    inference: bool
    key: PRNGKeyArray | None

    def __init__(
        self,
        rate: float = 0.1,
        *,
        shared_axes: tuple[int, ...] = (),
        inference: bool = False,
        key: PRNGKeyArray | None = None,
    ):
        """**Arguments:**

        - `rate`: the probability of dropping a unit, in [0, 1).
        - `shared_axes`: axes of the input along which the mask is shared (one draw
            for the whole axis), e.g. `(0, 1)` for channel dropout of ``(H, W, C)``.
        - `inference`: identity when True (toggled by `eqx.nn.inference_mode`).
        - `key`: the mask's key; normally left `None` and set by the DEQ at each call.
        """
        check_real("rate", rate, low=0.0, high=1.0, high_open=True)
        check_bool("inference", inference)
        axes = tuple(shared_axes)
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            raise ValueError(f"`shared_axes` must be a tuple of integers, got {shared_axes!r}.")
        self.rate = float(rate)
        self.shared_axes = axes
        self.inference = inference
        self.key = key

    def mask(self, shape: tuple[int, ...], dtype: Any, key: PRNGKeyArray) -> Array:
        """The scaled mask (0 or 1 / (1 - rate)) for an input of `shape`, broadcastable
        to it (size 1 along `shared_axes`)."""
        ndim = len(shape)
        axes = set()
        for a in self.shared_axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"`shared_axes` {self.shared_axes} out of range for an input of shape {shape}."
                )
            axes.add(a % ndim)
        mask_shape = tuple(1 if i in axes else n for i, n in enumerate(shape))
        keep = jax.random.bernoulli(key, 1.0 - self.rate, mask_shape)
        return jnp.where(keep, jnp.asarray(1.0 / (1.0 - self.rate), dtype), jnp.zeros((), dtype))

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """`x` times the mask (or `x` itself at inference or with rate 0).

        **Raises:** `ValueError` when active and no key is set: call the cell through a
        [`fixedpoint_deq.DEQ`][] with `key=`, or pass `key` here.
        """
        if self.inference or self.rate == 0.0:
            return x
        key = self.key if key is None else key
        if key is None:
            raise ValueError(
                "VariationalDropout needs a key: call the DEQ holding it with `key=...` "
                "(one per sample under vmap), or pass `key=` here; for evaluation use "
                "`eqx.nn.inference_mode(model)`."
            )
        return x * self.mask(x.shape, x.dtype, key)


def _is_dropout(node: Any) -> bool:
    return isinstance(node, VariationalDropout)


def has_active_dropout(tree: PyTree) -> bool:
    """Whether `tree` holds a `VariationalDropout` that is not in inference mode and has
    a nonzero rate."""
    return any(
        _is_dropout(node) and not node.inference and node.rate > 0
        for node in jtu.tree_leaves(tree, is_leaf=_is_dropout)
    )


def prepare_dropout(tree: PyTree, key: PRNGKeyArray | None, inference: bool) -> PyTree:
    """What a DEQ call solves with: with `inference`, every dropout layer switched off;
    otherwise each active one given its own key derived from `key` (one mask per layer
    for the whole solve). Raises `ValueError` when a key is needed and missing."""
    leaves = jtu.tree_leaves(tree, is_leaf=_is_dropout)
    if not any(_is_dropout(node) for node in leaves):
        return tree
    if inference:
        return jtu.tree_map(
            lambda node: (
                eqx.tree_at(lambda d: d.inference, node, True) if _is_dropout(node) else node
            ),
            tree,
            is_leaf=_is_dropout,
        )
    if not has_active_dropout(tree):
        return tree
    if key is None:
        raise ValueError(
            "The cell holds a VariationalDropout: the DEQ call needs a `key` (one per "
            "sample under vmap); for evaluation use `eqx.nn.inference_mode(model)` or "
            "`inference=True`."
        )
    counter = iter(range(len(leaves)))

    def give_key(node):
        if not _is_dropout(node):
            return node
        k = jax.random.fold_in(key, next(counter))
        return eqx.tree_at(lambda d: d.key, node, k, is_leaf=lambda x: x is None)

    return jtu.tree_map(give_key, tree, is_leaf=_is_dropout)
