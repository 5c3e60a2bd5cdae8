"""`fixedpoint.internal`, what packages built on `fixedpoint` use: the one table of solver
names and stopping rules (and that every API takes its names and tolerances from it),
the explicit opt-in to batched solves in one loop (a wrapper opts in by delegation, no
inheritance), and the check that optimistix's private solve loop still has the layout
`fixedpoint/_optx_compat.py` relies on."""

import ast
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
import pytest

import fixedpoint as fp
import fixedpoint.internal as fpi
import fixedpoint_deq as fd
from fixedpoint import _optx_compat
from fixedpoint_deq import _layer
from fixedpoint_deq.mnist import build, config


ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ optimistix's loop


def test_optimistix_private_loop_has_the_expected_layout():
    """Fails, naming the installed optimistix version, when optimistix's private
    `_iterate` / `iterative_solve` / `AbstractAdjoint.apply` change the layout that
    `fixedpoint/_optx_compat.py` unpacks."""
    problems = _optx_compat.optimistix_mismatches()
    assert not problems, (
        f"optimistix {optx.__version__}: its private solve loop differs from what "
        f"fixedpoint/_optx_compat.py expects ({_optx_compat.WRITTEN_FOR}): {problems}"
    )
    _optx_compat.check_optimistix()


def test_a_changed_optimistix_loop_is_reported_with_its_version(monkeypatch):
    from optimistix import _iterate as optx_iterate

    def _iterate(inputs, extra):  # a new argument, and a new input field
        (fn, solver, y0, args, options, max_steps, f_struct, aux_struct, tags, new, loop) = inputs
        loop(None, None, None, max_steps=max_steps)
        return y0, (1, 2, 3, 4, 5, 6)

    monkeypatch.setattr(optx_iterate, "_iterate", _iterate)
    problems = _optx_compat.optimistix_mismatches()
    assert any("takes ['inputs', 'extra']" in p for p in problems), problems
    assert any("unpacks its inputs" in p for p in problems), problems
    with pytest.raises(RuntimeError, match=re.escape(f"optimistix {optx.__version__}")):
        _optx_compat.check_optimistix()


def test_inputs_of_another_length_name_the_optimistix_version():
    with pytest.raises(RuntimeError, match=re.escape(f"optimistix {optx.__version__}")):
        fpi.as_inputs((1, 2, 3))
    with pytest.raises(RuntimeError, match="results besides the solution"):
        fpi.as_residual((1, 2))


# ------------------------------------------------------------------ one-loop opt-in


def test_one_loop_is_opted_into_by_our_solvers_and_by_delegating_wrappers():
    correction = fd.FixedPointCorrection(steps=(2,))
    assert fpi.keeps_finished_state(fp.Anderson())
    assert fpi.keeps_finished_state(fp.Broyden())
    assert fpi.keeps_finished_state(correction.recording(fp.Anderson()))
    assert not fpi.keeps_finished_state(optx.Newton(rtol=1e-3, atol=1e-3))
    assert not fpi.keeps_finished_state(correction.recording(optx.Newton(rtol=1e-3, atol=1e-3)))
    # The wrapper is a plain optimistix root finder (no multiple inheritance).
    recording = correction.recording(fp.Anderson())
    assert not isinstance(recording, fp.AbstractFixedPointRootFinder)
    assert isinstance(recording, optx.AbstractRootFinder)


def test_recorded_batch_runs_in_one_loop_without_selecting_the_history():
    """`jax.vmap` of a DEQ with fixed-point correction (the recording wrapper around
    Anderson) runs one loop over the batch: no per-step select over the history."""
    n, m, batch = 6, 7, 3
    w = 0.5 * jnp.eye(n)
    deq = fd.DEQ(
        lambda z, x: jnp.tanh(w @ z) + x,
        solver=fp.Anderson(m=m, rtol=1e-6, atol=1e-6),
        adjoint=fp.ImplicitAdjoint(throw=False),
        max_steps=10,
        correction=fd.FixedPointCorrection(steps=(2, 4)),
    )
    xs = jnp.linspace(0.1, 1.0, batch * n).reshape(batch, n)
    hlo = jax.jit(jax.vmap(lambda x: deq(x)[0])).lower(xs).as_text()
    history = f"tensor<{batch}x{m}x{n}xf32>"
    selects = [line for line in hlo.splitlines() if "stablehlo.select" in line]
    assert selects
    assert not [line for line in selects if re.search(re.escape(history) + r"\s*$", line)]
    # And each sample's states are those of its own solve.
    _, batched = jax.vmap(deq)(xs)
    for i in range(batch):
        _, alone = deq(xs[i])
        assert batched.states is not None and alone.states is not None
        assert jnp.allclose(batched.states[i], alone.states, rtol=1e-5, atol=1e-6)
        assert batched.num_steps[i] == alone.num_steps


# ------------------------------------------------------------------ the name registry


