"""The problem suite and the measurement harness themselves: known solutions, the same
function in NumPy, JAX and torch, evaluation counting, and the report end to end."""

import importlib.util
import math

import jax.numpy as jnp
import numpy as np
import pytest

from . import harness, peers, problems


pytestmark = pytest.mark.usefixtures("pinned_threads", "x64")


def test_names_unique_and_lazy():
    for grid in problems.GRIDS:
        names = [spec.name for spec in problems.specs(grid)]
        assert len(names) == len(set(names)), grid
    spec = problems.specs("smoke")[0]
    assert spec.make().name == spec.name
    again = problems.spec(problems.linear_contraction, grids=problems.SMOKE, n=50, rho=0.9)
    with pytest.raises(ValueError, match="already registered"):
        problems.registry(problems.REGISTRY + (again,))


@pytest.mark.parametrize("spec", problems.specs("smoke"), ids=lambda s: s.name)
def test_same_function_in_every_namespace(spec):
    """NumPy (SciPy's peer), JAX (ours) and torch (torchdeq's) compute the same F."""
    try:
        problem = spec.make()
    except problems.Unavailable as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(1)
    z = problem.z0 + 0.1 * rng.standard_normal(problem.z0.shape)
    ref = problem.residual(z, problem.params, np)
    out = np.asarray(problem.residual(jnp.asarray(z), problem.params_in(jnp), jnp))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    if importlib.util.find_spec("torch") is not None:
        import torch  # pyright: ignore[reportMissingImports]

        out = problem.residual(torch.from_numpy(z), problem.params_in(torch), torch).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert problem.relative_residual(problem.z0) == pytest.approx(1.0)


def test_linear_closed_form():
    problem = problems.linear_contraction(50, 0.9)
    assert problem.relative_residual(problem.reference()) < 1e-13
    eig = np.linalg.eigvalsh(problem.params["At"])
    assert max(abs(eig)) == pytest.approx(0.9)


def test_h_equation_moment():
    """The zeroth moment of the H-function is 2 (1 - sqrt(1 - c)) / c."""
    c = 0.9
    problem = problems.h_equation(100, c)
    h = problem.reference()
    assert problem.relative_residual(h) < 1e-12
    assert h.mean() == pytest.approx(2 * (1 - math.sqrt(1 - c)) / c, rel=1e-6)


def test_bratu_and_tridiagonal_references():
    for problem in (problems.bratu2d(8, 6.0), problems.broyden_tridiagonal(50)):
        assert problem.relative_residual(problem.reference()) < 1e-12
    u = problems.bratu2d(8, 6.0).reference()
    # The lower branch, to the accuracy of the reference (residual < 1e-12).
    assert u.max() == pytest.approx(0.7748951534158, rel=1e-10)


def test_tanh_spectra():
    sym = problems.tanh_cell(64, 0.9, "sym")
    assert np.linalg.norm(sym.params["Wt"], 2) == pytest.approx(0.9)
    assert np.allclose(sym.params["Wt"], sym.params["Wt"].T)
    gauss = problems.tanh_cell(64, 0.9, "gauss")
    assert np.linalg.norm(gauss.params["Wt"], 2) == pytest.approx(0.9)
    # Non-normal: its spectral radius is about half its norm.
    assert max(abs(np.linalg.eigvals(gauss.params["Wt"]))) == pytest.approx(0.45793041, rel=1e-7)


def test_counting_and_trace():
    """Our evaluations counted three ways agree: num_steps, the trace, the first hit."""
    problem = problems.specs("smoke")[0].make()
    adapter = peers.Ours("fp.Neumann", "picard")
    result = harness.evaluate(problem, adapter, timing=False)
    assert result.success and result.evals_to_tol == result.evals_used
    assert result.curve is not None
    assert result.curve[-1] <= harness.TOL < result.curve[-2]
    # Plain iteration on z = A z + b from 0 with the same stopping rule, by hand.
    a, b = problem.params["At"].T, problem.params["b"]
    z, k = problem.z0, 0
    while True:
        k += 1
        fz = a @ z + b
        if np.linalg.norm(fz - z) <= harness.TOL * problem.scale:
            break
        z = fz
    assert result.evals_to_tol == k


