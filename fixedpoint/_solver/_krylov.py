r"""GMRES, matrix-free: the inner linear solve of [`fixedpoint.NewtonKrylov`][].

Solves $A x = b$ from $x_0 = 0$ by minimising $\|b - A x\|_2$ over the Krylov space
$\mathcal{K}_k = \mathrm{span}\{b, A b, \dots, A^{k-1} b\}$, one product $A v$ per
iteration (Saad and Schultz, 1986). The Arnoldi basis $V$ is orthonormalised by
classical Gram-Schmidt applied twice (as stable as the modified process, and two
matrix-vector products per iteration instead of a loop over the basis), and the
least-squares problem is kept in triangular form by Givens rotations, so the residual
norm $|\gamma_{k}|$ is known after every iteration without forming $x$. It stops as
soon as that norm is at most `tol`, after `dim` products, or on breakdown (an exact
solution in the space, or a singular $A$).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Scalar


class Solution(NamedTuple):
    x: Array  # the minimal-residual iterate
    num_products: Int[Array, ""]  # products A v made
    residual: Scalar  # ||b - A x||_2 (from the rotations)


def _inner(a: Array, b: Array, acc: jnp.dtype) -> Array:
    """``a^* b`` over the last axis, in `acc`."""
    # (As an elementwise product and a sum rather than a dot: XLA's CPU backend
    # compiles each dot separately, which made up most of this solver's compile time.)
    return jnp.sum(jnp.conj(a).astype(acc) * b.astype(acc), axis=-1)


def _combine(coeff: Array, vectors: Array) -> Array:
    """``sum_i coeff_i vectors_i``, in the dtype of `vectors`."""
    return jnp.sum(coeff.astype(vectors.dtype)[:, None] * vectors, axis=0)


def _rotation(a: Array, b: Array) -> tuple[Array, Array, Array]:
    """(c, s, r) with [[conj c, conj s], [-s, c]] @ [a, b] = [r, 0] (unitary)."""
    r = jnp.sqrt(jnp.abs(a) ** 2 + jnp.abs(b) ** 2)
    safe = jnp.where(r > 0, r, 1).astype(a.dtype)
    c = jnp.where(r > 0, a / safe, 1)
    s = jnp.where(r > 0, b / safe, 0)
    return c, s, r.astype(a.dtype)


def _rotate(c: Array, s: Array, x: Array, y: Array) -> tuple[Array, Array]:
    return jnp.conj(c) * x + jnp.conj(s) * y, -s * x + c * y


def gmres(
    matvec: Callable[[Array], Array],
    b: Array,
    *,
    dim: int,
    tol: Scalar,
    active: Bool[Array, ""],
    acc: jnp.dtype,
) -> Solution:
    """GMRES for ``matvec(x) = b`` from 0 (`b` flat), at most `dim` products, stopping
    once ``||b - A x||_2 <= tol``; no product at all unless `active`. Scalar products
    and the small triangular system are in `acc`."""
    n = b.size
    dtype = b.dtype
    real = jnp.finfo(acc).dtype
    beta = jnp.sqrt(jnp.real(_inner(b, b, acc)))
    basis = jnp.zeros((dim + 1, n), dtype)
    basis = basis.at[0].set(b / jnp.where(beta > 0, beta, 1).astype(dtype))
    rows = jnp.arange(dim + 1)

    eps = jnp.finfo(real).eps * n

    def cond(carry):
        k, _, _, _, _, gamma, broken = carry
        return active & ~broken & (k < dim) & (jnp.abs(gamma[k]) > tol)

    def body(carry):
        k, basis, tri, cs, sn, gamma, _ = carry
        w = matvec(basis[k])
        # Classical Gram-Schmidt, twice, against v_0 .. v_k (the other rows are zero).
        h = jnp.where(rows <= k, _inner(basis, w, acc), 0)
        w = w - _combine(h, basis)
        h2 = jnp.where(rows <= k, _inner(basis, w, acc), 0)
        w = w - _combine(h2, basis)
        h = h + h2
        # A w at rounding level relative to ||A v_k||: the space is invariant (exact
        # solution in it, unless the pivot below vanishes too).
        norm_w = jnp.sqrt(jnp.real(_inner(w, w, acc)))
        # ||A v_k||, by Pythagoras: its components along v_0 .. v_k, and w.
        norm_av = jnp.sqrt(jnp.sum(jnp.abs(h) ** 2) + norm_w**2)
        norm_w = jnp.where(norm_w > eps * norm_av, norm_w, 0)
        unit = w / jnp.where(norm_w > 0, norm_w, 1).astype(dtype)
        basis = basis.at[k + 1].set(unit)
        h = h.at[k + 1].set(norm_w.astype(acc))

        # Earlier rotations on the new column, then the one that zeroes h[k + 1].
        def previous(j, h):
            hj, hj1 = _rotate(cs[j], sn[j], h[j], h[j + 1])
            return h.at[j].set(hj).at[j + 1].set(hj1)

        h = jax.lax.fori_loop(0, k, previous, h)
        c, s, r = _rotation(h[k], h[k + 1])
        # A vanishing pivot: A v_k lies in the span of the earlier A v_j, A is
        # singular on the space and the residual cannot decrease further: stop, and
        # leave column k out.
        broken = jnp.abs(r) <= eps * norm_av
        h = h.at[k].set(r).at[k + 1].set(0)
        g_k, g_k1 = _rotate(c, s, gamma[k], gamma[k + 1])
        gamma = jnp.where(broken, gamma, gamma.at[k].set(g_k).at[k + 1].set(g_k1))
        tri = tri.at[:, k].set(jnp.where(broken, 0, h[:dim]))
        cs, sn = cs.at[k].set(c), sn.at[k].set(s)
        return jnp.where(broken, k, k + 1), basis, tri, cs, sn, gamma, broken

    init = (
        jnp.array(0),
        basis,
        jnp.zeros((dim, dim), acc),
        jnp.ones((dim,), acc),
        jnp.zeros((dim,), acc),
        jnp.zeros((dim + 1,), acc).at[0].set(beta.astype(acc)),
        jnp.array(False),
    )
    k, basis, tri, _, _, gamma, broken = jax.lax.while_loop(cond, body, init)
    # R y = gamma over the first k columns (R has unit diagonal beyond them).
    used = jnp.arange(dim) < k
    tri = tri + jnp.diag(jnp.where(used, 0, 1).astype(acc))
    rhs = jnp.where(used, gamma[:dim], 0)
    coeff = jax.scipy.linalg.solve_triangular(tri, rhs, lower=False)
    x = _combine(coeff, basis[:dim])
    num_products = k + broken.astype(k.dtype)
    return Solution(x, num_products, jnp.abs(gamma[k]).astype(real))
