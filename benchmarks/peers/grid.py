"""The solver configurations compared in each grid, and which peers are installed."""

from __future__ import annotations

import importlib.util

from .base import Adapter, CompileCache
from .jaxopt_peer import Jaxopt
from .optimistix_peer import Optx
from .ours import Ours
from .scipy_peer import Scipy
from .torchdeq_peer import TorchDEQ


def solvers(grid: str = "default", *, cache: CompileCache | None = None) -> list[Adapter]:
    """The solver configurations compared (``grid="full"`` adds more settings). The JAX
    adapters keep their compilations in `cache` (default: a new one for this list)."""
    full = grid == "full"
    cache = CompileCache() if cache is None else cache
    ours: list[Adapter] = [
        Ours("fp.Anderson(m=5)", "anderson", differences=5, m=5, cache=cache),
        Ours("fp.Broyden(memory=30)", "broyden", differences=30, memory=30, cache=cache),
        Ours("fp.Neumann", "picard", cache=cache),
    ]
    if full:
        ours += [
            Ours("fp.Anderson(m=10)", "anderson", differences=10, m=10, cache=cache),
            Ours(
                "fp.Anderson(m=5,beta=0.5)", "anderson", differences=5, m=5, beta=0.5, cache=cache
            ),
            Ours("fp.Anderson(m=20)", "anderson", differences=20, m=20, cache=cache),
            Ours("fp.Broyden(memory=10)", "broyden", differences=10, memory=10, cache=cache),
            Ours(
                "fp.Broyden(memory=30,line_search)",
                "broyden",
                differences=30,
                memory=30,
                line_search=True,
                cache=cache,
            ),
            Ours("fp.Neumann(beta=0.5)", "picard", beta=0.5, cache=cache),
            Ours(
                "fp.Anderson(m=5,adaptive_beta)",
                "anderson",
                differences=5,
                m=5,
                adaptive_beta=True,
                cache=cache,
            ),
            Ours(
                "fp.Anderson(m=5,periodic_restart)",
                "anderson",
                differences=5,
                m=5,
                periodic_restart=True,
                cache=cache,
            ),
            Ours(
                "fp.Broyden(memory=30,update=bad)",
                "broyden",
                differences=30,
                memory=30,
                update="bad",
                cache=cache,
            ),
        ]
    peers: list[Adapter] = [
        Optx("optx.FixedPointIteration", "picard", cache=cache),
        Optx("optx.Newton", "newton", cache=cache),
        Optx("optx.Chord", "chord", cache=cache),
        Jaxopt(
            "jaxopt.AndersonAcceleration(history_size=6)", "anderson", differences=5, cache=cache
        ),
        Jaxopt("jaxopt.FixedPointIteration", "picard", cache=cache),
        Jaxopt("jaxopt.Broyden(history_size=30)", "broyden", differences=30, cache=cache),
        Scipy("scipy.anderson(M=5)", "anderson", differences=5),
        Scipy("scipy.anderson(M=5,per_state)", "anderson", differences=5, per_state=True),
        Scipy("scipy.broyden1(max_rank=30)", "broyden", differences=30),
        Scipy("scipy.newton_krylov", "newton-krylov"),
        TorchDEQ("torchdeq.anderson(m=6)", "anderson", differences=5),
        TorchDEQ("torchdeq.broyden(LBFGS_thres=30)", "broyden", differences=30),
        TorchDEQ("torchdeq.fixed_point_iter", "picard"),
    ]
    if full:
        peers += [
            Jaxopt(
                "jaxopt.AndersonAcceleration(history_size=11)",
                "anderson",
                differences=10,
                cache=cache,
            ),
            Scipy("scipy.anderson(M=10)", "anderson", differences=10),
            Scipy("scipy.broyden2(max_rank=30)", "broyden", differences=30, bad=True),
            Scipy(
                "scipy.anderson(M=5,line_search=None)", "anderson", differences=5, line_search=None
            ),
            Scipy(
                "scipy.broyden1(max_rank=30,line_search=None)",
                "broyden",
                differences=30,
                line_search=None,
            ),
            TorchDEQ("torchdeq.anderson(m=11)", "anderson", differences=10),
            # Their default regularisation is absolute (ridge 1e-5 on the Gram matrix of
            # residuals, lam 1e-4): near convergence it dominates and the mixing decays
            # to plain iteration. With a tiny one they need far fewer evaluations.
            Jaxopt(
                "jaxopt.AndersonAcceleration(history_size=6,ridge=1e-14)",
                "anderson",
                differences=5,
                ridge=1e-14,
                cache=cache,
            ),
            TorchDEQ("torchdeq.anderson(m=6,lam=1e-10)", "anderson", differences=5, lam=1e-10),
        ]
    return ours + peers


def availability() -> dict[str, str]:
    """Which optional peers are installed (library -> "available" or why not)."""
    out = {}
    for lib, mods in {
        "jaxopt": ("jaxopt",),
        "scipy": ("scipy",),
        "torchdeq": ("torch", "torchdeq"),
    }.items():
        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        out[lib] = "available" if not missing else f"not installed ({', '.join(missing)})"
    return out
