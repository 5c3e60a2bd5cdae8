"""The SHINE experiment (`benchmarks.shine_adjoint`): each mode computes what it claims,
under `vmap`, `jit` and `grad`, also with the states of fixed-point correction recorded.

- ``shine``: w = -H^T zbar with H built from the final Broyden factors of the very solve
  that produced the gradient (its final state, returned beside the fixed point);
- ``warm`` and ``precondition``: the exact implicit gradient, (I - J^T)^-1 zbar.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp
import fixedpoint_deq as fd

from .shine_adjoint import ShineAdjoint


N = 6
BACKWARD = fp.linear.Anderson(rtol=1e-5, atol=1e-7, max_steps=100)
# (With N <= memory Broyden keeps its rank-one terms summed as an N x N matrix, else as
# pairs of vectors: "shine" is checked with both.)
SOLVER = fp.Broyden(rtol=1e-6, atol=1e-7, memory=8)


class Cell(eqx.Module):
    weight: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.weight @ z + x)


# The exact modes are also checked by every `python -m benchmarks.shine` run (cosine 1 to
# the exact gradient); in the default test run, the SHINE formula alone.
@pytest.mark.parametrize(
    ("mode", "memory"),
    [
        ("shine", 8),
        ("shine", 4),
        pytest.param("warm", 8, marks=pytest.mark.slow),
        pytest.param("precondition", 8, marks=pytest.mark.slow),
    ],
)
def test_each_mode_against_its_formula(mode, memory):
    solver = eqx.tree_at(lambda s: s.memory, SOLVER, memory)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (N, N))
    cell = Cell(0.8 * w / jnp.linalg.norm(w, 2))
    xs = jax.random.normal(k2, (3, N))
    readout = jax.random.normal(k3, (N,))
    correction = fd.FixedPointCorrection(steps=(2,))
    adjoint = ShineAdjoint(mode, BACKWARD)

    # The call `fd.DEQ(cell, solver, adjoint, max_steps=60, correction=correction)` makes,
    # written out so that the solve's final state comes back with the fixed point: H is
    # fitted to this solve's own float32 iterates, and near convergence its last secant
    # updates carry the rounding of that path (of XLA's fusion, of the CPU), so a second
    # solve is not guaranteed the same H to better than a few percent.
    @eqx.filter_jit
    @eqx.filter_grad(has_aux=True)
    def grad(cell_and_adjoint):
        c, a = cell_and_adjoint

        def solve(x):
            sol = optx.fixed_point(
                lambda zz, args: args[0](zz, args[1]),
                correction.recording(solver),
                jnp.zeros(N),
                (c, x),
                max_steps=60,
                adjoint=a,
            )
            return sol.value, sol.state.inner

        z, states = jax.vmap(solve)(xs)
        return jnp.sum(z * readout), (z, states)

    (g_cell, g_adjoint), (z, states) = grad((cell, adjoint))
    stats = fd.backward_stats(g_adjoint)
    assert stats is not None and float(stats.failed) == 0
    assert (float(stats.num_steps) == 0) == (mode == "shine")
    expected = jnp.zeros((N, N))
    for i in range(3):
        if mode == "shine":
            state = jax.tree.map(lambda leaf: leaf[i], states)
            assert (state.low_rank.size > 0) == (N <= memory)
            assert 1 <= int(state.count) <= memory  # H is not just gamma I
            valid = (jnp.arange(state.u.shape[0]) < state.count)[:, None]
            terms = jnp.where(valid, state.u, 0).T @ state.v if state.u.size else state.low_rank
            h = state.gamma * jnp.eye(N) + terms
            wvec = -h.T @ readout
        else:
            jac = jax.jacfwd(lambda zz: cell(zz, xs[i]))(z[i])
            wvec = jnp.linalg.solve(jnp.eye(N) - jac.T, readout)
        _, vjp = jax.vjp(lambda c: c(z[i], xs[i]), cell)
        expected = expected + vjp(wvec)[0].weight
    # "shine": the same factors on both sides, only the order of float32 operations
    # differs; the exact modes: up to the backward solve's tolerance.
    rtol = 1e-4 if mode == "shine" else 2e-3
    np.testing.assert_allclose(g_cell.weight, expected, rtol=rtol, atol=1e-5)


def test_shine_needs_a_broyden_forward_solve():
    deq = fd.DEQ(Cell(jnp.zeros((N, N))), adjoint=ShineAdjoint())
    with pytest.raises(ValueError, match="Broyden"):
        jax.grad(lambda x: jnp.sum(deq(x)[0]))(jnp.ones(N))
    with pytest.raises(ValueError, match="`mode`"):
        ShineAdjoint("exact")
