"""The MNIST DEQ example: layer gradients, training, resuming, sharding, the CLI.

Fast by design (small width, a few hundred real digits, few solver steps); the real
MNIST is read from ``../shared/data/mnist`` (or ``$FIXEDPOINT_MNIST_DIR``).
"""

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import fixedpoint as fp
import fixedpoint_deq as fd
from fixedpoint_deq import DEQ
from fixedpoint_deq.mnist import data as mnist_data, train as tr
from fixedpoint_deq.mnist.build import make_adjoint, make_model, make_optimizer, make_solver
from fixedpoint_deq.mnist.checkpoint import (
    CHECKPOINT_JSON,
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from fixedpoint_deq.mnist.config import BACKWARD_SOLVERS, Config, FORWARD_SOLVERS, SetupError
from fixedpoint_deq.mnist.inputs import epoch_order, prepare_images
from fixedpoint_deq.mnist.metrics import METRICS_FILE, PLOT_FILE, write_metrics
from fixedpoint_deq.mnist.model import _norm_hwc, conv3x3, ConvCell
from fixedpoint_deq.mnist.sharding import make_mesh, put, replicate
from fixedpoint_deq.mnist.steps import compiled_steps, make_eval_step, make_train_step


ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FIXEDPOINT_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "train-images-idx3-ubyte.gz").exists()
    and not (DATA_DIR / "train-images-idx3-ubyte").exists(),
    reason=f"MNIST not found in {DATA_DIR}",
)

# A small, fast setting shared by the training tests (so they share one compilation).
SMALL: dict[str, Any] = dict(
    width=8,
    batch_size=32,
    eval_batch_size=128,
    max_steps=8,
    epochs=2,
    lr=3e-3,
    warmup_steps=4,
    train_subset=256,
    test_subset=128,
    seed=3,
)


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def digits():
    from fixedpoint_deq.mnist.data import load_mnist

    data = load_mnist(DATA_DIR, verify=False)
    n, m = SMALL["train_subset"], SMALL["test_subset"]
    return (
        prepare_images(data.train_images[:n]),
        data.train_labels[:n].astype(np.int32),
        prepare_images(data.test_images[:m]),
        data.test_labels[:m].astype(np.int32),
    )


def _params(model):
    return jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("channels_out", [3, 4])  # (3: the cell's square convolution)
