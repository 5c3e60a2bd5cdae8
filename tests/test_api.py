"""The package's public surface: hyperparameter validation (one set of rules for every
class), the name-to-solver factories, the linear solvers' repr, the homes of the
backward-statistics helpers, the seed API's construction, the version and the wheel's
contents."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import fixedpoint as fp
from fixedpoint_deq import DEQ, FixedPointSolver


ROOT = Path(__file__).resolve().parents[1]

ROOT_FINDERS = (fp.Anderson, fp.Broyden, fp.Neumann)


# --------------------------------------------------------------------------- validation


# Evaluations to the fixed point of cos from 0 (float64) at tolerances 1e-1 and 1e-6.
COS_STEPS = {fp.Anderson: (3, 7), fp.Broyden: (3, 6), fp.Neumann: (5, 34)}
DOTTIE = 0.7390851332151607  # cos(z*) = z*


@pytest.mark.parametrize("cls", ROOT_FINDERS, ids=lambda c: c.__name__)
def test_traced_tolerances_are_accepted_under_jit(cls, enable_x64):
    """As `optx.FixedPointIteration(atol=x)` under `jit`: a tolerance that is a traced
    value is accepted (its range cannot be checked) and used by the stopping rule: one
    compilation runs both tolerances, each to its own step count and accuracy."""

    @jax.jit
    def solve(tol):
        solver = cls(rtol=tol, atol=tol, beta=tol * 0 + 1.0)
        y0 = jnp.zeros(3, jnp.float64)
        sol = optx.fixed_point(lambda y, _: jnp.cos(y), solver, y0, max_steps=200)
        return sol.value, sol.stats["num_steps"]

    for tol, steps in zip((1e-1, 1e-6), COS_STEPS[cls]):
        value, num_steps = solve(jnp.asarray(tol))
        assert int(num_steps) == steps, (tol, int(num_steps))
        # Stopped at |cos(y) - y| < tol (1 + |y|), so |y - z*| < tol (1 + z*) / (1 - L)
        # with L = sin(z*) = 0.674 the map's Lipschitz constant near z*.
        bound = tol * (1 + DOTTIE) / (1 - np.sin(DOTTIE))
        np.testing.assert_allclose(value, DOTTIE, rtol=0, atol=bound)


def test_traced_hyperparameters_of_linear_solvers_and_adjoints_are_accepted():
    @jax.jit
    def build_and_solve(tol, beta):
        solver = fp.linear.Neumann(rtol=tol, atol=tol, beta=beta, max_steps=100)
        operator = lx.MatrixLinearOperator(jnp.diag(jnp.array([-1.0, -2.0])))
        phantom = fp.PhantomAdjoint(steps=3, beta=beta)
        del phantom
        return lx.linear_solve(operator, jnp.ones(2), solver, throw=False).value

    np.testing.assert_allclose(build_and_solve(1e-6, 0.5), [-1.0, -0.5], rtol=1e-4)


def test_numpy_scalars_and_zero_d_arrays_are_accepted():
    # (The annotations say `int` / `float`; NumPy scalars are accepted all the same.)
    solver = fp.Anderson(m=np.int64(5), rtol=np.float32(1e-3), atol=np.array(1e-6))  # pyright: ignore[reportArgumentType]
    assert type(solver.m) is int and solver.m == 5
    assert type(fp.Broyden(memory=np.int32(7)).memory) is int
    assert type(fp.Neumann(trace_length=np.array(4)).trace_length) is int
    assert type(fp.linear.Anderson(max_steps=np.int64(9)).max_steps) is int  # pyright: ignore[reportArgumentType]
    assert type(fp.PhantomAdjoint(steps=np.int16(2)).steps) is int
    assert fp.Broyden(line_search=np.bool_(True)).line_search is True
    assert type(DEQ(lambda z, x: z, max_steps=np.int64(4)).max_steps) is int
    assert type(FixedPointSolver(anderson_m=np.int64(2)).anderson_m) is int
    # They work inside a jitted solve (the integers stay static).
    sol = eqx.filter_jit(
        lambda s: optx.fixed_point(lambda y, _: 0.5 * y + 1.0, s, jnp.zeros(2), max_steps=50)
    )(solver)
    # z* = 2; stopped at |g(y)| < atol + rtol |y|, so |y - z*| <= 2 (1e-6 + 2e-3).
    np.testing.assert_allclose(sol.value, 2.0, rtol=0, atol=2 * (1e-6 + 1e-3 * 2.0))


BAD = [
    (fp.Anderson, dict(rtol="1e-3"), "rtol", "a str"),
    (fp.Anderson, dict(atol="0"), "atol", "a str"),
    (fp.Anderson, dict(m="5"), "`m`", "a str"),
    (fp.Anderson, dict(m=True), "`m`", "a bool"),
    (fp.Anderson, dict(m=5.0), "`m`", "a float"),
    (fp.Anderson, dict(beta=True), "beta", "a bool"),
    (fp.Anderson, dict(rtol=float("nan")), "rtol", ">= 0"),
    (fp.Anderson, dict(rtol=np.ones(2)), "rtol", "ndarray"),
    (fp.Anderson, dict(beta=1.5), "beta", r"in \(0, 1\]"),
    (fp.Broyden, dict(line_search="yes"), "line_search", "True or False"),
    (fp.Neumann, dict(divergence_factor=1.0), "divergence_factor", "> 1"),
    (fp.Neumann, dict(norm="max"), "norm", "callable"),
    (fp.linear.Neumann, dict(max_steps="3"), "max_steps", ">= 1"),
    (fp.PhantomAdjoint, dict(beta="0.5"), "beta", r"in \(0, 1\]"),
]


@pytest.mark.parametrize(
    "cls, kwargs, name, message", BAD, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, *_ in BAD]
)
def test_invalid_values_are_refused_at_construction(cls, kwargs, name, message):
    with pytest.raises(ValueError, match=name) as info:
        cls(**kwargs)
    assert re.search(message, str(info.value)), str(info.value)


def test_traced_integers_are_refused_with_a_clear_message():
    @jax.jit
    def build(m):
        return fp.Anderson(m=m).rtol

    with pytest.raises(ValueError, match="`m` must be a concrete integer"):
        build(3)


def test_deq_and_seed_use_the_same_rules():
    with pytest.raises(ValueError, match="`max_steps` must be an integer >= 1"):
        DEQ(lambda z, x: z, max_steps=0)
    with pytest.raises(ValueError, match="`init` must be one of"):
        DEQ(lambda z, x: z, init="ones")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`anderson_b` must be a real number in"):
        FixedPointSolver(anderson_b="0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`fwd_solver` must be one of 'anderson'"):
        FixedPointSolver(fwd_solver="newton")
    with pytest.raises(ValueError, match="`bwd_tol` must be a real number >= 0"):
        FixedPointSolver(bwd_tol=-1.0)


def test_deq_takes_solver_and_adjoint_names_and_refuses_others():
    cell = lambda z, x: 0.5 * jnp.tanh(z) + x
    assert DEQ(cell, solver="anderson").solver == DEQ(cell).solver
    assert DEQ(cell, adjoint="implicit").adjoint == DEQ(cell).adjoint
    for name, cls in [("broyden", fp.Broyden), ("neumann", fp.Neumann), ("picard", fp.Neumann)]:
        solver = DEQ(cell, solver=name).solver
        assert type(solver) is cls and solver.rtol == 1e-3 and solver.norm is optx.rms_norm
    assert isinstance(DEQ(cell, adjoint="phantom").adjoint, fp.PhantomAdjoint)
    assert isinstance(DEQ(cell, adjoint="jfb").adjoint, fp.JacobianFreeAdjoint)
    z, record = DEQ(cell, solver="broyden", adjoint="jfb")(jnp.ones(3))
    np.testing.assert_allclose(z, cell(z, jnp.ones(3)), atol=1e-3)
    with pytest.raises(ValueError, match="`solver` must be one of 'anderson', 'broyden'"):
        DEQ(cell, solver="newton")
    with pytest.raises(ValueError, match="`adjoint` must be one of 'implicit', 'phantom', 'jfb'"):
        DEQ(cell, adjoint="exact")
    with pytest.raises(ValueError, match="`solver` must be an optimistix root finder"):
        DEQ(cell, solver=fp.ImplicitAdjoint())  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`adjoint` must be an `optx.AbstractAdjoint`"):
        DEQ(cell, adjoint=fp.Anderson())  # pyright: ignore[reportArgumentType]


def test_deq_state_shaped_unlike_x_needs_z0_and_says_so():
    """A state of 4 driven by an input of 3: without `z0` the start is shaped like `x`;
    the error names `z0` (at trace time, under `jit` too) instead of failing inside the
    cell. A `jax.ShapeDtypeStruct` for `z0` gives the state's shape."""
    w = 0.1 * jnp.ones((4, 4))
    u = jnp.ones((4, 3))
    deq = DEQ(lambda z, x: jnp.tanh(w @ z + u @ x))
    x = jnp.ones(3)
    message = r"shaped like the input `x` \(float32\[3\]\).*pass `z0`"
    for call, arg in ((deq, x), (eqx.filter_jit(deq), x), (jax.vmap(deq), jnp.ones((2, 3)))):
        with pytest.raises(ValueError, match=message):
            call(arg)
    # A cell that runs on a start shaped like `x` but returns another shape.
    with pytest.raises(ValueError, match=r"(?s)maps float32\[3\] to float32\[4\].*pass `z0`"):
        DEQ(lambda z, x: jnp.tanh(u @ z))(x)
    # Given `z0`: as arrays, or as its shape and dtype (started from `init`).
    z_explicit, _ = deq(x, z0=jnp.zeros(4))
    z_struct, record = eqx.filter_jit(deq)(x, z0=jax.ShapeDtypeStruct((4,), jnp.float32))
    np.testing.assert_array_equal(z_explicit, z_struct)
    assert z_struct.shape == (4,) and bool(record.converged)
    random = DEQ(deq.cell, init="random", init_scale=0.1)
    z_random, _ = random(x, z0=jax.ShapeDtypeStruct((4,), jnp.float32), key=jax.random.key(0))
    np.testing.assert_allclose(z_random, z_explicit, atol=1e-3)
    with pytest.raises(ValueError, match=r"failed on the starting state `z0` \(float32\[5\]\)"):
        deq(x, z0=jnp.zeros(5))


