"""The DEQ practitioner's toolkit of `fixedpoint_deq`: normalisation, variational dropout,
evaluation budgets, monitoring, warm starts, fixed-point correction, and each of them
with each adjoint under `vmap`, `jit` and `grad`.

Fast by design: cells of a few units, one jitted function per property (hypothesis
examples reuse its compilation).
"""

import functools as ft

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fixedpoint as fp
import fixedpoint_deq as fd


# Solvers, linear solvers, adjoints and the DEQ layer never rely on implicit promotion.
pytestmark = pytest.mark.strict_promotion


N = 6  # state size of the small cells


class Cell(eqx.Module):
    lin: eqx.nn.Linear
    drop: fd.VariationalDropout | None = None

    def __call__(self, z, x):
        h = jnp.tanh(self.lin(z) + x)
        return h if self.drop is None else self.drop(h)


def make_cell(key, scale=0.5, rate=0.0, n=N):
    lin = eqx.nn.Linear(n, n, key=key)
    w = lin.weight
    lin = eqx.tree_at(lambda l: l.weight, lin, scale * w / jnp.linalg.norm(w, 2))
    return Cell(lin, fd.VariationalDropout(rate) if rate else None)


TIGHT = fp.Anderson(m=5, rtol=1e-6, atol=1e-7)


def _matrix_norm(w):
    return float(jnp.linalg.norm(w.reshape(w.shape[0], -1), 2))


