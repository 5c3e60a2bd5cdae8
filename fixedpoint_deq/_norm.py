r"""Weight and spectral normalisation of the layers of a DEQ cell.

[`fixedpoint_deq.normalise`][] wraps every matching `Linear` / `Conv` layer of an
equinox PyTree (a cell, or a whole model) in a [`fixedpoint_deq.NormalisedLayer`][]
whose *effective* weight is

- weight normalisation (Salimans and Kingma 2016): row by row (output channel by output
  channel, over every other axis), $W_i = c_i\, V_i / \|V_i\|$ with a learned scale
  $c_i = g_i$ (`learn_scale=True`, $g$ initialised to $\|V_i\|$, so the layer starts
  unchanged) or a fixed one $c_i$ = `target`;
- spectral normalisation (Miyato et al. 2018): $W = c\, V / \hat\sigma(V)$ with
  $c$ = `target` and $\hat\sigma(V) = u^\top \bar V v$ the power-iteration estimate of
  the largest singular value of the matrix view $\bar V$ (shape
  ``(out, everything else)``) of the weight.

With `clip=True` the factor is $\min(1, \cdot)$: a weight is only ever scaled *down*
to the target (spectral: $\|W\|_2 = \min(\hat\sigma, \text{target})$), never
enlarged, as torchdeq's `norm_clip`.

**The power iteration and the DEQ.** The vectors $u, v$ are arrays of the model (so
they survive `jit`, checkpoints and resuming like any parameter). A
[`fixedpoint_deq.DEQ`][] call first runs `power_iterations` steps of the power
iteration from the stored vectors on the (gradient-stopped) weight, then folds the
normalisation into plain weights and solves with that cell: the fixed-point map is one
fixed function during the whole solve and its backward pass, and the normalisation
costs nothing per iteration. The stored vectors are a warm start; advance them with
[`fixedpoint_deq.update_normalisation`][] once per training step (torchdeq's
`reset_norm`; the MNIST trainer does this), or the estimate of every call starts from the
vectors set at construction. In inference mode (`eqx.nn.inference_mode`) no power
iteration runs: the stored vectors are used as they are.

**Differences from equinox.** `eqx.nn.WeightNorm` / `eqx.nn.SpectralNorm` are
wrappers that only expose `__call__`, and `SpectralNorm` advances its power iteration in
`eqx.nn.State` at *every* call, i.e. at every iteration of a fixed-point solve (the map
would change during the solve). Here the wrapper also exposes the effective `weight`
(and forwards every other attribute, e.g. `bias`, to the layer), so a cell that reads
`self.conv.weight` directly works unchanged; the power iteration runs once per DEQ
call; the vectors are normalised again where they are used (so weight decay or any
optimiser update of them cannot change $\hat\sigma$); and there are torchdeq's
options `target`, `clip` and the fixed-scale weight normalisation. For a convolution the
normalised quantity is, as in equinox, torch and torchdeq, the spectral norm of the
kernel's matrix view, not the operator norm of the convolution (which is at most
$\sqrt{k_h k_w}$ times larger).

```python
cell = fd.normalise(cell, "spectral", target=1.0, clip=True, key=key)
deq = fd.DEQ(cell)
...                                    # each training step:
model = fd.update_normalisation(model) # advance the stored power iteration
plain = fd.fold_normalisation(model)   # inference: plain layers, fixed weights
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from fixedpoint.internal import as_int, check_bool, check_choice, check_int, check_real


KINDS = ("weight", "spectral")

#: Power-iteration steps run at construction (as `eqx.nn.SpectralNorm`).
_INIT_ITERATIONS = 15


def is_linear_or_conv(node: Any) -> bool:
    """The default filter of [`fixedpoint_deq.normalise`][]: `eqx.nn.Linear` and every
    `eqx.nn.Conv` (`Conv1d`, `Conv2d`, `Conv3d`)."""
    return isinstance(node, (eqx.nn.Linear, eqx.nn.Conv))


def _unit(x: Array, eps: float) -> Array:
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x**2)), eps)


def _power_step(matrix: Array, u: Array, v: Array, eps: float) -> tuple[Array, Array]:
    v = _unit(matrix.T @ u, eps)
    u = _unit(matrix @ v, eps)
    return u, v


def _row_norms(weight: Array) -> Array:
    return jnp.sqrt(jnp.sum(weight.reshape(weight.shape[0], -1) ** 2, axis=1))


class NormalisedLayer(eqx.Module):
    """A `Linear` / `Conv` layer whose weight is weight- or spectrally normalised (see
    "Normalisation" on the DEQ toolkit page, or [`fixedpoint_deq.normalise`][], which
    builds these).

    `layer` holds the raw weight $V$. `weight` is the effective weight; every other
    attribute (`bias`, `in_features`, ...) is the layer's. Calling the wrapper calls the
    layer with the effective weight (using the stored power-iteration vectors, without
    advancing them).
    """

    layer: Any
    u: Float[Array, " out"] | None
    v: Float[Array, " fan_in"] | None
    scale: Float[Array, " out"] | None
    kind: str = eqx.field(static=True)
    target: float = eqx.field(static=True)
    clip: bool = eqx.field(static=True)
    power_iterations: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        layer: Any,
        kind: str = "spectral",
        *,
        target: float = 1.0,
        clip: bool = False,
        learn_scale: bool | None = None,
        power_iterations: int = 1,
        eps: float = 1e-12,
        inference: bool = False,
        key: PRNGKeyArray | None = None,
    ):
        """**Arguments:**

        - `layer`: the layer; it must have a `weight` array of at least two dimensions
            whose first axis is the output (as `eqx.nn.Linear` and `eqx.nn.Conv`).
        - `kind`: `"spectral"` or `"weight"`.
        - `target`: (> 0) the target norm: the spectral norm (`"spectral"`), or every
            row norm when the scale is fixed (`"weight"`, `learn_scale=False`).
        - `clip`: only ever scale the weight down to the target (never up).
        - `learn_scale`: `"weight"` only: learn the row scales $g$ (default, as
            `eqx.nn.WeightNorm`) or fix them to `target`.
        - `power_iterations`: (>= 1) power-iteration steps per DEQ call
            (`"spectral"`).
        - `eps`: (> 0) guards the divisions by norms.
        - `inference`: no power iteration in DEQ calls (toggled by
            `eqx.nn.inference_mode`).
        - `key`: a PRNG key for the initial power-iteration vectors (`"spectral"`).
        """
        check_choice("kind", kind, KINDS)
        check_real("target", target, low=0.0, low_open=True)
        check_bool("clip", clip)
        check_int("power_iterations", power_iterations, low=1)
        check_real("eps", eps, low=0.0, low_open=True)
        check_bool("inference", inference)
        weight = getattr(layer, "weight", None)
        if not eqx.is_inexact_array(weight) or weight.ndim < 2:  # pyright: ignore
            raise ValueError(
                f"`layer` must have a floating `weight` array of at least two dimensions "
                f"(a Linear or Conv layer); got a {type(layer).__name__}."
            )
        if learn_scale is None:
            learn_scale = kind == "weight"
        check_bool("learn_scale", learn_scale)
        if kind == "spectral" and learn_scale:
            raise ValueError(
                "`learn_scale` applies to kind='weight' only: a learned scale would undo "
                "the spectral bound `target`."
            )
        self.layer = layer
        self.kind = kind
        self.target = float(target)
        self.clip = bool(clip)
        self.power_iterations = as_int(power_iterations)
        self.eps = float(eps)
        self.inference = inference
        self.scale = _row_norms(weight) if learn_scale else None  # pyright: ignore
        if kind == "spectral":
            if key is None:
                raise ValueError(
                    "`key` is needed for spectral normalisation (the initial "
                    "power-iteration vectors)."
                )
            matrix = jax.lax.stop_gradient(weight.reshape(weight.shape[0], -1))  # pyright: ignore
            ku, kv = jax.random.split(key)
            u = _unit(jax.random.normal(ku, matrix.shape[:1], matrix.dtype), self.eps)
            v = _unit(jax.random.normal(kv, matrix.shape[1:], matrix.dtype), self.eps)
            for _ in range(_INIT_ITERATIONS):
                u, v = _power_step(matrix, u, v, self.eps)
            self.u, self.v = u, v
        else:
            self.u = self.v = None

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields, properties or methods: forward
        # them to the wrapped layer (e.g. `bias`), so that cells reading the layer's
        # attributes work unchanged.
        if name.startswith("__") or name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def sigma(self) -> Float[Array, ""]:
        """The power-iteration estimate $u^\\top \\bar V v$ of the largest singular value
        of the raw weight (from the stored vectors; `"spectral"` only). It is at most
        the true value and approaches it as the iteration converges."""
        if self.u is None or self.v is None:
            raise ValueError("`sigma` is defined for kind='spectral' only.")
        raw = self.layer.weight
        matrix = raw.reshape(raw.shape[0], -1)
        u = jax.lax.stop_gradient(_unit(self.u, self.eps))
        v = jax.lax.stop_gradient(_unit(self.v, self.eps))
        return u @ matrix @ v

    @property
    def weight(self) -> Array:
        """The effective (normalised) weight, differentiable with respect to the raw
        weight and the scales (the power-iteration vectors are constants)."""
        raw = self.layer.weight
        if self.kind == "spectral":
            factor = self.target / jnp.maximum(self.sigma(), self.eps)
        else:
            scale = self.target if self.scale is None else self.scale
            factor = scale / jnp.maximum(_row_norms(raw), self.eps)
            factor = factor.reshape((-1,) + (1,) * (raw.ndim - 1))
        if self.clip:
            factor = jnp.minimum(factor, 1)
        return (raw * factor).astype(raw.dtype)

    def power_iterate(self) -> NormalisedLayer:
        """This layer with its vectors advanced by `power_iterations` steps on the
        current (gradient-stopped) raw weight; unchanged for `"weight"`."""
        if self.u is None or self.v is None:
            return self
        raw = jax.lax.stop_gradient(self.layer.weight)
        matrix = raw.reshape(raw.shape[0], -1)
        u = jax.lax.stop_gradient(self.u)
        v = jax.lax.stop_gradient(self.v)
        for _ in range(self.power_iterations):
            u, v = _power_step(matrix, u, v, self.eps)
        return eqx.tree_at(lambda s: (s.u, s.v), self, (u, v))

    def folded(self) -> Any:
        """The wrapped layer holding the effective weight (a plain layer)."""
        return eqx.tree_at(lambda layer: layer.weight, self.layer, self.weight)

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """The layer applied to `x` with the effective weight."""
        return self.folded()(x, key=key)


def _is_normalised(node: Any) -> bool:
    return isinstance(node, NormalisedLayer)


def normalise(
    tree: PyTree,
    kind: str = "spectral",
    *,
    key: PRNGKeyArray | None = None,
    filter: Callable[[Any], bool] = is_linear_or_conv,
    target: float = 1.0,
    clip: bool = False,
    learn_scale: bool | None = None,
    power_iterations: int = 1,
    eps: float = 1e-12,
) -> PyTree:
    r"""Weight- or spectrally normalise every layer of `tree` that `filter` selects.

    Each selected layer is replaced by a [`fixedpoint_deq.NormalisedLayer`][] (see there
    and "Normalisation" on the DEQ toolkit page for the formulas). Layers already normalised are left
    as they are.

    ```python
    class Cell(eqx.Module):
        lin: eqx.nn.Linear
        def __call__(self, z, x):
            return jnp.tanh(self.lin(z) + x)

    cell = fd.normalise(Cell(eqx.nn.Linear(8, 8, key=k1)), "spectral", target=0.9, key=k2)
    z, record = fd.DEQ(cell)(x)              # ||W||_2 = 0.9 during the solve
    ```

    **Arguments:**

    - `tree`: any PyTree holding layers (a cell, a model).
    - `kind`: `"spectral"` (default) or `"weight"`.
    - `key`: a PRNG key (needed for `"spectral"`: the initial power-iteration vectors).
    - `filter`: `node -> bool`, which layers to normalise; default
        `eqx.nn.Linear` and `eqx.nn.Conv` layers. To pick one layer:
        `filter=lambda node: node is cell.conv`.
    - `target`, `clip`, `learn_scale`, `power_iterations`, `eps`: as for
        [`fixedpoint_deq.NormalisedLayer`][].

    **Raises:** `ValueError` naming `filter` when it selects no layer of `tree`, or
    naming the invalid argument.
    """
    check_choice("kind", kind, KINDS)
    if not callable(filter):
        raise ValueError(f"`filter` must be a callable node -> bool, got {filter!r}.")

    def is_leaf(node):
        return _is_normalised(node) or bool(filter(node))

    leaves, treedef = jtu.tree_flatten(tree, is_leaf=is_leaf)
    chosen = [i for i, node in enumerate(leaves) if not _is_normalised(node) and is_leaf(node)]
    if not chosen:
        raise ValueError(
            f"`filter` selects no layer of the {type(tree).__name__} to normalise "
            "(the default selects eqx.nn.Linear and eqx.nn.Conv layers)."
        )
    if kind == "spectral" and key is None:
        raise ValueError("`key` is needed for spectral normalisation.")
    keys = list(jax.random.split(key, len(chosen))) if key is not None else [None] * len(chosen)
    for i, k in zip(chosen, keys):
        leaves[i] = NormalisedLayer(
            leaves[i],
            kind,
            target=target,
            clip=clip,
            learn_scale=learn_scale,
            power_iterations=power_iterations,
            eps=eps,
            key=k,
        )
    return jtu.tree_unflatten(treedef, leaves)


def _map_normalised(fn: Callable[[NormalisedLayer], Any], tree: PyTree) -> PyTree:
    return jtu.tree_map(
        lambda node: fn(node) if _is_normalised(node) else node, tree, is_leaf=_is_normalised
    )


def has_normalisation(tree: PyTree) -> bool:
    """Whether `tree` holds a [`fixedpoint_deq.NormalisedLayer`][]."""
    return any(_is_normalised(node) for node in jtu.tree_leaves(tree, is_leaf=_is_normalised))


def update_normalisation(tree: PyTree) -> PyTree:
    """`tree` with the power iteration of every spectrally normalised layer advanced by
    its `power_iterations` steps on the current weights (torchdeq's `reset_norm`).

    Call it once per training step (inside the jitted step is fine) and keep the
    returned tree: the vectors are then a warm start that follows the weights. Their
    gradient is always zero.
    """
    return _map_normalised(lambda layer: layer.power_iterate(), tree)


def fold_normalisation(tree: PyTree) -> PyTree:
    """`tree` with every [`fixedpoint_deq.NormalisedLayer`][] replaced by its plain layer
    holding the effective weight (torchdeq's `remove_norm`): for inference or export.
    Uses the stored vectors (no power iteration); differentiable."""
    return _map_normalised(lambda layer: layer.folded(), tree)


def prepare_normalised_cell(cell: PyTree, inference: bool) -> PyTree:
    """What a DEQ call solves with: the power iteration advanced (unless `inference`),
    then every normalisation folded into plain weights. `cell` itself is returned when
    it holds no normalised layer."""
    if not has_normalisation(cell):
        return cell

    def prepare(layer: NormalisedLayer) -> Any:
        if not (inference or layer.inference):
            layer = layer.power_iterate()
        return layer.folded()

    return _map_normalised(prepare, cell)