def test_every_api_takes_its_solver_names_from_the_registry():
    names = fpi.solver_names()
    assert names == ("anderson", "broyden", "neumann", "picard")
    assert fpi.solver_names(aliases=False) == ("anderson", "broyden", "neumann")
    assert _layer.SOLVER_NAMES == names
    assert config.FORWARD_SOLVERS == config.BACKWARD_SOLVERS == ("anderson", "broyden", "neumann")
    # The factories of `fixedpoint` and `fixedpoint.linear` build the registry's classes.
    for name, entry in fpi.SOLVERS.items():
        assert type(fp.solver_from_name(name)) is entry.root_finder is type(fpi.root_finder(name))
        linear = fp.linear.solver_from_name(name)
        assert type(linear) is entry.linear_solver is type(fpi.linear_solver(name))
        if entry.alias_of is not None:
            original = fpi.SOLVERS[entry.alias_of]
            assert original.alias_of is None
            assert (original.root_finder, original.linear_solver) == (
                entry.root_finder,
                entry.linear_solver,
            )


@pytest.mark.parametrize(
    "build_it, param",
    [
        (lambda: fd.DEQ(lambda z, x: z, solver="newton"), "solver"),
        (lambda: fd.DEQ(lambda z, x: z, eval_solver="newton"), "eval_solver"),
        (lambda: fd.FixedPointSolver(fwd_solver="newton"), "fwd_solver"),
        (lambda: fd.FixedPointSolver(bwd_solver="newton"), "bwd_solver"),
        (lambda: config.Config(solver="newton").check(), "solver"),
        (lambda: config.Config(backward_solver="picard").check(), "backward_solver"),
        (lambda: fpi.root_finder("newton"), "name"),
        (lambda: fp.solver_from_name("newton"), "name"),
    ],
)
def test_an_unknown_name_is_refused_naming_the_parameter(build_it, param):
    with pytest.raises(ValueError, match=f"`{param}` must be one of 'anderson', 'broyden'"):
        build_it()


def test_stopping_rules_give_each_api_its_tolerances():
    rms = optx.rms_norm
    assert fpi.DEQ_FORWARD() == dict(rtol=1e-3, atol=1e-5, norm=rms)
    assert fpi.DEQ_BACKWARD() == dict(rtol=1e-3, atol=1e-9, norm=rms)
    assert fpi.SEED(0.5) == dict(rtol=0.5, atol=0.5 * 1e-2)
    assert fpi.TRAINER_FORWARD(0.25) == dict(rtol=0.25, atol=0.25, norm=rms)
    assert fpi.TRAINER_BACKWARD(0.25) == dict(rtol=0.25, atol=1e-9, norm=rms)
    # The DEQ layer: its defaults and a solver given by name.
    cell = lambda z, x: z
    deq = fd.DEQ(cell)
    assert deq.solver == fp.Anderson(m=5, beta=1.0, rtol=1e-3, atol=1e-5, norm=rms)
    assert fd.DEQ(cell, solver="broyden").solver == fp.Broyden(rtol=1e-3, atol=1e-5, norm=rms)
    expected = fp.linear.Anderson(m=5, rtol=1e-3, atol=1e-9, norm=rms, max_steps=30)
    assert deq.adjoint == fp.ImplicitAdjoint(expected, throw=False)
    # The seed API.
    seed = fd.FixedPointSolver(fwd_tol=1e-3, bwd_tol=1e-2, bwd_solver="broyden")
    assert seed._forward_solver() == fp.Anderson(m=3, beta=0.5, rtol=1e-3, atol=1e-3 * 1e-2)
    assert seed._backward_solver() == fp.linear.Broyden(rtol=1e-2, atol=1e-2 * 1e-2, max_steps=3)
    assert fd.FixedPointSolver().fwd_tol == fd.FixedPointSolver().bwd_tol == 1e-4
    # The trainer.
    cfg = config.Config(fwd_tol=0.03, backward="implicit", backward_tol=0.02)
    assert (config.Config().fwd_tol, config.Config().backward_tol) == (1e-2, 1e-2)
    assert build.make_solver(cfg) == fp.Anderson(m=5, beta=1.0, rtol=0.03, atol=0.03, norm=rms)
    linear = fp.linear.Anderson(m=5, rtol=0.02, atol=1e-9, norm=rms, max_steps=20)
    assert build.make_adjoint(cfg) == fp.ImplicitAdjoint(linear, throw=False)


# ------------------------------------------------------------------ no private imports


def _fixedpoint_imports(path: pathlib.Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
    return {m for m in modules if m == "fixedpoint" or m.startswith("fixedpoint.")}


def test_packages_built_on_fixedpoint_use_its_public_modules_only():
    """`fixedpoint_deq` and the benchmarks import `fixedpoint`, `fixedpoint.linear`
    and `fixedpoint.internal`, never a private module (except the SHINE experiment,
    which reads Broyden's private state)."""
    allowed = {"fixedpoint", "fixedpoint.linear", "fixedpoint.internal"}
    exceptions = {"benchmarks/shine_adjoint.py": {"fixedpoint._solver.broyden"}}
    found = {}
    for folder in ("fixedpoint_deq", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            private = _fixedpoint_imports(path) - allowed - exceptions.get(rel, set())
            if private:
                found[rel] = sorted(private)
    assert not found, found


def test_internal_exports_what_it_documents():
    for name in fpi.__all__:
        assert getattr(fpi, name) is not None
        assert f"`{name}`" in (fpi.__doc__ or ""), name
    assert isinstance(fpi.backward_stats_like(fp.BackwardStats(), 3, 0.5, 1), fp.BackwardStats)
    assert eqx.tree_equal(
        fpi.backward_stats_like(fp.BackwardStats(), 3, 0.5, 1),
        fp.BackwardStats(num_steps=3.0, residual_norm=0.5, failed=1.0),
    )
