r"""Fixed-point reuse (warm starts).

A DEQ solve started close to its fixed point needs fewer steps. Two common cases:

- **Sequential data** (frames of a video, steps of a time series, a slowly changing
  input): start each solve from the previous one's fixed point,
  `z, record = deq(x_t, z0=z_prev)`. The fixed point, and the gradient of any adjoint
  of `fixedpoint` (which is computed at the fixed point from the cell alone), do not
  depend on where the solve started; only the number of forward steps does.
- **The same training example one epoch later**: keep each example's last fixed point
  in a [`fixedpoint_deq.FixedPointCache`][] and start from it. The parameters have
  moved since, so the cached point is only close, but it is usually much closer than 0.

```python
cache = fd.FixedPointCache(len(train_x), like=jax.ShapeDtypeStruct((28, 28, 12), jnp.float32))
for idx in batches:                              # idx: the examples' dataset indices
    z0, _ = cache.lookup(idx)                    # zeros where nothing is cached yet
    z, record = jax.vmap(lambda x, z0: deq(x, z0=z0))(train_x[idx], z0)
    cache = cache.update(idx, z)                 # non-finite states are not stored
```

What it changes: the forward step count (the MNIST trainer reports it) and, for
approximate adjoints or unconverged solves, the returned point and so the gradient
(slightly). A solve that fails from a warm start still reports its failure (`record`);
a non-finite state is never cached, so one bad batch cannot poison later starts.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree

from fixedpoint.internal import as_int, check_int


class FixedPointCache(eqx.Module):
    """One stored state per example of a dataset, for warm starts (see
    "Warm starts" on the DEQ toolkit page).

    Functional: `update` returns a new cache (jit it with donated buffers, or call it
    outside `jit`; both work). Indices out of range are neither read (a cold start is
    returned) nor written: they never alias another example.

    `lookup` and `update` check at trace time (raising `ValueError` naming the
    argument): `indices` must be a 1-D integer array (one dataset index per sample);
    `z` must have the structure of the cached state and, for each leaf, exactly the
    shape `(len(indices),) + entry shape` (no broadcasting). Its dtypes must fit the
    cache's without losing a part of the value: a complex state is refused by a real
    cache (its imaginary part would be dropped), a floating state by an integer or
    boolean cache (it would be truncated), an integer state by a narrower integer or a
    boolean cache (it could wrap around). A lower precision of the same kind (a float32
    state in a `bfloat16` cache) is rounding, which is what the cache's `dtype` asks
    for, and is accepted; so are integer states in a floating cache and real states in
    a complex one.
    """

    states: PyTree[Array]
    filled: Bool[Array, " size"]

    def __init__(
        self,
        size: int,
        like: PyTree,
        *,
        dtype: jnp.dtype | None = None,
        states: PyTree[Array] | None = None,
        filled: Bool[ArrayLike, " size"] | None = None,
    ):
        """**Arguments:**

        - `size`: (>= 1) the number of examples of the dataset.
        - `like`: one example's state (arrays or `jax.ShapeDtypeStruct`s), e.g. the
            DEQ's `z0` for one sample.
        - `dtype`: store the states in this dtype (e.g. `jnp.bfloat16` to halve the
            memory); default: the state's.
        - `states`, `filled`: restore a cache saved earlier (`cache.states`,
            `cache.filled`); their leading axis must be `size`.

        **Raises:** `ValueError` naming `size` when restored arrays do not have `size`
        entries (e.g. a cache of another dataset or subset).
        """
        check_int("size", size, low=1)
        size = as_int(size)
        if states is None:
            self.states = jtu.tree_map(
                lambda s: jnp.zeros((size,) + tuple(s.shape), dtype or s.dtype), like
            )
            self.filled = jnp.zeros(size, bool)
        else:
            if jtu.tree_structure(states) != jtu.tree_structure(like):
                raise ValueError("`states` must have the structure of `like`.")
            for s, leaf in zip(jtu.tree_leaves(states), jtu.tree_leaves(like)):
                if tuple(s.shape) != (size,) + tuple(leaf.shape):
                    raise ValueError(
                        f"`size` ({size}) does not match the cached states: shape "
                        f"{tuple(s.shape)}, expected {(size,) + tuple(leaf.shape)} (a cache "
                        "of another dataset?)."
                    )
            filled = jnp.ones(size, bool) if filled is None else jnp.asarray(filled, bool)
            if filled.shape != (size,):
                raise ValueError(f"`size` ({size}) does not match `filled` (shape {filled.shape}).")
            self.states = jtu.tree_map(lambda s: jnp.asarray(s, dtype or s.dtype), states)
            self.filled = filled

    @property
    def size(self) -> int:
        """The number of examples."""
        return int(self.filled.shape[0])

    def _checked(self, indices) -> Array:
        """`indices` as an array, checked (1-D, integer), negative ones sent out of
        range (they would wrap around)."""
        indices = jnp.asarray(indices)
        if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(
                "`indices` must be a 1-D integer array (one dataset index per sample), got "
                f"{indices.dtype}{list(indices.shape)}."
            )
        return jnp.where(indices < 0, self.size, indices)

    def _checked_states(self, z: PyTree, batch: int) -> PyTree[Array]:
        """`z` with array leaves, checked against the cache's entries (structure, shape
        `(batch,) + entry shape`, a dtype that fits without loss)."""
        if jtu.tree_structure(z) != jtu.tree_structure(self.states):
            raise ValueError(
                "`z` must have the structure of the cached state: expected "
                f"{jtu.tree_structure(self.states)}, got {jtu.tree_structure(z)}."
            )
        z = jtu.tree_map(jnp.asarray, z)
        paths = jtu.tree_flatten_with_path(z)[0]
        for (path, v), s in zip(paths, jtu.tree_leaves(self.states)):
            where = f"`z{jtu.keystr(path)}`"
            expected = (batch,) + tuple(s.shape[1:])
            if tuple(v.shape) != expected:
                raise ValueError(
                    f"{where} must have shape {expected}, (len(indices),) + the cached "
                    f"entry's shape {tuple(s.shape[1:])}; got {tuple(v.shape)}."
                )
            loss = _loss(v.dtype, s.dtype)
            if loss is not None:
                raise ValueError(
                    f"{where} ({v.dtype}) cannot be stored in the cache's {s.dtype} entries: "
                    f"{loss}. Build the cache with a `dtype` that holds it."
                )
        return z

    def lookup(
        self, indices: Int[ArrayLike, " batch"]
    ) -> tuple[PyTree[Array], Bool[Array, " batch"]]:
        """`(z0, hit)` for the examples `indices`: their cached states in the cache's
        dtype (zeros where none is cached or the index is outside ``[0, size)``), and
        whether each was cached.

        **Arguments:**

        - `indices`: the examples' dataset indices, a 1-D integer array.
        """
        indices = self._checked(indices)
        hit = self.filled.at[indices].get(mode="fill", fill_value=False)

        def get(s):
            got = s.at[indices].get(mode="fill", fill_value=0)
            mask = hit.reshape(hit.shape + (1,) * (got.ndim - 1))
            return jnp.where(mask, got, jnp.zeros_like(got))

        return jtu.tree_map(get, self.states), hit

    def update(self, indices: Int[ArrayLike, " batch"], z: PyTree[Array]) -> FixedPointCache:
        """A cache holding `z` for the examples `indices`. A state with a non-finite
        value is not stored (its entry keeps its previous state).

        **Arguments:**

        - `indices`: the examples' dataset indices, a 1-D integer array.
        - `z`: their states, batched: the structure of the cached state, each leaf of
            shape `(len(indices),) + entry shape`, in a dtype the cache holds without
            loss (see [`fixedpoint_deq.FixedPointCache`][]).

        **Raises:** `ValueError` naming `indices` or `z` when they do not fit.
        """
        indices = self._checked(indices)
        z = self._checked_states(z, indices.shape[0])
        finite = jnp.ones(indices.shape, bool)
        for leaf in jtu.tree_leaves(z):
            finite = finite & jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))
        # Entries that are not stored are written out of range (dropped).
        target = jnp.where(finite, indices, self.size)
        states = jtu.tree_map(
            lambda s, v: s.at[target].set(v.astype(s.dtype), mode="drop"), self.states, z
        )
        filled = self.filled.at[target].set(True, mode="drop")
        return eqx.tree_at(lambda c: (c.states, c.filled), self, (states, filled))


def _loss(source, target) -> str | None:
    """What storing a value of dtype `source` in `target` would lose, or None if nothing
    but precision (rounding to a lower precision of the same kind is allowed; see
    `FixedPointCache`)."""
    source, target = jnp.dtype(source), jnp.dtype(target)
    if source == target or jnp.issubdtype(source, jnp.bool_):
        return None
    if jnp.issubdtype(target, jnp.bool_):
        return "a boolean cache keeps only whether each value is nonzero"
    if jnp.issubdtype(source, jnp.complexfloating):
        if jnp.issubdtype(target, jnp.complexfloating):
            return None
        return "a real cache drops the imaginary part"
    if jnp.issubdtype(source, jnp.floating):
        if jnp.issubdtype(target, jnp.inexact):
            return None
        return "an integer cache truncates the fractional part"
    if jnp.issubdtype(source, jnp.integer):
        if jnp.issubdtype(target, jnp.inexact):
            return None
        if jnp.issubdtype(target, jnp.integer) and np.can_cast(source, target, "safe"):
            return None
        return "a narrower or unsigned integer cache wraps values around"
    return "it is not a numeric dtype the cache converts"
