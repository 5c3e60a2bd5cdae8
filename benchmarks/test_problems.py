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
    with pytest.raises(ValueError, match="already registered"):
        problems.register(problems.linear_contraction, grids=problems.SMOKE, n=50, rho=0.9)


@pytest.mark.parametrize("spec", problems.specs("smoke"), ids=lambda s: s.name)
def test_same_function_in_every_namespace(spec):
    """NumPy (SciPy's peer), JAX (ours) and torch (torchdeq's) compute the same F."""
    problem = spec.make()
    rng = np.random.default_rng(1)
    z = problem.z0 + 0.1 * rng.standard_normal(problem.z0.shape)
    ref = problem.residual(z, problem.params, np)
    out = np.asarray(problem.residual(jnp.asarray(z), problem.params_in(jnp), jnp))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    if importlib.util.find_spec("torch") is not None:
        import torch

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
    assert 0 < u.max() < 1.5  # the lower branch


def test_tanh_spectra():
    sym = problems.tanh_cell(64, 0.9, "sym")
    assert np.linalg.norm(sym.params["Wt"], 2) == pytest.approx(0.9)
    assert np.allclose(sym.params["Wt"], sym.params["Wt"].T)
    gauss = problems.tanh_cell(64, 0.9, "gauss")
    assert np.linalg.norm(gauss.params["Wt"], 2) == pytest.approx(0.9)
    assert max(abs(np.linalg.eigvals(gauss.params["Wt"]))) < 0.7


def test_counting_and_trace():
    """Our evaluations counted three ways agree: num_steps, the trace, the first hit."""
    problem = problems.specs("smoke")[0].make()
    adapter = peers.Ours("fp.Neumann", "picard", __import__("fixedpoint").Neumann)
    result = harness.evaluate(problem, adapter, timing=False)
    assert result.success and result.evals_to_tol == result.evals_used
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

    code = report.main(
        ["--smoke", "--problems", "linear-*", "--solvers", "fp.Anderson*", "--out", str(tmp_path), "--threads", "0", "--quiet"]
    )
    assert code == 0
    text = (tmp_path / "report.md").read_text()
    assert "linear-n50-rho0.9" in text and "fp.Anderson(m=5)" in text
    assert (tmp_path / "plots" / "linear-n50-rho0.9.png").exists()
    assert (tmp_path / "results.json").exists()
