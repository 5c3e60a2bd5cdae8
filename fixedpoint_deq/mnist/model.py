"""The MNIST deep-equilibrium classifier: a convolutional cell solved by a `DEQ`.

Per sample (an image ``(1, 28, 28)``, normalised):

1. the stem, the injection ``x_inj``: with ``stem_stride=2`` (the default)
   ``Conv(1 -> S, 3x3) -> GELU -> GroupNorm`` then a stride-2
   ``Conv(S -> C, 3x3) -> GELU -> GroupNorm``, a ``(14, 14, C)`` state; with
   ``stem_stride=1`` ``GroupNorm(GELU(Conv(1 -> C, 3x3)(image)))``, a ``(28, 28, C)``
   state;
2. the DEQ: ``z* = f(z*, x_inj)`` with the cell
   ``f(z, x_inj) = GroupNorm(GELU(Conv(C -> C, 3x3, padding 1)(z))) + x_inj``,
   from ``z0 = 0``;
3. the head: pool ``z*`` over space and classify with ``Linear``. ``head="mean"`` is
   a global mean pool then ``Linear(C -> 10)``; ``head="pool4"`` / ``"pool7"``
   average-pool to a 4x4 / 7x7 grid and classify ``16 C`` / ``49 C`` features.

The model is called on ONE sample; `jax.vmap` it over a batch (each sample's forward
solve then stops on its own tolerance and reports its own `DEQRecord`).

**Layout.** The parameters are ordinary `eqx.nn.Conv2d` / `eqx.nn.GroupNorm` layers,
but the DEQ state is kept channels-last, ``(H, W, C)``, and the cell's convolution is
`conv3x3`: XLA's CPU backend runs a channels-first convolution, or the transposed
convolution that JAX derives for reverse mode (its kernel layout has the channel axes
swapped), much more slowly than an NHWC/HWIO one, and the kernel gradient of a
convolution more slowly still inside a `while_loop` (where the solvers and the unrolled
backward call the cell). `conv3x3` computes the primal as an NHWC/HWIO convolution and
its derivative as an explicit im2col matrix product, which stays fast inside loops in
both modes. (The VJP in the state is not written as a linear map whose transpose is the
convolution with the flipped kernel, through `lax.custom_linear_solve`: that map has no
derivative with respect to the kernel, so reverse mode over reverse mode would be
wrong.)
"""

from __future__ import annotations

import functools
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, PRNGKeyArray

from .._correction import FixedPointCorrection
from .._dropout import VariationalDropout
from .._layer import DEQ, DEQRecord


#: The heads and the side of the grid each pools the state to.
HEAD_GRIDS = {"mean": 1, "pool4": 4, "pool7": 7}
HEADS = tuple(HEAD_GRIDS)
STEM_STRIDES = (1, 2)

#: Mean and standard deviation of the MNIST training pixels (in [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _conv_lax(kernel: Array, u: Array) -> Array:
    """3x3 'SAME' convolution of ``u (H, W, I)`` with ``kernel (3, 3, I, O)``."""
    return jax.lax.conv_general_dilated(
        u[None], kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0]