# --------------------------------------------------------------------------- normalisation


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**16),
    conv=st.booleans(),
    target=st.floats(0.1, 3.0),
    clip=st.booleans(),
    scale=st.floats(0.05, 5.0),
)
def test_spectral_norm_is_at_most_its_target(seed, conv, target, clip, scale):
    """The effective weight's spectral norm is at most the target (with `clip`: at most
    min(target, own norm)) within the power iteration's tolerance: after K steps from
    v_0, 1 - (sigma_est / sigma_1)^2 <= tan^2(v_0, top singular vector) (sigma_2 /
    sigma_1)^(4K) (power iteration on W^T W); and never below it."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    if conv:
        layer = eqx.nn.Conv2d(3, 4, 3, key=k1)
    else:
        layer = eqx.nn.Linear(5, 4, key=k1)
    layer = eqx.tree_at(lambda l: l.weight, layer, scale * layer.weight)
    normed = fd.normalise(layer, "spectral", key=k2, target=target, clip=clip, power_iterations=4)
    matrix = layer.weight.reshape(4, -1)
    _, sv, vt = jnp.linalg.svd(matrix, full_matrices=False)
    v0 = normed.v / jnp.linalg.norm(normed.v)
    cos2 = float(jnp.dot(v0, vt[0]) ** 2)
    for _ in range(5):
        normed = fd.update_normalisation(normed)
    k = 5 * 4
    bound = (1 - cos2) / cos2 * float(sv[1] / sv[0]) ** (4 * k)
    sigma_est = float(normed.sigma())
    sigma = float(sv[0])
    assert sigma_est <= sigma * (1 + 1e-5)  # a Rayleigh quotient never overestimates
    assert sigma_est >= sigma * (np.sqrt(max(1 - bound, 0)) - 1e-5)
    got = _matrix_norm(normed.weight)
    ceiling = target * sigma / sigma_est
    want = min(ceiling, sigma) if clip else ceiling
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got >= (min(target, sigma) if clip else target) * (1 - 1e-5)
    if clip and sigma_est < target:
        np.testing.assert_allclose(normed.weight, layer.weight, rtol=1e-6)
    # The folded layer computes the same function with a plain weight.
    plain = fd.fold_normalisation(normed)
    assert type(plain) is type(layer)
    x = jnp.ones((3, 6, 6)) if conv else jnp.ones(5)
    np.testing.assert_allclose(plain(x), normed(x), rtol=1e-5, atol=1e-6)


def test_weight_normalisation_rows_scales_and_clip():
    layer = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    learned = fd.normalise(layer, "weight")
    np.testing.assert_allclose(learned.weight, layer.weight, rtol=1e-6)  # starts unchanged
    learned = eqx.tree_at(lambda l: l.scale, learned, jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(jnp.linalg.norm(learned.weight, axis=1), [1, 2, 3], rtol=1e-6)
    fixed = fd.normalise(layer, "weight", target=0.25, learn_scale=False)
    np.testing.assert_allclose(jnp.linalg.norm(fixed.weight, axis=1), 0.25, rtol=1e-6)
    big = jnp.linalg.norm(layer.weight, axis=1).max() * 2
    clipped = fd.normalise(layer, "weight", target=float(big), learn_scale=False, clip=True)
    np.testing.assert_allclose(clipped.weight, layer.weight, rtol=1e-6)  # never scaled up
    # Gradients reach the scales and the raw weight, not the power-iteration vectors.
    grads = eqx.filter_grad(lambda l: jnp.sum(l(jnp.ones(4)) ** 2))(learned)
    assert jnp.all(grads.scale != 0) and jnp.any(grads.layer.weight != 0)
    spec = fd.normalise(layer, key=jax.random.key(1))
    grads = eqx.filter_grad(lambda l: jnp.sum(l(jnp.ones(4)) ** 2))(spec)
    assert jnp.all(grads.u == 0) and jnp.all(grads.v == 0)


def test_normalisation_refuses_bad_input_naming_it():
    cell = make_cell(jax.random.key(0))
    with pytest.raises(ValueError, match="`filter`"):
        fd.normalise(cell, key=jax.random.key(1), filter=lambda node: False)
    with pytest.raises(ValueError, match="`filter`"):
        fd.normalise({"w": jnp.ones((3, 3))}, key=jax.random.key(1))
    with pytest.raises(ValueError, match="`key`"):
        fd.normalise(cell, "spectral")
    with pytest.raises(ValueError, match="`kind`"):
        fd.normalise(cell, "batch", key=jax.random.key(1))
    with pytest.raises(ValueError, match="`learn_scale`"):
        fd.normalise(cell, "spectral", key=jax.random.key(1), learn_scale=True)
    with pytest.raises(ValueError, match="`power_iterations`"):
        fd.normalise(cell, key=jax.random.key(1), power_iterations=0)
    with pytest.raises(ValueError, match="`target`"):
        fd.normalise(cell, key=jax.random.key(1), target=0.0)
    # Already normalised layers are left alone (no double normalisation).
    once = fd.normalise(cell, key=jax.random.key(1))
    with pytest.raises(ValueError, match="`filter`"):
        fd.normalise(once, key=jax.random.key(2))


def test_deq_runs_the_power_iteration_once_per_call_outside_the_solve():
    """The DEQ solves exactly the cell folded after one call's power iteration (so the
    map is fixed during the solve); in inference mode, the cell folded as stored. The
    vectors survive `jit` and serialisation."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
    cell = fd.normalise(make_cell(k1, scale=3.0), key=k2, target=0.8, power_iterations=1)
    # Far-from-converged vectors, so that every power-iteration step changes the map.
    u, v = jax.random.normal(k4, (2, N))
    cell = eqx.tree_at(lambda c: (c.lin.u, c.lin.v), cell, (u, v))
    x = jax.random.normal(k3, (N,))
    deq = fd.DEQ(cell, solver=TIGHT, max_steps=60)
    z, record = deq(x)
    advanced = fd.fold_normalisation(fd.update_normalisation(cell))
    z_ref, _ = fd.DEQ(advanced, solver=TIGHT, max_steps=60)(x)
    # (Two solves, each within TIGHT's tolerance: not the same rounding path.)
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-6)
    assert bool(record.converged)
    np.testing.assert_allclose(advanced(z, x), z, atol=1e-5)
    twice = fd.fold_normalisation(fd.update_normalisation(fd.update_normalisation(cell)))
    assert float(jnp.max(jnp.abs(twice(z, x) - z))) > 1e-3  # a different map
    np.testing.assert_allclose(eqx.filter_jit(deq)(x)[0], z, rtol=1e-5, atol=1e-6)
    z_inf, _ = eqx.nn.inference_mode(deq)(x)
    z_stored, _ = fd.DEQ(fd.fold_normalisation(cell), solver=TIGHT, max_steps=60)(x)
    np.testing.assert_allclose(z_inf, z_stored, rtol=1e-5, atol=1e-6)
    # jit and checkpoints keep the vectors.
    updated = eqx.filter_jit(fd.update_normalisation)(deq)
    assert not np.array_equal(updated.cell.lin.u, deq.cell.lin.u)
    assert eqx.tree_equal(updated, fd.update_normalisation(deq), rtol=1e-6, atol=1e-7)


def test_normalised_layer_forwards_attributes(tmp_path):
    cell = fd.normalise(make_cell(jax.random.key(3)), key=jax.random.key(4))
    assert cell.lin.bias.shape == (N,) and cell.lin.in_features == N
    path = tmp_path / "cell.eqx"
    eqx.tree_serialise_leaves(path, cell)
    other = fd.normalise(make_cell(jax.random.key(5)), key=jax.random.key(6))
    loaded = eqx.tree_deserialise_leaves(path, other)
    assert bool(eqx.tree_equal(loaded, cell))