def test_conv3x3_matches_lax_in_both_modes(channels_out):
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    u = jax.random.normal(key1, (6, 5, 3))
    k = jax.random.normal(key2, (3, 3, 3, channels_out))
    t = jax.random.normal(key3, (6, 5, 3))

    def ref(k, u):
        return jax.lax.conv_general_dilated(
            u[None], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]

    np.testing.assert_allclose(conv3x3(k, u), ref(k, u), rtol=1e-5, atol=1e-5)
    _, jv = jax.jvp(conv3x3, (k, u), (k, t))
    _, jv_ref = jax.jvp(ref, (k, u), (k, t))
    np.testing.assert_allclose(jv, jv_ref, rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda k, u: jnp.sum(jnp.sin(conv3x3(k, u))), argnums=(0, 1))(k, u)
    g_ref = jax.grad(lambda k, u: jnp.sum(jnp.sin(ref(k, u))), argnums=(0, 1))(k, u)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # Reverse mode of forward mode (the gradient of the Jacobian regulariser's J v),
    # under jit.
    def reg(conv, k, u):
        return jnp.sum(jax.jvp(lambda u: jnp.tanh(conv(k, u)), (u,), (t,))[1] ** 2)

    g2 = jax.jit(jax.grad(lambda k, u: reg(conv3x3, k, u), argnums=(0, 1)))(k, u)
    g2_ref = jax.grad(lambda k, u: reg(ref, k, u), argnums=(0, 1))(k, u)
    for a, b in zip(g2, g2_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # Reverse mode of reverse mode (the kernel's derivative of a VJP in the state, as
    # a regulariser written with VJPs takes), and forward mode of reverse mode.
    def vjp_in_state(conv, k, u):
        return jax.grad(lambda u: jnp.sum(jnp.tanh(conv(k, u)) ** 2))(u)

    g3 = jax.grad(lambda k, u: jnp.sum(jnp.sin(vjp_in_state(conv3x3, k, u))), argnums=(0, 1))
    g3_ref = jax.grad(lambda k, u: jnp.sum(jnp.sin(vjp_in_state(ref, k, u))), argnums=(0, 1))
    for a, b in zip(g3(k, u), g3_ref(k, u)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    h = jax.jacfwd(lambda k: vjp_in_state(conv3x3, k, u))(k)
    np.testing.assert_allclose(
        h, jax.jacfwd(lambda k: vjp_in_state(ref, k, u))(k), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("channels_out", [3, 4])
def test_conv3x3_under_vmap(channels_out):
    """Batched states (batch axis anywhere, as the primitive's leading dimension),
    batched kernels, and the gradients of a batch (in the kernel, and in the states:
    the transposed convolution)."""
    keys = jax.random.split(jax.random.key(1), 3)
    us = jax.random.normal(keys[0], (6, 5, 2, 3))  # batch axis 2
    ks = jax.random.normal(keys[1], (2, 3, 3, 3, channels_out))

    def ref(k, u):
        return jax.lax.conv_general_dilated(
            u[None], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]

    out = jax.vmap(conv3x3, in_axes=(None, 2))(ks[0], us)
    np.testing.assert_allclose(
        out, jax.vmap(ref, in_axes=(None, 2))(ks[0], us), rtol=1e-5, atol=1e-5
    )
    out = jax.vmap(conv3x3, in_axes=(0, 2))(ks, us)
    np.testing.assert_allclose(out, jax.vmap(ref, in_axes=(0, 2))(ks, us), rtol=1e-5, atol=1e-5)

    def loss(conv, k):
        return jnp.sum(jnp.sin(jax.vmap(conv, in_axes=(None, 2))(k, us)))

    np.testing.assert_allclose(
        jax.grad(lambda k: loss(conv3x3, k))(ks[0]),
        jax.grad(lambda k: loss(ref, k))(ks[0]),
        rtol=1e-4,
        atol=1e-4,
    )

    def loss_states(conv, u):
        return jnp.sum(jnp.sin(jax.vmap(conv, in_axes=(0, 2))(ks, u)))

    np.testing.assert_allclose(
        jax.grad(lambda u: loss_states(conv3x3, u))(us),
        jax.grad(lambda u: loss_states(ref, u))(us),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("groups", [1, 3])
def test_channels_last_group_norm_matches_equinox(groups):
    key1, key2, key3 = jax.random.split(jax.random.key(1), 3)
    norm = eqx.nn.GroupNorm(groups, 6)
    norm = eqx.tree_at(
        lambda n: (n.weight, n.bias),
        norm,
        (jax.random.normal(key1, (6,)), jax.random.normal(key2, (6,))),
    )
    y = 3.0 + 2.0 * jax.random.normal(key3, (5, 4, 6))
    ref = jnp.moveaxis(norm(jnp.moveaxis(y, -1, 0)), 0, -1)
    np.testing.assert_allclose(_norm_hwc(norm, y), ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda y: jnp.sum(jnp.sin(_norm_hwc(norm, y))))(y)
    g_ref = jax.grad(lambda y: jnp.sum(jnp.sin(jnp.moveaxis(norm(jnp.moveaxis(y, -1, 0)), 0, -1))))(
        y
    )
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_layer_gradients_match_finite_differences():
    """Implicit gradients of a DEQ over the convolutional cell (plus the Jacobian
    regulariser) against central differences, in float64 (x64 scoped to this test)."""
    with jax.enable_x64(True):
        kc, kx, kr, kw = jax.random.split(jax.random.key(1), 4)
        cell = ConvCell(2, key=kc)
        cell = eqx.tree_at(lambda c: c.conv.weight, cell, 0.3 * cell.conv.weight)
        cell = jtu.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, cell)
        x = jax.random.normal(kx, (5, 5, 2), jnp.float64)
        readout = jax.random.normal(kw, (5, 5, 2), jnp.float64)
        solver = fp.Anderson(m=5, rtol=1e-12, atol=1e-12)
        adjoint = fp.ImplicitAdjoint(fp.linear.Anderson(rtol=1e-12, atol=1e-14, max_steps=200))
        params, static = eqx.partition(cell, eqx.is_inexact_array)

        def loss(params):
            deq = DEQ(eqx.combine(params, static), solver=solver, adjoint=adjoint, max_steps=200)
            z, record = deq(x, key=kr, jac_reg=True)
            return jnp.sum(readout * jnp.tanh(z)) + 0.7 * record.jac_reg

        grads = jax.jit(jax.grad(loss))(params)
        loss = jax.jit(loss)  # one compilation for the 24 evaluations below

        flat, unravel = jax.flatten_util.ravel_pytree(params)
        flat_grad, _ = jax.flatten_util.ravel_pytree(grads)
        rng = np.random.default_rng(0)
        eps = 1e-6
        for i in rng.choice(flat.size, size=min(12, flat.size), replace=False):
            e = jnp.zeros_like(flat).at[i].set(eps)
            fd = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / (2 * eps)
            np.testing.assert_allclose(flat_grad[i], fd, rtol=1e-5, atol=1e-7)
    assert not jax.config.jax_enable_x64  # pyright: ignore[reportAttributeAccessIssue]


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def straight_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    config = Config(**SMALL, checkpoint_dir=str(out / "ckpt"), out_dir=str(out / "out"))
    model0 = make_model(config)
    result = tr.train(config, digits, progress=False, log=lambda s: None)
    return config, model0, result, out


@needs_data
def test_training_lowers_the_loss(straight_run, digits):
    config, model0, result, out = straight_run
    train_x, train_y, _, _ = digits
    mesh = make_mesh()
    step_eval = make_eval_step(config)
    before = tr.evaluate(model0, train_x, train_y, batch_size=128, mesh=mesh, eval_step=step_eval)
    after = tr.evaluate(
        result.model, train_x, train_y, batch_size=128, mesh=mesh, eval_step=step_eval
    )
    assert after["test_loss"] < 0.8 * before["test_loss"]
    assert after["test_acc"] > before["test_acc"] + 0.2
    h = result.history
    assert [r["epoch"] for r in h] == [1, 2]
    for r in h:
        assert r["skipped"] == 0
        assert 1 <= r["fwd_steps"] <= config.max_steps
        assert r["bwd_steps"] == config.phantom_steps  # the default backward: phantom
        assert 0 <= r["fwd_converged"] <= 1 and np.isfinite(r["jac_reg"])
    # Metrics, plot, checkpoint.
    lines = (out / "out" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]
    assert (out / "out" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "ckpt" / CHECKPOINT_JSON).read_text())
    assert meta["epoch"] == 2 and (out / "ckpt" / meta["file"]).is_file()
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [CHECKPOINT_JSON, meta["file"]]


@needs_data
def test_resume_gives_the_same_weights(straight_run, digits, tmp_path):
    config, _, straight, _ = straight_run
    ckpt = tmp_path / "ckpt"
    base = dict(SMALL, checkpoint_dir=str(ckpt), out_dir=str(tmp_path / "out"))
    first = tr.train(Config(**base), digits, progress=False, log=lambda s: None, stop_after_epoch=1)
    assert first.epoch == 1 and json.loads((ckpt / CHECKPOINT_JSON).read_text())["epoch"] == 1
    resumed = tr.train(Config(**base, resume=True), digits, progress=False, log=lambda s: None)
    assert resumed.epoch == 2 and [r["epoch"] for r in resumed.history] == [1, 2]
    for a, b in zip(_params(straight.model), _params(resumed.model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    for a, b in zip(_params(straight.opt_state), _params(resumed.opt_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert resumed.history[1]["test_acc"] == pytest.approx(straight.history[1]["test_acc"])
    # A resumed run must agree on the settings that shape the model.
    with pytest.raises(ValueError, match="width"):
        tr.train(
            Config(**dict(base, width=4), resume=True),
            digits,
            progress=False,
            log=lambda s: None,
        )


@needs_data
def test_non_finite_batch_skips_the_update(digits, tmp_path):
    train_x, train_y, test_x, test_y = digits
    config = Config(**SMALL)
    model = make_model(config)
    # The step the runs of this file use (already compiled).
    step, _, optimizer = compiled_steps(config, 16)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    x = np.array(train_x[:32])
    x[5] = np.nan
    # Shard and replicate as `train` does, so that the compiled step is reused.
    mesh = make_mesh()
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    model, opt_state = replicate(model, mesh), replicate(opt_state, mesh)
    new_model, new_state, metrics = step(
        model,
        opt_state,
        put(x, sharding),
        put(train_y[:32], sharding),
        jax.random.key(0),
    )
    assert not bool(metrics["finite"])
    for a, b in zip(_params(model) + _params(opt_state), _params(new_model) + _params(new_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # In a run: the one batch holding the NaN digit is skipped and counted, the weights
    # stay finite and the other steps train.
    bad_x = np.array(train_x)
    bad_x[17] = np.nan
    result = tr.train(
        Config(**SMALL), (bad_x, train_y, test_x, test_y), progress=False, log=lambda s: None
    )
    assert [r["skipped"] for r in result.history] == [1, 1]
    assert all(np.isfinite(np.asarray(p)).all() for p in _params(result.model))
    assert np.isfinite(result.history[-1]["train_loss"])


def test_batch_size_must_divide_device_count():
    # Checked before anything is loaded; on one device every size divides, so check the
    # message path with a fake count through the mesh.
    config = Config(**dict(SMALL, batch_size=3))
    if len(jax.devices()) == 1:
        pytest.skip("needs several devices (covered in the sharded subprocess test)")
    with pytest.raises(ValueError, match="divisible"):
        tr.train(config, progress=False)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, equinox as eqx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fixedpoint_deq.mnist import train as tr
    from fixedpoint_deq.mnist.build import make_model, make_optimizer
    from fixedpoint_deq.mnist.config import Config
    from fixedpoint_deq.mnist.data import load_mnist
    from fixedpoint_deq.mnist.inputs import prepare_images
    from fixedpoint_deq.mnist.sharding import put, replicate
    from fixedpoint_deq.mnist.steps import make_train_step

    assert len(jax.devices()) == 4, jax.devices()
    data = load_mnist(sys.argv[1], verify=False)
    x = prepare_images(data.train_images[:16])
    y = data.train_labels[:16].astype(np.int32)
    config = Config(width=4, batch_size=16, max_steps=6, backward="implicit",
                    backward_max_steps=4, seed=1)
    optimizer = make_optimizer(config, 10)
    step = make_train_step(config, optimizer)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
        mesh = Mesh(np.array(devices), ("batch",))
        model = replicate(make_model(config), mesh)
        opt_state = replicate(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
        sh = NamedSharding(mesh, P("batch"))
        xs, ys = put(x, sh), put(y, sh)
        assert len(xs.sharding.device_set) == len(devices)
        model, opt_state, m = step(model, opt_state, xs, ys, jax.random.key(0))
        leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
        out[name] = dict(
            loss=float(m["loss"]), total=float(m["total"]), fwd=float(m["fwd_steps"]),
            bwd=float(m["bwd_steps"]), params=[np.asarray(l).ravel().tolist() for l in leaves],
        )
    # The CLI refuses a batch size that the device count does not divide.
    try:
        tr.train(Config(batch_size=6, data_dir=sys.argv[1]), progress=False)
        out["refused"] = False
    except ValueError as e:
        out["refused"] = "divisible" in str(e)
    print("RESULT" + json.dumps(out))
    """
)


@needs_data
@pytest.mark.slow  # (about 18 s: a fresh process with 4 host devices; run with -m slow)
def test_sharded_step_equals_unsharded():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(DATA_DIR)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    one, four = out["one"], out["four"]
    for k in ("loss", "total", "fwd", "bwd"):
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(one["params"], four["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert out["refused"]


# --------------------------------------------------------------------------- CLI


def test_help_lists_every_option():
    proc = subprocess.run(
        [sys.executable, "-m", "fixedpoint_deq.mnist", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for option in (
        "--data-dir",
        "--epochs",
        "--batch-size",
        "--lr",
        "--solver",
        "--anderson-m",
        "--beta",
        "--broyden-memory",
        "--max-steps",
        "--fwd-tol",
        "--backward",
        "--backward-solver",
        "--backward-max-steps",
        "--backward-tol",
        "--phantom-steps",
        "--phantom-beta",
        "--jac-reg",
        "--width",
        "--seed",
        "--checkpoint-dir",
        "--resume",
        "--train-subset",
        "--test-subset",
        "--quick",
        "--out-dir",
        "--distributed",
        "--overwrite",
        "../shared/data/mnist",
    ):
        assert option in text, option
    # The epilog describes settings, not measurements (those are in docs/benchmarks.md),
    # and argparse prints it as written: no doubled percent signs.
    assert "%%" not in text and "docs/benchmarks.md" in text
    assert "ckpt-XXXX-TOKEN.eqx" in text


def test_cli_parses_quick_and_overrides():
    from fixedpoint_deq.mnist.__main__ import config_from_args, QUICK

    config, progress = config_from_args(["--quick", "--epochs", "2", "--solver", "broyden"])
    assert config.epochs == 2 and config.augment_shift == QUICK["augment_shift"] == 0
    assert config.warmup_steps == QUICK["warmup_steps"]
    assert config.solver == "broyden" and progress
    config, _ = config_from_args([])
    assert config == Config()
    with pytest.raises(SystemExit):
        config_from_args(["--solver", "newton"])


def test_config_builds_every_solver_and_adjoint():
    for solver in FORWARD_SOLVERS:
        assert type(make_solver(Config(solver=solver))).__name__.lower() == solver
    assert isinstance(make_adjoint(Config(backward="jfb")), fp.JacobianFreeAdjoint)
    assert isinstance(make_adjoint(Config(backward="phantom")), fp.PhantomAdjoint)
    for s in BACKWARD_SOLVERS:
        adj = make_adjoint(Config(backward="implicit", backward_solver=s))
        assert isinstance(adj, fp.ImplicitAdjoint)
    with pytest.raises(ValueError):
        Config(resume=True).check()
    with pytest.raises(ValueError):
        Config(beta=0).check()


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(0, 3, 100)
    np.testing.assert_array_equal(a, epoch_order(0, 3, 100))
    assert not np.array_equal(a, epoch_order(0, 4, 100))
    assert not np.array_equal(a, epoch_order(1, 3, 100))
    assert sorted(a.tolist()) == list(range(100))


def test_cli_options_are_the_config_fields():
    """The parser is derived from `Config`: one option per field, with its help text."""
    import dataclasses

    from fixedpoint_deq.mnist.__main__ import build_parser

    parser = build_parser()
    options = {a.dest for a in parser._actions if a.option_strings} - {"help"}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert options == fields | {"quick", "no_progress"}
    for f in dataclasses.fields(Config):
        assert f.metadata["help"], f.name


def test_config_refuses_bad_values_naming_them():
    for kwargs, name in [
        (dict(lr="1e-3"), "lr"),
        (dict(epochs=True), "epochs"),
        (dict(phantom_beta=0.0), "phantom_beta"),
        (dict(train_subset=0), "train_subset"),
        (dict(solver="newton"), "solver"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            Config(**kwargs).check()
    Config(train_subset=None, lr=np.float32(1e-3)).check()  # pyright: ignore[reportArgumentType]


def test_config_from_a_checkpoint_of_an_earlier_version():
    config = Config.from_dict({"phantom_damping": 0.25, "width": 4, "unknown": 1})
    assert config.phantom_beta == 0.25 and config.width == 4


def test_cli_numbers_are_checked_by_the_config_rules():
    """Every numeric option has a rule in its `Config` field's metadata; the parser and
    `Config.check` apply the same rule (a value just outside the range fails both)."""
    import dataclasses

    from fixedpoint_deq.mnist.__main__ import config_from_args
    from fixedpoint_deq.mnist.config import Integer, Real

    checked = 0
    for field in dataclasses.fields(Config):
        rule = field.metadata["rule"]
        if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
            assert rule is not None, field.name  # no number goes unchecked
        if rule is None:
            continue
        if isinstance(rule, Integer):
            bad = [rule.low - 1] + ([] if rule.high is None else [rule.high + 1])
        else:
            assert isinstance(rule, Real)
            bad = [float("nan"), float("inf"), rule.low if rule.low_open else rule.low - 1]
        for value in bad:
            kwargs: dict[str, Any] = {field.name: value}
            with pytest.raises(ValueError, match=f"`{field.name}`"):
                Config(**kwargs).check()
            with pytest.raises(SystemExit) as info:
                config_from_args(["--" + field.name.replace("_", "-"), str(value)])
            assert info.value.code == 2
            checked += 1
    assert checked >= 40


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--lr", "inf"], "--lr"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--jac-reg", "nan"], "--jac-reg"),
        (["--clip-norm", "-1"], "--clip-norm"),
        (["--clip-norm", "0"], "--clip-norm"),
        (["--fwd-tol", "nan"], "--fwd-tol"),
        (["--batch-size", "300", "--train-subset", "256"], "--batch-size"),
        (["--batch-size", "60001"], "--batch-size"),
        (["--groups", "5", "--width", "12"], "--groups"),
        (["--resume"], "--checkpoint-dir"),
        (["--resume", "--overwrite", "--checkpoint-dir", "ckpt"], "--overwrite"),
    ],
)
def test_cli_refuses_invalid_settings_as_usage_errors(argv, option, capsys):
    from fixedpoint_deq.mnist.__main__ import config_from_args

    with pytest.raises(SystemExit) as info:
        config_from_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fixedpoint-mnist") and option in err.splitlines()[-1], err


# --------------------------------------------------------------------------- never lose a model


def _saved_checkpoint(directory: Path, epoch: int = 1) -> Config:
    """The checkpoint of an untrained model, written as `train` writes one (no training)."""
    config = Config(**SMALL, checkpoint_dir=str(directory))
    model = make_model(config)
    opt_state = make_optimizer(config, 16).init(eqx.filter(model, eqx.is_inexact_array))
    save_checkpoint(directory, epoch, model, opt_state, jax.random.key(3), [], config)
    return config


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _cli(*args: str) -> list[str]:
    """The command line of `SMALL`, plus `args`."""
    argv = ["--no-progress"]
    for k, v in SMALL.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv + list(args)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """MNIST cannot be found or downloaded: no ``$FIXEDPOINT_MNIST_DIR``, an empty cache
    in `tmp_path` (not the real one), and every download fails. (A ``--data-dir`` that
    does not exist is passed over for the cache, which downloads what it lacks.)"""

    def no_network(url: str, **kwargs) -> bytes:
        raise OSError(f"offline (test): {url}")

    monkeypatch.delenv(mnist_data.ENV_MNIST_DIR, raising=False)
    monkeypatch.setenv(mnist_data.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(mnist_data, "fetch_url", no_network)


@pytest.mark.usefixtures("offline")
def test_a_run_refuses_a_directory_holding_a_checkpoint(tmp_path, capsys):
    """Without `--resume` or `--overwrite`, a checkpoint in the way stops the run before
    anything is read or written (the data directory here does not even exist)."""
    from fixedpoint_deq.mnist.__main__ import main

    ckpt = tmp_path / "ckpt"
    _saved_checkpoint(ckpt)
    before = _files(ckpt)
    no_data = str(tmp_path / "no-data")
    config = Config(**SMALL, data_dir=no_data, checkpoint_dir=str(ckpt))
    with pytest.raises(SetupError, match="(?s)holds the checkpoint.*`resume`.*`overwrite`"):
        tr.train(config, progress=False)
    assert main(_cli("--data-dir", no_data, "--checkpoint-dir", str(ckpt))) == 2
    err = capsys.readouterr().err
    assert "checkpoint.json" in err and "--resume" in err and "--overwrite" in err
    assert _files(ckpt) == before
    # With either flag the run goes on (to the data, missing here and not downloaded).
    for flag in ("resume", "overwrite"):
        with pytest.raises(
            mnist_data.MNISTDataError, match="does not exist, and .*could not be downloaded"
        ):
            tr.train(dataclasses.replace(config, **{flag: True}), progress=False)
    assert _files(ckpt) == before


@needs_data
def test_overwrite_replaces_the_checkpoint_once_an_epoch_is_saved(tmp_path, digits):
    ckpt = tmp_path / "ckpt"
    config = _saved_checkpoint(ckpt, epoch=2)
    result = tr.train(
        dataclasses.replace(config, overwrite=True),
        digits,
        progress=False,
        log=lambda s: None,
        stop_after_epoch=1,
    )
    assert result.epoch == 1
    meta = json.loads((ckpt / CHECKPOINT_JSON).read_text())
    assert meta["epoch"] == 1 and re.fullmatch(r"ckpt-0001-[0-9a-f]+\.eqx", meta["file"])
    assert sorted(_files(ckpt)) == [CHECKPOINT_JSON, meta["file"]]


@pytest.mark.usefixtures("offline")
def test_output_paths_are_checked_before_anything_runs(tmp_path, capsys):
    from fixedpoint_deq.mnist.__main__ import main

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    no_data = str(tmp_path / "no-data")
    for name, path, what in [
        ("checkpoint_dir", a_file, "is not a directory"),
        ("out_dir", a_file / "out", "cannot create the directory"),
    ]:
        where: dict[str, Any] = {name: str(path)}
        config = Config(**SMALL, data_dir=no_data, **where)
        with pytest.raises(SetupError, match=f"`{name}`: .*{what}"):
            tr.train(config, progress=False)
        flag = "--" + name.replace("_", "-")
        assert main(_cli("--data-dir", no_data, flag, str(path))) == 2
        assert f"{flag}: " in capsys.readouterr().err
    if os.geteuid() != 0:  # (root writes whatever the permissions say)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SetupError, match="cannot write in the directory"):
            tr.prepare_run(Config(out_dir=str(locked)))
    # Missing directories are created at the start.
    tr.prepare_run(Config(checkpoint_dir=str(tmp_path / "new" / "ckpt")))
    assert (tmp_path / "new" / "ckpt").is_dir()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "truncated",
            r"ckpt-0001-\w+\.eqx: not a checkpoint of this model, or truncated or corrupt",
        ),
        ("longer", r"ckpt-0001-\w+\.eqx: holds more data than this model"),
        ("bad_json", r"checkpoint\.json: not valid JSON"),
        ("missing_key", r"checkpoint\.json: the key 'file' is missing"),
        ("wrong_type", r"checkpoint\.json: 'epoch' should be a JSON integer"),
        ("missing_eqx", r"checkpoint\.json: names ckpt-0001-\w+\.eqx, which is missing"),
    ],
)
@pytest.mark.usefixtures("offline")
def test_a_corrupt_checkpoint_names_the_file_and_the_fault(tmp_path, damage, message, capsys):
    from fixedpoint_deq.mnist.__main__ import main

    ckpt = tmp_path / "ckpt"
    config = _saved_checkpoint(ckpt)
    meta_path = ckpt / CHECKPOINT_JSON
    meta = json.loads(meta_path.read_text())
    eqx_path = ckpt / meta["file"]
    if damage == "truncated":
        eqx_path.write_bytes(eqx_path.read_bytes()[:-100])
    elif damage == "longer":
        eqx_path.write_bytes(eqx_path.read_bytes() + b"\0" * 8)
    elif damage == "bad_json":
        meta_path.write_text(meta_path.read_text()[:-20])
    elif damage == "missing_key":
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "file"}))
    elif damage == "wrong_type":
        meta_path.write_text(json.dumps(dict(meta, epoch="1")))
    else:
        eqx_path.unlink()
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)
    model = make_model(config)
    opt_state = make_optimizer(config, 16).init(eqx.filter(model, eqx.is_inexact_array))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt, model, opt_state, jax.random.key(0))
    if damage in ("bad_json", "missing_key", "wrong_type", "missing_eqx"):
        # Found when the run starts (before the data are read): exit status 1.
        no_data = str(tmp_path / "no-data")
        assert main(_cli("--data-dir", no_data, "--checkpoint-dir", str(ckpt), "--resume")) == 1
        assert re.search(message, capsys.readouterr().err)


def test_a_checkpoint_holds_arrays_only_so_new_solver_options_keep_it_readable(tmp_path):
    # A checkpoint stores the arrays of the model, never its Python scalars (the
    # solvers' hyperparameters, which the saved configuration rebuilds): a solver that
    # gains an option does not shift the leaves of every existing checkpoint.
    ckpt = tmp_path / "ckpt"
    config = _saved_checkpoint(ckpt)
    model = make_model(config)
    opt_state = make_optimizer(config, 16).init(eqx.filter(model, eqx.is_inexact_array))

    class WithNewOption(eqx.Module):  # the forward solver, with one more Python field
        solver: Any
        new_option: bool = True

    changed = eqx.tree_at(lambda m: m.deq.solver, model, WithNewOption(model.deq.solver))
    loaded = load_checkpoint(ckpt, changed, opt_state, jax.random.key(0))
    assert loaded is not None
    _, got, *_ = loaded
    assert got.deq.solver.new_option is True  # (not in the file: the like's value)
    for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(got, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)),
    ):
        np.testing.assert_array_equal(a, b)
    # An extra array leaf is still refused.
    grown = eqx.tree_at(lambda m: m.deq.solver, model, WithNewOption(jnp.zeros(3)))
    with pytest.raises(CheckpointError, match="not a checkpoint of this model"):
        load_checkpoint(ckpt, grown, opt_state, jax.random.key(0))


def test_saved_files_follow_the_umask(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    for umask, mode in ((0o027, 0o640), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            _saved_checkpoint(ckpt)
            write_metrics(out, [])
        finally:
            os.umask(old)
        eqx_file = ckpt / json.loads((ckpt / CHECKPOINT_JSON).read_text())["file"]
        for path in (ckpt / CHECKPOINT_JSON, eqx_file, out / METRICS_FILE):
            assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))


def test_leftover_temporaries_are_removed_when_a_run_starts(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    _saved_checkpoint(ckpt)
    out.mkdir()
    leftovers = [
        ckpt / ".checkpoint.json.1a2b3c.tmp",
        ckpt / ".ckpt-0002.eqx.4d5e6f.tmp",
        out / ".metrics.png.0a0b0c.tmp",
        out / ".metrics.jsonl.0d0e0f.tmp",
    ]
    others = [ckpt / "notes.txt", ckpt / ".editor.tmp", out / "other.tmp"]
    for path in leftovers + others:
        path.write_text("x")
    tr.prepare_run(Config(checkpoint_dir=str(ckpt), out_dir=str(out), resume=True))
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in others)
    assert (ckpt / json.loads((ckpt / CHECKPOINT_JSON).read_text())["file"]).exists()


def test_an_update_that_is_not_finite_is_skipped(tmp_path):
    """The guard checks the new parameters and optimiser state, not only the loss and
    the gradient: a finite gradient with an infinite step size gives a non-finite
    update, which is not applied (and a non-finite model is never saved)."""
    import optax

    from fixedpoint_deq.mnist.steps import guarded_update

    params = {"w": jnp.ones(3), "n": 2}
    grads = {"w": jnp.array([1.0, 0.0, -1.0]), "n": None}
    loss = jnp.asarray(0.5)
    for optimizer, loss, applied in [
        (optax.sgd(0.5), loss, True),
        (optax.sgd(jnp.inf), loss, False),
        (optax.chain(optax.scale_by_adam(), optax.scale(-1e38), optax.scale(1e38)), loss, False),
        (optax.sgd(0.5), jnp.asarray(jnp.nan), False),
    ]:
        state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
        new, new_state, finite = jax.jit(guarded_update, static_argnums=0)(
            optimizer, grads, params, state, loss
        )
        assert bool(finite) == applied
        expected = params["w"] - 0.5 * grads["w"] if applied else params["w"]
        np.testing.assert_array_equal(new["w"], expected)
        assert all(np.isfinite(np.asarray(x)).all() for x in jtu.tree_leaves(new_state))
    config = Config(**SMALL)
    model = make_model(config)
    bad = jtu.tree_map(lambda x: x * jnp.nan if eqx.is_inexact_array(x) else x, model)
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path, 1, bad, {}, jax.random.key(0), [], config)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- DEQ toolkit

# Every piece of the toolkit on at once (one compilation): spectral normalisation,
# variational dropout, an evaluation budget and tolerance, the Jacobian regulariser on
# every 2nd step, the spectral radius at the test fixed points, warm starts, correction.
TOOLKIT: dict[str, Any] = dict(
    SMALL,
    width=4,
    train_subset=128,
    test_subset=64,
    eval_batch_size=64,
    max_steps=6,
    norm="spectral",
    norm_target=0.9,
    dropout=0.2,
    eval_max_steps=9,
    eval_fwd_tol=1e-3,
    jac_reg_every=2,
    spectral_radius_steps=3,
    reuse_fixed_points=True,
    correction_states=2,
)


@needs_data
@pytest.mark.slow  # (about 13 s: the whole toolkit through the CLI; each piece has its own test)
def test_toolkit_run_logs_every_piece_and_resumes_exactly(digits, tmp_path):
    train_x, train_y, test_x, test_y = digits
    data = (train_x[:128], train_y[:128], test_x[:64], test_y[:64])
    straight = tr.train(
        Config(**TOOLKIT, checkpoint_dir=str(tmp_path / "a")),
        data,
        progress=False,
        log=lambda s: None,
    )
    for r in straight.history:
        assert r["skipped"] == 0
        assert r["jac_reg_steps"] == 2 and np.isfinite(r["jac_reg"])  # 4 steps, every 2nd
        assert 0 < r["test_spectral_radius"] < 10
        assert 1 <= r["test_fwd_steps"] <= 9 and 1 <= r["fwd_steps"] <= 6
    assert [r["warm_start_rate"] for r in straight.history] == [0.0, 1.0]
    # The power iteration is advanced by the training steps and kept in the model.
    conv = straight.model.deq.cell.conv
    assert isinstance(conv, fd.NormalisedLayer)
    fresh = make_model(Config(**TOOLKIT)).deq.cell.conv
    assert not np.allclose(np.asarray(conv.u), np.asarray(fresh.u))
    sigma = np.linalg.norm(np.asarray(conv.weight).reshape(4, -1), 2)
    assert sigma <= 0.9 * 1.05
    # Resuming after epoch 1 gives the same weights, vectors and warm-start cache.
    ckpt = tmp_path / "b"
    base = dict(TOOLKIT, checkpoint_dir=str(ckpt))
    tr.train(Config(**base), data, progress=False, log=lambda s: None, stop_after_epoch=1)
    assert sorted(p.name for p in ckpt.glob("fixed-points-*")) == ["fixed-points-0001.npz"]
    (ckpt / "fixed-points-0009.npz").write_bytes(b"a copy")  # (not the run's: kept)
    resumed = tr.train(Config(**base, resume=True), data, progress=False, log=lambda s: None)
    # The resumed checkpoint's cache is replaced with it; the copy is left alone.
    assert sorted(p.name for p in ckpt.glob("fixed-points-*")) == [
        "fixed-points-0002.npz",
        "fixed-points-0009.npz",
    ]
    assert [p.name for p in (tmp_path / "a").glob("fixed-points-*")] == ["fixed-points-0002.npz"]
    for a, b in zip(_params(straight.model), _params(resumed.model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert resumed.history[1]["warm_start_rate"] == 1.0
    assert resumed.history[1]["fwd_steps"] == pytest.approx(straight.history[1]["fwd_steps"])
    cached = [np.load(d / "fixed-points-0002.npz")["states"] for d in (tmp_path / "a", ckpt)]
    np.testing.assert_allclose(cached[0], cached[1], rtol=1e-5, atol=1e-6)
    # The trained model loads back from its checkpoint, normalised as it was trained.
    model, config, epoch = load_model(ckpt)
    assert epoch == 2 and config.norm == "spectral"
    for a, b in zip(_params(model), _params(resumed.model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_config_refuses_bad_toolkit_values_naming_them():
    for kwargs, name in [
        (dict(norm="batch"), "norm"),
        (dict(dropout=1.0), "dropout"),
        (dict(jac_reg_every=0), "jac_reg_every"),
        (dict(eval_max_steps=0), "eval_max_steps"),
        (dict(correction_states=30), "correction_states"),
        (dict(reuse_fixed_points=True, distributed=True), "reuse_fixed_points"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            Config(**kwargs).check()
    assert Config(correction_states=2, max_steps=30).correction_steps() == (10, 20)
    assert Config().correction_steps() == ()


# --------------------------------------------------------------------------- the recipe


def test_stride_two_stem_halves_the_state_and_pool7_reads_it():
    config = Config(width=8, stem_stride=2, stem_width=4, head="pool7")
    config.check()
    model = make_model(config)
    image = jnp.zeros((1, 28, 28))
    assert model.inject(image).shape == (14, 14, 8)
    assert model.state_side == 14
    logits, record = model(image)
    assert logits.shape == (10,) and model.head.in_features == 8 * 49
    assert int(record.num_steps) >= 1
    flat = make_model(Config(width=8, stem_stride=1, head="pool7"))
    assert flat.inject(image).shape == (28, 28, 8) and flat.down is None
    # A grid that does not divide the state is refused, naming the setting.
    with pytest.raises(ValueError, match="`head`"):
        Config(stem_stride=2, head="pool4").check()
    with pytest.raises(ValueError, match="`groups`"):
        Config(stem_stride=2, head="pool7", width=8, groups=4, stem_width=6).check()


def test_checkpoints_of_earlier_versions_keep_their_28x28_state():
    """A saved configuration without the stem settings was trained without a stem."""
    config = Config.from_dict({"width": 12, "head": "pool4"})
    assert config.stem_stride == 1
    config.check()


def test_unrolled_backward_is_backpropagation_through_the_steps():
    """``--backward unrolled`` with Neumann at tolerance 0 is the weight-tied K-layer
    network: its gradient is that of the explicit composition of K cell evaluations."""
    k = 3
    config = Config(
        width=4,
        stem_width=4,
        backward="unrolled",
        solver="neumann",
        fwd_tol=0.0,
        max_steps=k,
        jac_reg=0.0,
    )
    config.check()
    model = make_model(config)
    image = jax.random.normal(jax.random.key(0), (1, 28, 28))

    def deq_loss(m):
        logits, _ = m(image)
        return jnp.sum(jnp.sin(logits))

    def unrolled_loss(m):
        x = m.inject(image)
        z = jnp.zeros_like(x)
        for _ in range(k):
            z = m.deq.cell(z, x)
        return jnp.sum(jnp.sin(m.logits(z)))

    g_deq = eqx.filter_jit(eqx.filter_grad(deq_loss))(model)
    g_ref = eqx.filter_jit(eqx.filter_grad(unrolled_loss))(model)
    a, _ = jax.flatten_util.ravel_pytree(eqx.filter(g_deq, eqx.is_inexact_array))
    b, _ = jax.flatten_util.ravel_pytree(eqx.filter(g_ref, eqx.is_inexact_array))
    assert float(jnp.linalg.norm(b)) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))))
    # The training step reports the unrolled steps as its backward steps.
    optimizer = make_optimizer(config, 10)
    step = make_train_step(config, optimizer)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    images = jnp.stack([image, -image])
    _, _, m = step(model, opt_state, images, jnp.array([1, 2]), jax.random.key(1))
    assert float(m["fwd_steps"]) == k and float(m["bwd_steps"]) == k and bool(m["finite"])


@needs_data
def test_training_curve_is_recorded_per_window_of_steps(straight_run):
    """Each epoch record holds its training curve (means over windows of steps, against
    examples seen), so that a one-epoch run plots a curve, not a dot."""
    config, _, result, _ = straight_run
    steps = config.train_subset // config.batch_size
    examples = [p["examples"] for r in result.history for p in r["curve"]]
    assert len(examples) == 2 * min(steps, tr.CURVE_POINTS)
    assert examples == sorted(examples) and examples[-1] == 2 * steps * config.batch_size
    for r in result.history:
        assert r["examples"] == r["curve"][-1]["examples"]
        for p in r["curve"]:
            assert 0 <= p["acc"] <= 1 and p["fwd_steps"] >= 1 and np.isfinite(p["loss"])


# --------------------------------------------------------------------------- full recipes


def _run_cli(args: list[str], out: Path, timeout: float) -> list[dict]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fixedpoint_deq.mnist",
            "--data-dir",
            str(DATA_DIR),
            "--no-progress",
            "--out-dir",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(s) for s in (out / METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
@needs_data
def test_default_recipe_reaches_99_4_percent(tmp_path):
    """The default full run (about 50 minutes on 2 CPU cores): >= 99.4% on the 10,000
    test digits, <= 8 mean forward evaluations per training sample at the end of
    training, every test-set forward solve converged."""
    history = _run_cli([], tmp_path, timeout=2 * 3600)
    last = history[-1]
    assert last["epoch"] == Config().epochs
    assert last["test_acc"] >= 0.994, last
    assert last["fwd_steps"] <= 8.0, last
    assert last["test_fwd_converged"] == 1.0, last


@pytest.mark.slow
@needs_data
def test_quick_recipe_reaches_98_5_percent(tmp_path):
    """``--quick`` (a few minutes on 2 CPU cores): >= 98.5% on the full test set."""
    history = _run_cli(["--quick"], tmp_path, timeout=3600)
    assert len(history) == 1 and history[0]["test_acc"] >= 0.985, history