# --------------------------------------------------------------------------- factories


@pytest.mark.parametrize(
    "name, cls",
    [
        ("anderson", fp.Anderson),
        ("broyden", fp.Broyden),
        ("neumann", fp.Neumann),
        ("picard", fp.Neumann),
    ],
)
def test_solver_from_name(name, cls):
    solver = fp.solver_from_name(name, rtol=1e-3, beta=0.5)
    assert isinstance(solver, fp.AbstractFixedPointRootFinder)
    assert isinstance(solver, optx.AbstractRootFinder)
    assert isinstance(solver, ROOT_FINDERS) and type(solver) is cls
    assert solver.rtol == 1e-3 and solver.beta == 0.5
    linear = fp.linear.solver_from_name(name, rtol=1e-3, max_steps=7, beta=0.5)
    root = linear.root_finder
    assert isinstance(root, ROOT_FINDERS) and type(root) is cls
    assert linear.max_steps == 7 and root.beta == 0.5
    assert isinstance(linear, lx.AbstractLinearSolver)


def test_solver_from_name_refuses_unknown_names_listing_the_known_ones():
    for factory in (fp.solver_from_name, fp.linear.solver_from_name):
        with pytest.raises(ValueError, match="'anderson', 'broyden', 'neumann', 'picard'"):
            factory("gmres")
    with pytest.raises(TypeError):
        fp.solver_from_name("neumann", m=5)  # Neumann has no history