def test_scipy_counts_every_call():
    pytest.importorskip("scipy")
    problem = problems.specs("smoke")[0].make()
    adapter = next(a for a in peers.solvers() if a.name.startswith("scipy.anderson"))
    result = harness.evaluate(problem, adapter, timing=False, budget=7)
    assert result.evals_used == 7 and not result.success  # the hard cap of the budget


def test_batched_evals_are_the_slowest_state():
    rows = np.array([[1.0, 1.0], [1e-9, 0.5], [np.nan, 1e-9]])
    assert harness.evals_to_tol(rows, 1e-8) == 3
    assert harness.evals_to_tol(rows[:2], 1e-8) is None
    np.testing.assert_allclose(harness.curve(rows, 1e-8), [1.0, 0.5, 1e-9])


def test_report_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from . import report

    # Our Anderson and SciPy's of the same history: one target to check.
    code = report.main(
        [
            "--smoke",
            "--problems",
            "linear-*",
            "--solvers",
            "*nderson(*=5)",
            "--out",
            str(tmp_path),
            "--threads",
            "0",
            "--quiet",
        ]
    )
    assert code == 0
    text = (tmp_path / "report.md").read_text()
    assert (
        "linear-n50-rho0.9" in text and "fp.Anderson(m=5)" in text and "scipy.anderson(M=5)" in text
    )
    assert "Target checks failed: **0** of 1." in text
    assert (tmp_path / "plots" / "linear-n50-rho0.9.png").exists()
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--tol", "-1"),
        ("--tol", "nan"),
        ("--tol", "0"),
        ("--tol", "1"),
        ("--tol", "inf"),
        ("--budget", "0"),
        ("--budget", "-3"),
        ("--threads", "-1"),
    ],
)
def test_report_refuses_invalid_options(option, value, tmp_path, capsys):
    from . import report

    with pytest.raises(SystemExit) as info:
        report.main(["--smoke", option, value, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert f"argument {option}: must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_is_no_success_when_nothing_was_checked(tmp_path, capsys):
    """Our Anderson alone: results, but no peer to check a target against."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from . import report

    code = report.main(
        [
            "--smoke",
            "--problems",
            "linear-*",
            "--solvers",
            "fp.Anderson*",
            "--out",
            str(tmp_path),
            "--threads",
            "0",
            "--quiet",
            "--no-plots",
        ]
    )
    assert code == 1
    assert "no target was checked" in capsys.readouterr().err
    assert "**No target was checked**" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------------
# The MNIST DEQ cell.


def _mnist_or_skip(**kwargs):
    try:
        return problems.mnist_deq_cell(**kwargs)
    except problems.Unavailable as e:
        pytest.skip(str(e))


def _model_cell_residual(model, problem, z):
    """F(z) = f(z) - z computed by the model's own cell (float32, channels-last)."""
    import jax

    h = model.state_side
    c = problem.dim // (h * h)
    z4 = jnp.asarray(z.reshape(-1, h, h, c), jnp.float32)
    x4 = jnp.asarray(problem.params["x"].reshape(-1, h, h, c), jnp.float32)
    out = jax.vmap(model.deq.cell)(z4, x4)
    return np.asarray(out, np.float64).reshape(z.shape) - z


def _check_against_model(problem, model):
    rng = np.random.default_rng(2)
    z = 0.5 * rng.standard_normal(problem.z0.shape)
    ref = problem.residual(z, problem.params, np)
    mine = _model_cell_residual(model, problem, z)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_mnist_random_cell_is_the_model_cell():
    from fixedpoint_deq.mnist.build import make_model
    from fixedpoint_deq.mnist.config import Config

    problem = _mnist_or_skip(weights="random", batch=2, width=4)
    with __import__("jax").enable_x64(False):
        model = make_model(Config(width=4, seed=0))
    _check_against_model(problem, model)
    # The injection is the model's projection of the first test digits (not zeros).
    assert np.abs(problem.params["x"]).max() > 1.0
    assert problem.dim == model.state_side**2 * 4 and problem.batch_size == 2


@pytest.mark.slow  # (about 25 s: it trains a model; run with -m slow)
def test_mnist_trained_cell_from_a_checkpoint(tmp_path, monkeypatch, compile_cache):
    """Train a tiny model for a few steps, write its checkpoint, and build the trained
    problem from it: the same cell as the model's, a Newton-Krylov reference, and our
    solvers and SciPy's reaching the common tolerance on it."""
    from fixedpoint_deq.mnist.config import Config
    from fixedpoint_deq.mnist.train import train

    data_dir = problems.mnist_data_dir()
    _mnist_or_skip(weights="random", batch=1, width=4)  # skips without the digits
    missing = tmp_path / "none"
    with pytest.raises(problems.Unavailable, match="no checkpoint in .*none"):
        problems.mnist_deq_cell(weights="trained", batch=2, checkpoint=str(missing))

    config = Config(
        data_dir=data_dir,
        width=4,
        batch_size=32,
        epochs=1,
        train_subset=128,
        test_subset=64,
        max_steps=8,
        warmup_steps=2,
        eval_batch_size=64,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    with __import__("jax").enable_x64(False):
        result = train(config, progress=False)
    monkeypatch.setenv(problems.ENV_MNIST_CHECKPOINT, str(tmp_path / "ckpt"))
    problem = problems.mnist_deq_cell(weights="trained", batch=2)
    assert "epoch 1" in problem.description
    assert problem.dim == result.model.state_side**2 * 4
    _check_against_model(problem, result.model)
    z = problem.reference()
    assert problem.relative_residual(z) < 1e-12
    for adapter in peers.solvers(cache=compile_cache):
        if adapter.name in ("fp.Anderson(m=5)", "fp.Broyden(memory=30)", "scipy.anderson(M=5)"):
            r = harness.evaluate(problem, adapter, timing=False)
            if r.status == "skipped":
                continue
            assert r.success, (adapter.name, r)
            assert r.evals_to_tol is not None and r.evals_used is not None
            assert r.evals_to_tol <= r.evals_used


def test_report_lists_unavailable_problems(tmp_path, monkeypatch):
    from . import report

    monkeypatch.setenv(problems.ENV_MNIST_CHECKPOINT, str(tmp_path / "nothing-here"))
    spec = next(s for s in problems.specs("smoke") if s.name.startswith("mnist-deq-trained"))
    with pytest.raises(problems.Unavailable, match="nothing-here"):
        spec.make()
    code = report.main(
        [
            "--smoke",
            "--problems",
            "mnist-deq-trained*",
            "--out",
            str(tmp_path / "out"),
            "--mnist-checkpoint",
            str(tmp_path / "nothing-here"),
            "--threads",
            "0",
            "--quiet",
            "--no-plots",
        ]
    )
    assert code == 1  # nothing was run, so nothing was checked
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Problems not run" in text and "nothing-here" in text


def test_scipy_per_state_solves_each_state_on_its_own():
    """``per_state=True``: one SciPy solve per state of a batch, each stopping on its own
    (a state's trace ends where that state met the tolerance), the slowest counted."""
    pytest.importorskip("scipy")
    problem = next(s for s in problems.specs("smoke") if s.name.startswith("tanh-sym-B")).make()
    adapters = {a.name: a for a in peers.solvers()}
    joint = harness.evaluate(problem, adapters["scipy.anderson(M=5)"], timing=False)
    per_state = harness.evaluate(problem, adapters["scipy.anderson(M=5,per_state)"], timing=False)
    assert joint.success and per_state.success
    prepared = adapters["scipy.anderson(M=5,per_state)"].prepare(
        problem, tol=harness.TOL, budget=harness.BUDGET
    )
    trace = prepared.trace()
    assert trace.rows.shape[1] == problem.batch_size
    lengths = [int(np.isfinite(trace.rows[:, b]).sum()) for b in range(problem.batch_size)]
    assert max(lengths) == trace.evals_used == per_state.evals_used
    # The states stop at different counts (float64 SciPy; the same with every OpenBLAS
    # kernel tried: SkylakeX, Haswell, Sandybridge, Prescott).
    assert lengths == [20, 16, 20, 16]
    for b, k in enumerate(lengths):  # each state stops at its first point below tol
        assert (
            trace.rows[k - 1, b] <= harness.TOL < np.nanmin(trace.rows[: k - 1, b], initial=np.inf)
        )
    assert adapters["scipy.anderson(M=5,per_state)"].inapplicable(problems.specs("smoke")[0].make())