# --------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_solve():
    k1, k2 = jax.random.split(jax.random.key(7))
    deq = fd.DEQ(make_cell(k1, scale=0.6, rate=0.5, n=16), solver=TIGHT, max_steps=80)
    x = jax.random.normal(k2, (16,))
    return deq, x, eqx.filter_jit(lambda deq, x, key: deq(x, key=key))


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**20))
def test_dropout_mask_is_constant_during_a_solve(dropout_solve, seed):
    """The fixed point is that of ONE masked map: dropped units are exactly 0, every
    kept unit satisfies z_i = tanh(W z + x)_i / (1 - rate), and another key drops other
    units."""
    deq, x, solve = dropout_solve
    z, record = solve(deq, x, jax.random.key(seed))
    assert bool(record.converged)
    h = np.asarray(jnp.tanh(deq.cell.lin(z) + x))
    kept = np.asarray(z) != 0
    assert np.all(np.abs(h) > 1e-3)  # a zero of z is a drop, not a coincidence
    np.testing.assert_allclose(np.asarray(z)[kept], 2 * h[kept], rtol=1e-4, atol=1e-5)
    z_other, _ = solve(deq, x, jax.random.key(seed + 1))
    assert not np.array_equal(kept, np.asarray(z_other) != 0)


def test_dropout_one_mask_per_sample_under_vmap_and_off_at_inference(dropout_solve):
    deq, x, _ = dropout_solve
    xs = jnp.stack([x] * 4)
    keys = jax.random.split(jax.random.key(1), 4)
    solve = eqx.filter_jit(jax.vmap(lambda d, x, k: d(x, key=k), in_axes=(None, 0, 0)))
    z, _ = solve(deq, xs, keys)
    patterns = {tuple(np.asarray(zi) != 0) for zi in z}
    assert len(patterns) == 4
    z_same, _ = solve(deq, xs, jnp.stack([keys[0]] * 4))
    np.testing.assert_array_equal(z_same, jnp.stack([z[0]] * 4))
    # Inference: the identity, no key needed: the fixed point of the unmasked cell.
    z_eval, record = jax.vmap(eqx.nn.inference_mode(deq))(xs)
    assert bool(jnp.all(record.converged)) and bool(jnp.all(z_eval != 0))
    np.testing.assert_allclose(z_eval, jnp.tanh(jax.vmap(deq.cell.lin)(z_eval) + xs), atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        deq(x)
    for rate in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="`rate`"):
            fd.VariationalDropout(rate)


def test_channel_dropout_shares_the_mask_over_space():
    drop = fd.VariationalDropout(0.5, shared_axes=(0, 1))
    x = jnp.ones((5, 7, 16))
    y = drop(x, key=jax.random.key(0))
    per_channel = y[0, 0]
    np.testing.assert_array_equal(y, jnp.broadcast_to(per_channel, y.shape))
    assert set(np.unique(np.asarray(per_channel))) == {0.0, 2.0}
    with pytest.raises(ValueError, match="shared_axes"):
        fd.VariationalDropout(0.5, shared_axes=(3,))(x, key=jax.random.key(0))


def test_normalised_dropout_cell_gradient_matches_finite_differences():
    """Implicit gradients of a DEQ over a spectrally normalised cell with variational
    dropout (one key) against central differences, in float64: the backward pass sees
    the map the forward solve solved (same mask, same normalisation)."""
    with jax.enable_x64(True):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(8), 4)
        cell = make_cell(k1, scale=2.0, rate=0.3)
        cell = jtu.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, cell)
        cell = fd.normalise(cell, key=k2, target=0.7, power_iterations=30)
        # Converged vectors: then the power iteration of each call (whose vectors are
        # constants to the gradient) moves sigma only at second order in the weights.
        for _ in range(10):
            cell = fd.update_normalisation(cell)
        x = jax.random.normal(k3, (N,), jnp.float64)
        readout = jax.random.normal(k4, (N,), jnp.float64)
        solver = fp.Anderson(m=5, rtol=1e-12, atol=1e-12)
        adjoint = fp.ImplicitAdjoint(fp.linear.Anderson(rtol=1e-12, atol=1e-14, max_steps=200))
        params, static = eqx.partition(cell, eqx.is_inexact_array)

        def loss(params, x):
            deq = fd.DEQ(eqx.combine(params, static), solver=solver, adjoint=adjoint, max_steps=200)
            z, _ = deq(x, key=jax.random.key(5))
            return jnp.sum(readout * z)

        g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        loss = jax.jit(loss)  # one compilation for the 26 evaluations below
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        flat_grad, _ = jax.flatten_util.ravel_pytree(g_params)
        eps = 1e-6
        # The raw weight and the bias (not the power-iteration vectors, gradient 0).
        n_w = N * N + N
        for i in np.random.default_rng(0).choice(n_w, size=10, replace=False):
            e = jnp.zeros_like(flat).at[i].set(eps)
            fd_ = (loss(unravel(flat + e), x) - loss(unravel(flat - e), x)) / (2 * eps)
            np.testing.assert_allclose(flat_grad[i], fd_, rtol=1e-5, atol=1e-8)
        for i in range(3):
            e = jnp.zeros_like(x).at[i].set(eps)
            fd_ = (loss(params, x + e) - loss(params, x - e)) / (2 * eps)
            np.testing.assert_allclose(g_x[i], fd_, rtol=1e-5, atol=1e-8)
    assert not jax.config.jax_enable_x64  # pyright: ignore[reportAttributeAccessIssue]