# --------------------------------------------------------------------------- backward statistics


def test_backward_stats_are_summed_and_stripped_over_a_gradient_tree():
    stats = fp.BackwardStats(num_steps=2.0, residual_norm=0.5, failed=0.0)
    grads = {"a": stats, "b": [jnp.ones(2), fp.BackwardStats(num_steps=3.0)]}
    total = fp.backward_stats(grads)
    assert total is not None and float(total.num_steps) == 5.0
    assert float(total.residual_norm) == 0.5
    stripped = fp.without_backward_stats(grads)
    assert float(stripped["a"].num_steps) == 0.0
    np.testing.assert_array_equal(stripped["b"][0], 1.0)
    assert fp.backward_stats({"x": jnp.ones(1)}) is None


def test_abstract_base_declares_the_required_fields():
    class Incomplete(fp.AbstractFixedPointRootFinder):
        rtol: float = 1e-3

        def init(self, fn, y, args, options, f_struct, aux_struct, tags):
            raise NotImplementedError

        def step(self, fn, y, args, options, state, tags):
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract attributes") as info:
        Incomplete()  # pyright: ignore[reportCallIssue]
    for name in ("atol", "norm", "divergence_factor", "divergence_patience", "trace_length"):
        assert repr(name) in str(info.value), str(info.value)