def _conv_im2col(kernel: Array, u: Array) -> Array:
    """The same convolution as one matrix product of the 9 shifted copies of `u`."""
    h, w, c = u.shape
    p = jnp.pad(u, ((1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [p[i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
    )
    return patches @ kernel.reshape(9 * c, -1)


def _is_zero(tangent) -> bool:
    return isinstance(tangent, SymbolicZero)


@jax.custom_jvp
def conv3x3(kernel: Array, u: Array) -> Array:
    """3x3 'SAME' convolution, channels-last: ``u (H, W, I)``, ``kernel (3, 3, I, O)``.

    Mathematically `jax.lax.conv_general_dilated`; the primal is that convolution and the
    (linear) tangent map is the im2col form, so that reverse mode transposes slices and
    a matrix product instead of a convolution (see the module docstring). A zero tangent
    (the kernel's, when only the state is differentiated) costs nothing. Differentiable
    to any order, in forward and reverse mode.
    """
    return _conv_lax(kernel, u)


@functools.partial(conv3x3.defjvp, symbolic_zeros=True)
def _conv3x3_jvp(primals, tangents):
    kernel, u = primals
    d_kernel, d_u = tangents
    out = _conv_lax(kernel, u)
    terms = []
    if not _is_zero(d_u):
        terms.append(_conv_im2col(kernel, d_u))
    if not _is_zero(d_kernel):
        terms.append(_conv_im2col(d_kernel, u))
    return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)


def _hwio(conv: eqx.nn.Conv2d) -> tuple[Array, Array]:
    """Kernel (3, 3, I, O) and bias (O,) of an `eqx.nn.Conv2d` (weight O, I, 3, 3)."""
    assert conv.bias is not None  # the cell's convolutions have biases
    return jnp.transpose(conv.weight, (2, 3, 1, 0)), conv.bias.reshape(-1)


def _norm_hwc(norm: eqx.nn.GroupNorm, y: Array) -> Array:
    """`eqx.nn.GroupNorm` (which takes channels first) computed on a channels-last
    ``(H, W, C)`` array, with the same parameters and the same arithmetic, without
    moving the channel axis (two transposes per evaluation of the cell)."""
    h, w, c = y.shape
    dtype = jnp.result_type(y.dtype, jnp.float32)
    yg = y.astype(dtype).reshape(h, w, norm.groups, c // norm.groups)
    mean = jnp.mean(yg, axis=(0, 1, 3), keepdims=True)
    variance = jnp.maximum(0.0, jnp.var(yg, axis=(0, 1, 3), keepdims=True))
    out = ((yg - mean) * jax.lax.rsqrt(variance + norm.eps)).reshape(h, w, c)
    if norm.weight is not None and norm.bias is not None:  # channelwise_affine
        out = norm.weight.astype(dtype) * out + norm.bias.astype(dtype)
    return out.astype(y.dtype)


def head_grid(head: str, stem_stride: int) -> int:
    """The side of the grid `head` pools to; raises `ValueError` (naming `head`) when it
    does not divide the DEQ state of `stem_stride` (28 / stem_stride on a side)."""
    side, grid = 28 // stem_stride, HEAD_GRIDS[head]
    if side % grid:
        raise ValueError(
            f"`head` {head!r} pools to a {grid}x{grid} grid, which does not divide the "
            f"{side}x{side} DEQ state of `stem_stride` {stem_stride}."
        )
    return grid


def _groups(channels: int, groups: int) -> int:
    if groups < 1 or channels % groups:
        raise ValueError(f"`groups` ({groups}) must be >= 1 and divide the width ({channels}).")
    return groups


class ConvCell(eqx.Module):
    """``f(z, x) = GroupNorm(GELU(Conv(C -> C, 3x3, padding 1)(z))) + x`` on channels-last
    ``(H, W, C)`` states; with `dropout > 0`, a variational channel dropout (one mask
    per sample and solve) is applied to the GroupNorm's output."""

    conv: eqx.nn.Conv2d
    norm: eqx.nn.GroupNorm
    drop: VariationalDropout | None = None

    def __init__(self, channels: int, groups: int = 1, *, dropout: float = 0.0, key: PRNGKeyArray):
        self.conv = eqx.nn.Conv2d(channels, channels, 3, padding=1, key=key)
        self.norm = eqx.nn.GroupNorm(_groups(channels, groups), channels)
        # No layer at all when off, so that the model's leaves (and checkpoints) are
        # those of a model without dropout.
        self.drop = VariationalDropout(dropout, shared_axes=(0, 1)) if dropout > 0 else None

    def __call__(self, z: Float[Array, "H W C"], x: Float[Array, "H W C"]) -> Float[Array, "H W C"]:
        kernel, bias = _hwio(self.conv)
        out = _norm_hwc(self.norm, jax.nn.gelu(conv3x3(kernel, z) + bias))
        if self.drop is not None:
            out = self.drop(out)
        return out + x


class DEQClassifier(eqx.Module):
    """A stem, a `DEQ` over a `ConvCell`, and a pooled linear head.

    With ``stem_stride=2`` (the default) the stem is ``Conv(1 -> S) -> GELU ->
    GroupNorm`` at 28x28 then a stride-2 ``Conv(S -> C) -> GELU -> GroupNorm`` down to
    14x14, so that the DEQ state is ``(14, 14, C)``: a quarter of the cost per channel
    of a 28x28 state, spent on a wider cell. With ``stem_stride=1`` it is
    ``GroupNorm(GELU(Conv(1 -> C)))`` and the state is ``(28, 28, C)``.

    The defaults are the model that ``python -m fixedpoint_deq.mnist`` trains by default
    (`fixedpoint_deq.mnist.config.Config`): width 48, a stride-2 stem of width 16, a
    7x7-pooled head, at most 30 forward steps."""

    project: eqx.nn.Conv2d
    project_norm: eqx.nn.GroupNorm
    deq: DEQ
    head: eqx.nn.Linear
    down: eqx.nn.Conv2d | None = None
    down_norm: eqx.nn.GroupNorm | None = None
    head_kind: str = eqx.field(static=True, default="pool7")

    def __init__(
        self,
        width: int = 48,
        *,
        solver: optx.AbstractRootFinder,
        adjoint: optx.AbstractAdjoint,
        max_steps: int = 30,
        groups: int = 1,
        head: Literal["mean", "pool4", "pool7"] = "pool7",
        dropout: float = 0.0,
        eval_max_steps: int | None = None,
        eval_solver: optx.AbstractRootFinder | None = None,
        correction: FixedPointCorrection | None = None,
        stem_stride: int = 2,
        stem_width: int = 16,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `width`: the channels ``C`` of the DEQ state.
        - `solver`: the forward root finder of the `DEQ`.
        - `adjoint`: its backward pass.
        - `max_steps`: the forward step budget.
        - `groups`: the GroupNorm groups (they must divide `width`, and `stem_width`
            with a stride-2 stem).
        - `head`: ``"mean"`` (a global mean pool, then ``Linear(C -> 10)``),
            ``"pool4"`` or ``"pool7"`` (average pooling to a 4x4 / 7x7 grid, then
            ``Linear(16 C -> 10)`` / ``Linear(49 C -> 10)``); the grid must divide the
            state (28 or 14 on a side).
        - `dropout`: the rate of the cell's variational channel dropout (0: none).
        - `eval_max_steps`, `eval_solver`: the `DEQ`'s budget and solver in inference
            mode (default: those of training).
        - `correction`: fixed-point correction of the `DEQ`, or `None`.
        - `stem_stride`: 1 (a 28x28 state) or 2 (a 14x14 state).
        - `stem_width`: the channels ``S`` of the first convolution of a stride-2 stem.
        - `key`: the PRNG key of the initial parameters.

        **Raises:** `ValueError` naming `head`, `stem_stride` or `groups` when it is not
        allowed or does not fit the other arguments.
        """
        if head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS}, got {head!r}.")
        if stem_stride not in STEM_STRIDES:
            raise ValueError(f"`stem_stride` must be one of {STEM_STRIDES}, got {stem_stride!r}.")
        k_proj, k_cell, k_head, k_down = jax.random.split(key, 4)
        if stem_stride == 1:
            self.project = eqx.nn.Conv2d(1, width, 3, padding=1, key=k_proj)
            self.project_norm = eqx.nn.GroupNorm(_groups(width, groups), width)
        else:
            self.project = eqx.nn.Conv2d(1, stem_width, 3, padding=1, key=k_proj)
            self.project_norm = eqx.nn.GroupNorm(_groups(stem_width, groups), stem_width)
            self.down = eqx.nn.Conv2d(stem_width, width, 3, stride=2, padding=1, key=k_down)
            self.down_norm = eqx.nn.GroupNorm(_groups(width, groups), width)
        cell = ConvCell(width, groups, dropout=dropout, key=k_cell)
        self.deq = DEQ(
            cell,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            init="zero",
            eval_max_steps=eval_max_steps,
            eval_solver=eval_solver,
            correction=correction,
        )
        grid = head_grid(head, stem_stride)
        self.head = eqx.nn.Linear(width * grid * grid, 10, key=k_head)
        self.head_kind = head

    @property
    def state_side(self) -> int:
        """Height (= width) of the DEQ state: 28, or 14 with a stride-2 stem."""
        return 28 if self.down is None else 14

    def features(self, z: Float[Array, "H W C"]) -> Float[Array, " F"]:
        """Pooled features of the (channels-last) fixed point."""
        grid = HEAD_GRIDS[self.head_kind]
        h, w, c = z.shape
        return z.reshape(grid, h // grid, grid, w // grid, c).mean(axis=(1, 3)).reshape(-1)

    def logits(self, z: Float[Array, "H W C"]) -> Float[Array, " 10"]:
        """The head's logits of a (channels-last) DEQ state."""
        return self.head(self.features(z))

    def inject(self, image: Float[Array, "1 28 28"]) -> Float[Array, "H W C"]:
        """The stem: the injection ``x_inj`` of one image, channels-last."""
        x = self.project_norm(jax.nn.gelu(self.project(image)))
        if self.down is not None:
            assert self.down_norm is not None
            x = self.down_norm(jax.nn.gelu(self.down(x)))
        return jnp.moveaxis(x, 0, -1)  # channels-last, see the module docstring

    def solve(
        self,
        image: Float[Array, "1 28 28"],
        *,
        key: PRNGKeyArray | None = None,
        jac_reg: bool | Array = False,
        z0: Float[Array, "H W C"] | None = None,
        spectral_radius: int = 0,
    ) -> tuple[Float[Array, " 10"], DEQRecord, Float[Array, "H W C"]]:
        """Logits of one normalised image, the DEQ's record and its fixed point (the
        arguments are those of the `DEQ` call; `z0` a warm start)."""
        x_inj = self.inject(image)
        z_star, record = self.deq(
            x_inj, key=key, jac_reg=jac_reg, z0=z0, spectral_radius=spectral_radius
        )
        return self.logits(z_star), record, z_star

    def __call__(
        self,
        image: Float[Array, "1 28 28"],
        *,
        key: PRNGKeyArray | None = None,
        jac_reg: bool | Array = False,
    ) -> tuple[Float[Array, " 10"], DEQRecord]:
        """Logits of one normalised image, and the DEQ's record."""
        logits, record, _ = self.solve(image, key=key, jac_reg=jac_reg)
        return logits, record