# --------------------------------------------------------------------------- budgets


def test_evaluation_budget_and_solver_without_rebuilding():
    k1, k2 = jax.random.split(jax.random.key(9))
    cell = make_cell(k1, scale=0.9)
    x = jax.random.normal(k2, (N,))
    deq = fd.DEQ(
        cell,
        solver=fp.Anderson(m=5, rtol=1e-2, atol=1e-2),
        max_steps=3,
        eval_max_steps=40,
        eval_solver=fp.Anderson(m=5, rtol=1e-6, atol=1e-7),
    )
    _, train_record = deq(x)
    # Training: the loose solver would need more than its budget of 3 evaluations.
    assert int(train_record.num_steps) == 3 and not bool(train_record.converged)
    z_eval, eval_record = eqx.nn.inference_mode(deq)(x)
    # Inference: the tight solver converges in 11 evaluations (float32: rounding at a
    # 1e-6 tolerance may move the last one), within its budget of 40 ...
    assert bool(eval_record.converged) and 10 <= int(eval_record.num_steps) <= 12
    # ... at max|g(z)| < atol + rtol max|z|, with |z| <= 1 (tanh).
    assert float(eval_record.residual_norm) < 1e-7 + 1e-6
    z_over, over_record = deq(x, inference=True)
    np.testing.assert_array_equal(z_over, z_eval)
    # The training model is unchanged by the switch.
    assert eqx.nn.inference_mode(eqx.nn.inference_mode(deq), False) == deq
    with pytest.raises(ValueError, match="`eval_max_steps`"):
        fd.DEQ(cell, eval_max_steps=0)


# --------------------------------------------------------------------------- monitoring


def test_spectral_radius_of_known_linear_maps():
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (N, N)))
    eig = jnp.array([-0.9, 0.5, 0.3, -0.2, 0.1, 0.0])
    sym = q @ jnp.diag(eig) @ q.T
    rho = fd.spectral_radius(lambda z, a: a @ z, jnp.zeros(N), sym, key=jax.random.key(1), steps=60)
    np.testing.assert_allclose(rho, 0.9, rtol=1e-3)
    # A dominant complex pair: 0.8 * rotation, plus a smaller real eigenvalue.
    c, s = np.cos(1.0), np.sin(1.0)
    rot = jnp.array([[0.8 * c, -0.8 * s, 0.0], [0.8 * s, 0.8 * c, 0.0], [0.0, 0.0, 0.3]])
    rho = fd.spectral_radius(lambda z, a: a @ z, jnp.zeros(3), rot, key=jax.random.key(2), steps=12)
    np.testing.assert_allclose(rho, 0.8, rtol=1e-3)
    with pytest.raises(ValueError, match="`steps`"):
        fd.spectral_radius(lambda z, a: z, jnp.zeros(3), None, key=jax.random.key(0), steps=0)


def test_spectral_radius_in_the_record_matches_the_jacobian():
    k1, k2 = jax.random.split(jax.random.key(10))
    cell = make_cell(k1, scale=0.9)
    x = jax.random.normal(k2, (N,))
    deq = fd.DEQ(cell, solver=TIGHT, max_steps=60)
    z, record = deq(x, key=jax.random.key(0), spectral_radius=60)
    jac = jax.jacfwd(lambda z: cell(z, x))(z)
    rho = float(jnp.max(jnp.abs(jnp.linalg.eigvals(jac))))
    assert record.spectral_radius is not None
    np.testing.assert_allclose(record.spectral_radius, rho, rtol=0.02)
    assert deq(x)[1].spectral_radius is None