# --------------------------------------------------------------------------- the seed API


@pytest.mark.parametrize("fwd", ["anderson", "broyden", "neumann", "picard"])
@pytest.mark.parametrize("bwd", ["anderson", "broyden", "neumann", "picard"])
def test_seed_solver_builds_every_pair_through_the_factories(fwd, bwd):
    seed = FixedPointSolver(fwd_solver=fwd, bwd_solver=bwd, bwd_iterations=4, anderson_m=2)
    forward = seed._forward_solver()
    backward = seed._backward_solver()
    assert isinstance(forward, fp.AbstractFixedPointRootFinder)
    assert isinstance(backward, fp.linear.AbstractFixedPointLinearSolver)
    # The seed's semantics: "neumann" sums n + 1 terms, the others run n steps.
    assert backward.max_steps == (5 if bwd == "neumann" else 4)
    if fwd == "anderson":
        assert isinstance(forward, fp.Anderson)
        assert forward.m == 2 and forward.beta == 0.5


def test_seed_solver_runs():
    seed = FixedPointSolver(fwd_solver="anderson", bwd_solver="neumann", fwd_iterations=30)
    a = {"w": 0.3 * jnp.eye(3), "b": jnp.arange(3.0)}

    def f(x, a):
        return jnp.tanh(a["w"] @ x + a["b"])

    x_star, jac_reg, stats = seed(f, jnp.zeros(3), a, jax.random.key(0))
    np.testing.assert_allclose(x_star, f(x_star, a), atol=1e-3)
    assert bool(stats["fwd_converged"]) and jnp.isfinite(jac_reg)


# --------------------------------------------------------------------------- packaging


def test_version_comes_from_one_place():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fixedpoint.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fp.__version__)
    assert f"## {fp.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_wheel_ships_only_the_two_packages(tmp_path):
    """Build the wheel (offline: no build isolation, setuptools of this environment)
    and list its top-level names: `benchmarks` and `tests` must not be in it."""
    # Offline, so without build isolation: the environment's setuptools must satisfy
    # pyproject's build requirement (`.ci/run` upgrades it).
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (pyproject's build requirement)")
    # A copy of the sources (with `benchmarks/` and `tests/` beside the packages, as in
    # the repository), so that the build leaves nothing in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fixedpoint", "fixedpoint_deq", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    dist = tmp_path / "dist"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = dist.glob("fixedpoint-*.whl")
    assert wheel.name.startswith(f"fixedpoint-{fp.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fixedpoint", "fixedpoint_deq"}, top
    assert "fixedpoint_deq/mnist/train.py" in names
    assert "fixedpoint/_validate.py" in names
