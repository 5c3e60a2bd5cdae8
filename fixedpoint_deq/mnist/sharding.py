"""Data parallelism: a 1-D device mesh with the axis ``"batch"``, sharded batches,
replicated model and optimiser state, and host copies of (replicated) results."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
    """A 1-D mesh over all (global) devices with the axis ``"batch"``."""
    return Mesh(np.array(jax.devices()), ("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first axis over the mesh."""
    return NamedSharding(mesh, P("batch"))


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding`, built from the host array `x` (every process
    holds all of `x` and contributes its own shards)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh: Mesh):
    """Every array of `tree` replicated over `mesh` (works on several hosts too)."""
    sharding = NamedSharding(mesh, P())
    return jtu.tree_map(
        lambda x: put(host(x), sharding) if eqx.is_array(x) and not _is_key(x) else x, tree
    )


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def host(x) -> np.ndarray:
    """A host copy of a (replicated or single-device) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def host_tree(tree):
    """`host` applied to every array of `tree`."""
    return jtu.tree_map(lambda x: host(x) if eqx.is_array(x) else x, tree)


def scalars(tree: dict) -> dict[str, float]:
    """A dict of (replicated) scalar arrays as Python floats."""
    return {k: float(host(v)) for k, v in tree.items()}