def test_jacobian_regularisation_schedule():
    schedule = fd.JacobianRegSchedule(weight=0.5, every=3, start=1)
    assert [schedule.active(s) for s in range(8)] == [
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert schedule(4) == 0.5 and schedule(5) == 0.0
    traced = jax.jit(lambda s: (schedule.active(s), schedule(s)))
    assert [bool(traced(s)[0]) for s in range(8)] == [schedule.active(s) for s in range(8)]
    assert fd.JacobianRegSchedule(weight=0.0).active(0) is False
    with pytest.raises(ValueError, match="`every`"):
        fd.JacobianRegSchedule(weight=0.5, every=0)
    # A traced flag computes the regulariser under lax.cond, with the static value;
    # under vmap, jit and grad, beside the spectral radius.
    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    deq = fd.DEQ(make_cell(k1, scale=0.9), solver=TIGHT, max_steps=60)
    xs = jax.random.normal(k2, (2, N))
    keys = jax.random.split(k3, 2)
    reg_static = jax.vmap(lambda x, k: deq(x, key=k, jac_reg=True)[1].jac_reg)(xs, keys)

    @jax.jit
    @ft.partial(jax.value_and_grad, has_aux=True)
    def run(w, on):
        d = eqx.tree_at(lambda d: d.cell.lin.weight, deq, w)
        _, record = jax.vmap(lambda x, k: d(x, key=k, jac_reg=on, spectral_radius=5))(xs, keys)
        return jnp.sum(record.jac_reg), record

    w = deq.cell.lin.weight
    (_, record), grad = run(w, jnp.array(True))
    np.testing.assert_allclose(record.jac_reg, reg_static, rtol=1e-5)
    assert jnp.any(grad != 0)
    # Each growth factor of the power iteration is at most ||J||_2 <= ||W||_2 = 0.9
    # (tanh' <= 1; float32 rounding of the norms aside), and none is 0.
    rho = np.asarray(record.spectral_radius)
    assert np.all(rho > 0) and np.all(rho <= 0.9 * (1 + 1e-5)), rho
    (_, record), grad = run(w, jnp.array(False))
    assert bool(jnp.all(record.jac_reg == 0)) and bool(jnp.all(grad == 0))


# --------------------------------------------------------------------------- warm starts


@pytest.fixture(scope="module")
def warm_solve():
    deq = fd.DEQ(make_cell(jax.random.key(12), scale=0.9), solver=TIGHT, max_steps=60)
    return deq, eqx.filter_jit(jax.vmap(lambda x, z0: deq(x, z0=z0)))


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**20), shift=st.floats(0.0, 0.3))
def test_warm_and_cold_starts_reach_the_same_fixed_point(warm_solve, seed, shift):
    deq, solve = warm_solve
    k1, k2 = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(k1, (3, N))
    cache = fd.FixedPointCache(5, like=jax.ShapeDtypeStruct((N,), jnp.float32))
    idx = jnp.array([4, 0, 2])
    z_cold, rec_cold = solve(xs, jnp.zeros((3, N)))
    cache = cache.update(idx, z_cold)
    # The same examples later, slightly changed (as after a parameter update).
    xs_new = xs + shift * jax.random.normal(k2, xs.shape)
    z0, hit = cache.lookup(idx)
    assert bool(jnp.all(hit))
    z_warm, rec_warm = solve(xs_new, z0)
    z_ref, rec_ref = solve(xs_new, jnp.zeros((3, N)))
    assert bool(jnp.all(rec_warm.converged)) and bool(jnp.all(rec_ref.converged))
    np.testing.assert_allclose(z_warm, z_ref, atol=2e-5)
    if shift == 0.0:
        # Started on the converged points themselves: converged at the first evaluation.
        np.testing.assert_array_equal(np.asarray(rec_warm.num_steps), 1)


