from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from .._validate import check_callable, check_int, check_real
from ._base import AbstractFixedPointRootFinder, Aux, Fn, Out, Y
from ._common import is_done, Progress, select_output, termination_result, unravel_like
from .anderson import Anderson
from .newton_krylov import NewtonKrylov


class _PolyalgorithmState(eqx.Module):
    method: Int[Array, ""]  # the index of the method running
    states: tuple[Any, ...]  # each method's state (untouched until it starts)
    checkpoint_norm: Scalar  # the running method's best residual norm at the checkpoint
    since_checkpoint: Int[Array, ""]  # evaluations since then


def _pick(index: Int[Array, ""], trees: Sequence[PyTree]) -> PyTree:
    """`trees[index]`, for trees of one structure."""
    return jtu.tree_map(lambda *xs: jnp.stack(xs)[index], *trees)


class Polyalgorithm(optx.AbstractRootFinder[Y, Out, Aux, _PolyalgorithmState]):
    r"""A sequence of root finders, each taking over from the best point of the one
    before when that one fails or stalls: a cheap method first, a robust one last.

    Solves $g(y) = 0$. The default sequence is [`fixedpoint.Anderson`][] (one
    evaluation per step and no derivatives: the fastest on contractive and mildly
    nonlinear problems), then [`fixedpoint.NewtonKrylov`][] (Newton directions from
    Jacobian-vector products, globalised by a line search: quadratic convergence near a
    root, and robust on badly scaled or strongly nonlinear problems).

    A method is abandoned for the next one when it

    - fails: divergence or non-finite values (its own rules, see
      [`fixedpoint.Neumann`][]); or
    - stalls: its smallest residual norm did not fall below `stall_factor` times what it
      was `stall_steps` evaluations before (the first such test is after
      `2 * stall_steps` evaluations: the first `stall_steps` set the reference).

    The next method starts from the point with the smallest residual norm that the
    abandoned one evaluated. The last method runs until it converges, fails or the
    solve runs out of steps. All methods use the polyalgorithm's `rtol`, `atol` and
    `norm` (the stopping rule of [`fixedpoint.Neumann`][]), and the result code is
    that of the method running at the end.

    **One compilation:** all the methods are compiled into one loop, and a step runs
    only the method in use (`lax.switch`). Under `jax.vmap` each sample moves through
    the methods on its own; a batched `lax.switch` evaluates every method's step, so a
    batched step costs the sum of the methods' steps.

    **Statistics:** `sol.stats["num_steps"]` counts evaluations of $g$ over all
    methods, `sol.stats["num_jvps"]` Jacobian-vector products,
    `sol.stats["method"]` is the index in `solvers` of the method that finished,
    `sol.stats["steps_per_method"]` the evaluations each one made, and
    `sol.stats["residual_norm"]` as for [`fixedpoint.Neumann`][].
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    solvers: tuple[AbstractFixedPointRootFinder, ...]
    stall_steps: int = eqx.field(static=True)
    stall_factor: float
    trace_length: int = eqx.field(static=True)

    def __init__(
        self,
        rtol: float = 1e-4,
        atol: float = 1e-6,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        solvers: Sequence[AbstractFixedPointRootFinder] | None = None,
        stall_steps: int = 50,
        stall_factor: float = 0.5,
        trace_length: int = 0,
    ):
        check_real("rtol", rtol, low=0.0)
        check_real("atol", atol, low=0.0)
        check_callable("norm", norm, "PyTree -> scalar")
        check_int("stall_steps", stall_steps, low=1)
        check_real("stall_factor", stall_factor, low=0.0, high=1.0, low_open=True)
        check_int("trace_length", trace_length, low=0)
        if solvers is None:
            solvers = (Anderson(), NewtonKrylov())
        solvers = tuple(solvers)
        if not solvers or not all(isinstance(s, AbstractFixedPointRootFinder) for s in solvers):
            raise ValueError(
                "`solvers` must be a non-empty sequence of this package's root finders "
                f"(fixedpoint.Anderson, .Broyden, .Neumann, .NewtonKrylov), got {solvers!r}."
            )
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.solvers = solvers
        self.stall_steps = int(stall_steps)
        self.stall_factor = stall_factor
        self.trace_length = int(trace_length)

    def methods(self) -> tuple[AbstractFixedPointRootFinder, ...]:
        """`solvers`, each with this polyalgorithm's `rtol`, `atol`, `norm` and
        `trace_length` (applied when the solve runs, so that replacing those fields,
        as diffrax's `with_stepsize_controller_tols` does, reaches every method)."""
        return tuple(
            eqx.tree_at(
                lambda s: (s.rtol, s.atol, s.norm, s.trace_length),
                s,
                (self.rtol, self.atol, self.norm, self.trace_length),
            )
            for s in self.solvers
        )

    def keeps_finished_state(self) -> bool:
        """True: each method keeps its finished state, and no method takes over from
        a finished solve (see `fixedpoint._iterate`)."""
        return True

    def init(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _PolyalgorithmState:
        states = tuple(
            s.init(fn, y, args, options, f_struct, aux_struct, tags) for s in self.methods()
        )
        real = states[0].progress.best_norm.dtype
        return _PolyalgorithmState(
            method=jnp.array(0),
            states=states,
            checkpoint_norm=jnp.array(jnp.inf, real),
            since_checkpoint=jnp.array(0),
        )

    def step(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _PolyalgorithmState,
        tags: frozenset[object],
    ) -> tuple[Y, _PolyalgorithmState, Aux]:
        methods = self.methods()

        def branch(i: int):
            def run(y, states):
                y, state_i, aux = methods[i].step(fn, y, args, options, states[i], tags)
                return y, states[:i] + (state_i,) + states[i + 1 :], aux

            return run

        branches = [branch(i) for i in range(len(methods))]
        y, states, aux = jax.lax.switch(state.method, branches, y, state.states)
        progress = self._progress(state.method, states)

        # The running method is abandoned if it failed, or if its best residual did not
        # fall below stall_factor x the checkpoint in stall_steps evaluations.
        done, result = termination_result(progress)
        failed = done & (result != optx.RESULTS.successful)
        since = jnp.where(is_done(progress), state.since_checkpoint, state.since_checkpoint + 1)
        checkpoint = since >= self.stall_steps
        stalled = checkpoint & ~(progress.best_norm < self.stall_factor * state.checkpoint_norm)
        last = state.method == len(self.solvers) - 1
        switch = (failed | stalled) & ~last & ~(done & ~failed)
        y = jax.tree.map(
            lambda best, now: jnp.where(switch, best, now),
            unravel_like(progress.y_best, y),
            y,
        )
        new_state = _PolyalgorithmState(
            method=state.method + switch.astype(state.method.dtype),
            states=states,
            checkpoint_norm=jnp.where(
                switch,
                jnp.inf,
                jnp.where(checkpoint, progress.best_norm, state.checkpoint_norm),
            ),
            since_checkpoint=jnp.where(switch | checkpoint, 0, since),
        )
        return y, new_state, aux

    def _progress(self, method: Int[Array, ""], states: tuple[Any, ...]) -> Progress:
        return _pick(method, [s.progress for s in states])

    def terminate(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        args: PyTree,
        options: dict[str, Any],
        state: _PolyalgorithmState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        return termination_result(self._progress(state.method, state.states))

    def postprocess(
        self,
        fn: Fn[Y, Out, Aux],
        y: Y,
        aux: Aux,
        args: PyTree,
        options: dict[str, Any],
        state: _PolyalgorithmState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[Y, Aux, dict[str, Any]]:
        del fn, args, options, tags
        progress = self._progress(state.method, state.states)
        trace_length = progress.trace.size
        y_out, stats = select_output(y, progress, result, trace_length)
        num_jvps = sum((s.num_jvps for s in state.states if hasattr(s, "num_jvps")), jnp.array(0))
        stats = {
            **stats,
            "num_jvps": num_jvps,
            "method": state.method,
            "steps_per_method": jnp.stack([s.progress.step for s in state.states]),
        }
        return y_out, aux, stats


Polyalgorithm.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: relative and absolute tolerances of the stopping rule (>= 0), given
    to every method.
- `norm`: `PyTree -> scalar`, for the stopping rule and the statistics (default
    `optx.max_norm`), given to every method.
- `solvers`: the methods in the order they are tried (root finders of this package;
    their own `rtol`, `atol` and `norm` are replaced by the above). Default:
    `(fixedpoint.Anderson(), fixedpoint.NewtonKrylov())`.
- `stall_steps`: (>= 1) how many evaluations a method has to reduce its best
    residual norm by `stall_factor`.
- `stall_factor`: in (0, 1]; see `stall_steps` (1 only asks for some decrease).
- `trace_length`: (>= 0) record the residual norm of the first `trace_length` steps of
    the method that finishes in `sol.stats["residual_trace"]`.
"""