def test_fixed_point_cache_never_aliases_or_stores_failures():
    like = jax.ShapeDtypeStruct((2,), jnp.float32)
    cache = fd.FixedPointCache(3, like)
    z0, hit = cache.lookup(jnp.array([0, 5, -1]))
    assert not bool(jnp.any(hit)) and bool(jnp.all(z0 == 0))
    z = jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 1.0], [7.0, 8.0]])
    cache = cache.update(jnp.array([1, 3, 2, -1]), z)  # 3 and -1 out of range, 2 NaN
    np.testing.assert_array_equal(cache.filled, [False, True, False])
    np.testing.assert_array_equal(cache.states, [[0, 0], [1, 2], [0, 0]])
    restored = fd.FixedPointCache(3, like, states=cache.states, filled=cache.filled)
    assert bool(eqx.tree_equal(restored, cache))
    with pytest.raises(ValueError, match="`size`"):
        fd.FixedPointCache(4, like, states=cache.states, filled=cache.filled)
    with pytest.raises(ValueError, match="`size`"):
        fd.FixedPointCache(0, like)
    half = fd.FixedPointCache(3, like, dtype=jnp.bfloat16)
    assert half.states.dtype == jnp.bfloat16


def test_fixed_point_cache_refuses_states_it_would_broadcast_or_truncate():
    """At trace time: 1-D integer indices, states of exactly `(len(indices),) + entry
    shape` (leaf by leaf for a PyTree state), dtypes the cache holds without loss."""
    cache = fd.FixedPointCache(10, jnp.zeros(4))
    idx = jnp.array([0, 1, 2])
    update = eqx.filter_jit(lambda c, i, z: c.update(i, z))
    for bad in (jnp.ones((1, 4)), jnp.ones((3, 1)), jnp.ones((3, 4, 1)), jnp.ones(4)):
        with pytest.raises(ValueError, match=r"`z` must have shape \(3, 4\)"):
            update(cache, idx, bad)
    with pytest.raises(ValueError, match=r"`z` must have shape \(2, 4\)"):
        cache.update(jnp.array([0, 1]), jnp.ones((2, 1)))
    for bad_idx in (jnp.zeros((2, 3), int), jnp.array([0.0, 1.0]), jnp.array(1)):
        with pytest.raises(ValueError, match="`indices` must be a 1-D integer array"):
            cache.lookup(bad_idx)
        with pytest.raises(ValueError, match="`indices` must be a 1-D integer array"):
            cache.update(bad_idx, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="imaginary part"):
        cache.update(idx, jnp.ones((3, 4), jnp.complex64))
    small = fd.FixedPointCache(10, jnp.zeros(4), dtype=jnp.int8)
    with pytest.raises(ValueError, match="truncates"):
        small.update(idx, jnp.full((3, 4), 1.5))
    with pytest.raises(ValueError, match="wraps"):
        small.update(idx, jnp.full((3, 4), 300, jnp.int32))
    # What fits: lower precision of the same kind, integers into floats, reals into
    # complex; stored as given.
    half = fd.FixedPointCache(10, jnp.zeros(4), dtype=jnp.bfloat16).update(idx, jnp.ones((3, 4)))
    np.testing.assert_array_equal(half.lookup(idx)[0], jnp.ones((3, 4), jnp.bfloat16))
    ints = cache.update(idx, jnp.full((3, 4), 7, jnp.int32))
    np.testing.assert_array_equal(ints.lookup(idx)[0], jnp.full((3, 4), 7.0))
    cplx = fd.FixedPointCache(10, jnp.zeros(4, jnp.complex64)).update(idx, jnp.ones((3, 4)))
    np.testing.assert_array_equal(cplx.lookup(idx)[0], jnp.ones((3, 4), jnp.complex64))
    # A PyTree state: the structure and each leaf's shape are checked.
    tree = fd.FixedPointCache(5, {"a": jnp.zeros(2), "b": jnp.zeros((2, 3))})
    good = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2, 3))}
    np.testing.assert_array_equal(tree.update(idx, good).filled, [1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"`z\['b'\]` must have shape \(3, 2, 3\)"):
        tree.update(idx, {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="`z` must have the structure"):
        tree.update(idx, {"a": jnp.ones((3, 2))})


# --------------------------------------------------------------------------- validation


def test_deq_errors_name_the_parameter_given():
    cell = make_cell(jax.random.key(0))
    with pytest.raises(ValueError, match="^`solver` must be one of 'anderson'"):
        fd.DEQ(cell, solver="bogus")
    with pytest.raises(ValueError, match="^`eval_solver` must be one of 'anderson'"):
        fd.DEQ(cell, eval_solver="bogus")
    with pytest.raises(ValueError, match="^`adjoint` must be one of 'implicit'"):
        fd.DEQ(cell, adjoint="bogus")
    assert isinstance(fd.DEQ(cell, eval_solver="picard").eval_solver, fp.Neumann)


def test_real_validator_refuses_nan_and_prints_no_infinite_bound():
    from fixedpoint.internal import check_real

    cell = make_cell(jax.random.key(0))
    for scale in (float("nan"), np.float32("nan")):
        with pytest.raises(ValueError, match="^`init_scale` must be .*, got NaN") as info:
            fd.DEQ(cell, init_scale=scale)  # pyright: ignore[reportArgumentType]
        assert "inf" not in str(info.value)
    for scale in (float("inf"), -1.0):
        with pytest.raises(ValueError, match="`init_scale` must be a finite real number >= 0"):
            fd.DEQ(cell, init_scale=scale)
    assert fd.DEQ(cell, init_scale=0.0).init_scale == 0.0
    cases = [
        (dict(), "`x` must be a real number, got NaN"),
        (dict(finite=True), "`x` must be a finite real number, got NaN"),
        (dict(low=0.0), "`x` must be a real number >= 0, got NaN"),
        (dict(high=1.0, high_open=True), "`x` must be a real number < 1, got NaN"),
    ]
    for bounds, message in cases:
        with pytest.raises(ValueError) as info:
            check_real("x", float("nan"), **bounds)
        assert str(info.value).startswith(message), str(info.value)
    for value, bounds in ((float("inf"), dict(finite=True)), ("1", dict())):
        with pytest.raises(ValueError) as info:
            check_real("x", value, **bounds)
        assert "inf" not in str(info.value).split(", got")[0]
    check_real("x", float("inf"))  # no bounds, not asked to be finite: accepted


# --------------------------------------------------------------------------- correction


def test_correction_states_and_gradient_match_unrolled_differentiation():
    """With plain iteration (Neumann, no early stop) the recorded state after n steps is
    f^n(z0); the returned state is 2 damped steps from it, detached; its gradient is
    that of the same explicit computation."""
    k1, k2, k3 = jax.random.split(jax.random.key(13), 3)
    cell = make_cell(k1, scale=0.8)
    x = jax.random.normal(k2, (2, N))
    readout = jax.random.normal(k3, (N,))
    correction = fd.FixedPointCorrection(steps=(2, 5), unroll=2, beta=0.7)
    solver = fp.Neumann(rtol=0.0, atol=0.0)
    deq = fd.DEQ(cell, solver=solver, max_steps=8, correction=correction)

    def loss(cell):
        d = eqx.tree_at(lambda d: d.cell, deq, cell)
        _, record = jax.vmap(d)(x)
        w = jnp.array(fd.correction_weights(2))
        return jnp.sum(w[None, :, None] * record.states * readout), record.states

    def reference(cell):
        def one(x):
            z, out = jnp.zeros(N), []
            for n in range(1, 6):
                z = cell(z, x)
                if n in (2, 5):
                    c = jax.lax.stop_gradient(z)
                    for _ in range(2):
                        c = 0.3 * c + 0.7 * cell(c, x)
                    out.append(c)
            return jnp.stack(out)

        states = jax.vmap(one)(x)
        w = jnp.array(fd.correction_weights(2))
        return jnp.sum(w[None, :, None] * states * readout), states

    (value, states), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(cell)
    (value_ref, states_ref), grads_ref = eqx.filter_jit(
        eqx.filter_value_and_grad(reference, has_aux=True)
    )(cell)
    np.testing.assert_allclose(states, states_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for a, b in zip(jtu.tree_leaves(grads), jtu.tree_leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Inference: no states. A solve that stops before a step gives its fixed point.
    assert eqx.nn.inference_mode(deq)(x[0])[1].states is None
    early = fd.DEQ(
        cell, solver=TIGHT, max_steps=60, correction=fd.FixedPointCorrection(steps=(50, 60))
    )
    z, record = early(x[0])
    assert 7 <= int(record.num_steps) <= 9  # 8 (float32 rounding may move the last step)
    assert record.states is not None
    np.testing.assert_allclose(record.states, jnp.stack([z, z]), atol=1e-5)
    # A batch whose samples stop at different steps (one loop for the whole batch):
    # each sample's states are those of its own solve.
    xs = jnp.stack([3.0 * x[0], 0.01 * x[1]])  # tanh saturates: the first is faster
    n_fast, n_slow = (int(early(xi)[1].num_steps) for xi in xs)
    steps = (n_fast - 1, n_fast + 1)
    assert steps[1] < n_slow
    d = eqx.tree_at(lambda d: d.correction, early, fd.FixedPointCorrection(steps=steps))
    _, batched = jax.vmap(d)(xs)
    for i in range(2):
        _, alone = d(xs[i])
        np.testing.assert_allclose(batched.states[i], alone.states, rtol=1e-5, atol=1e-6)


def test_correction_refuses_steps_outside_the_budget():
    cell = make_cell(jax.random.key(0))
    with pytest.raises(ValueError, match="correction.steps"):
        fd.DEQ(cell, max_steps=5, correction=fd.FixedPointCorrection(steps=(3, 6)))
    for steps in ((), (3, 3), (4, 2), (0, 2), 3):
        with pytest.raises(ValueError, match="`steps`"):
            fd.FixedPointCorrection(steps=steps)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`unroll`"):
        fd.FixedPointCorrection(steps=(1,), unroll=0)
    with pytest.raises(ValueError, match="`correction`"):
        fd.DEQ(cell, correction=(1, 2))  # pyright: ignore[reportArgumentType]
    assert fd.FixedPointCorrection(steps=[2, 4]).steps == (2, 4)
    np.testing.assert_allclose(fd.correction_weights(3, 0.8), (0.512, 0.64, 0.8))
    loss = fd.correction_loss(jnp.sum, jnp.ones(2), jnp.ones((3, 2)), gamma=0.5)
    np.testing.assert_allclose(loss, 2 * (1 + 0.5 + 0.25 + 0.125))


# --------------------------------------------------------------------------- every adjoint


ADJOINTS = {
    "implicit": fp.ImplicitAdjoint(fp.linear.Anderson(rtol=1e-5, atol=1e-7, max_steps=100)),
    "phantom": fp.PhantomAdjoint(steps=4, beta=0.6),
    "jfb": fp.JacobianFreeAdjoint(),
}


def _backward_matrix(name, jac):
    """w = M zbar for each adjoint, with J = the cell's Jacobian at z*."""
    eye = jnp.eye(jac.shape[0])
    if name == "implicit":
        return jnp.linalg.inv(eye - jac.T)
    if name == "phantom":
        a = ADJOINTS["phantom"]
        step = (1 - a.beta) * eye + a.beta * jac.T
        return a.beta * sum(jnp.linalg.matrix_power(step, i) for i in range(a.steps))
    return eye


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_every_piece_with_each_adjoint_under_vmap(name):
    """A normalised cell with variational dropout and fixed-point correction, vmapped
    over a batch with one key per sample, jitted and differentiated: the gradient of the
    fixed point's loss is the adjoint's formula applied to the map of each sample's
    solve. (The Jacobian regulariser and the spectral radius, which do not involve the
    adjoint, are checked under vmap in `test_jacobian_regularisation_schedule`.)"""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(14), 5)
    cell = fd.normalise(make_cell(k1, scale=2.0, rate=0.2), key=k2, target=0.7)
    deq = fd.DEQ(
        cell,
        solver=TIGHT,
        adjoint=ADJOINTS[name],
        max_steps=60,
        correction=fd.FixedPointCorrection(steps=(2, 4)),
    )
    xs = jax.random.normal(k3, (3, N))
    keys = jax.random.split(k4, 3)
    readout = jax.random.normal(k5, (N,))

    @eqx.filter_jit
    @eqx.filter_value_and_grad(has_aux=True)
    def loss(deq):
        z, record = jax.vmap(lambda x, k: deq(x, key=k))(xs, keys)
        return jnp.sum(z * readout) + 0.0 * jnp.sum(record.states), (z, record)

    (_, (z, record)), grads = loss(deq)
    assert bool(jnp.all(record.converged))
    assert bool(jnp.all(jnp.isfinite(record.states))) and record.states.shape == (3, 2, N)
    stats = fd.backward_stats(grads)
    assert stats is not None and float(stats.failed) == 0
    # Reference: per sample, VJP of the prepared cell at z* with w = M readout.
    params, static = eqx.partition(deq, eqx.is_inexact_array)
    expected = jtu.tree_map(jnp.zeros_like, params)
    for i in range(3):

        def cell_at(p, z, i=i):
            return eqx.combine(p, static).prepared_cell(keys[i])(z, xs[i])

        jac = jax.jacfwd(lambda zz: cell_at(params, zz))(z[i])
        w = _backward_matrix(name, jac) @ readout
        _, vjp = jax.vjp(lambda p: cell_at(p, z[i]), params)
        expected = jtu.tree_map(jnp.add, expected, vjp(w)[0])
    got = eqx.filter(fd.without_backward_stats(grads), eqx.is_inexact_array)
    for a, b in (
        (got.cell.lin.layer.weight, expected.cell.lin.layer.weight),
        (got.cell.lin.layer.bias, expected.cell.lin.layer.bias),
    ):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
