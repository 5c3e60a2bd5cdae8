r"""Fixed-point correction (Bai et al. 2022, "Deep Equilibrium Optical Flow Estimation").

Besides its fixed point, a DEQ with `correction=FixedPointCorrection(steps=(...))`
returns the states of its forward solve after the chosen numbers of steps, each made
differentiable by a phantom gradient, in `record.states` (stacked along a new leading
axis, in the order of `steps`). Supervising them too, with weights that decay towards
the early states, trains the model so that the *whole trajectory* heads to a good
answer: the solver can be stopped early, and the gradient signal is denser.

**What each state is.** Let $z_n$ be the iterate of the forward solver after $n$ steps
(for a sample that stopped earlier, its final iterate). With $k$ = `unroll` and
$\beta$ = `beta`, the returned state is

$$c_n = \Phi^k(\operatorname{stop\_gradient}(z_n)), \qquad
\Phi(z) = (1 - \beta) z + \beta f(z, x),$$

i.e. $k$ damped steps of the map from the detached iterate, and its gradient is the
exact derivative of those $k$ steps (the phantom gradient of Geng et al. 2021, with
the unrolled steps taken from $z_n$ rather than from $z^*$). No gradient flows through
the solver's own iterations. The fixed point itself keeps the DEQ's `adjoint`.

**The loss recipe** ([`fixedpoint_deq.correction_loss`][]): with $N$ states,

$$\mathcal L = \ell(z^*) + \sum_{j=1}^{N} \gamma^{N + 1 - j}\, \ell(c_{n_j}),$$

the last corrected state weighted $\gamma$, the one before it $\gamma^2$, ... ($\gamma$
= 0.8 in the paper and torchdeq).

```python
deq = fd.DEQ(cell, max_steps=30, correction=fd.FixedPointCorrection(steps=(10, 20)))

def loss(model, x, y):
    z, record = deq(x)
    return fd.correction_loss(lambda s: cross_entropy(head(s), y), z, record.states)
```

**Differences from torchdeq:** torchdeq's `n_states` / `indexing` sample the states
inside its solvers and, with phantom gradients, replace the final state by an unrolled
one; here the fixed point is always returned with its own adjoint (the best estimate
is never dropped), the states come from any root finder (a wrapper records them), and
the steps are explicit and checked against the budget at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from fixedpoint.internal import as_int, check_int, check_real, keeps_finished_state


def _as_steps(steps: Any) -> Any:
    """Field converter: a list or tuple of integers becomes a tuple of Python ints;
    anything else is left for the check to refuse."""
    if isinstance(steps, (list, tuple)):
        return tuple(as_int(s) for s in steps)
    return steps


class _RecordingState(eqx.Module):
    inner: Any
    count: Int[Array, ""]
    states: Float[Array, "k n"]
    recorded: Bool[Array, " k"]


class _Recording(optx.AbstractRootFinder):
    """Runs `solver` unchanged and records its iterate after each of `steps` steps;
    the recorded (flattened) iterates are `sol.stats["correction_states"]`, shape
    ``(len(steps), n)`` (a step never reached: the returned solution).

    A step taken from a finished state (one that `solver.terminate` reports done)
    counts and records nothing, so the wrapper leaves a finished state unchanged
    whenever `solver` does: a batch of solves then runs in one loop
    (`keeps_finished_state`)."""

    solver: optx.AbstractRootFinder
    steps: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, solver: optx.AbstractRootFinder, steps: tuple[int, ...]):
        self.solver = solver
        self.steps = steps

    @property
    def rtol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.rtol

    @property
    def atol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        inner = self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)
        flat = ravel_pytree(y)[0]
        return _RecordingState(
            inner=inner,
            count=jnp.array(0),
            states=jnp.zeros((len(self.steps), flat.size), flat.dtype),
            recorded=jnp.zeros(len(self.steps), bool),
        )

    def keeps_finished_state(self) -> bool:
        """Whether a batch of solves may run in one loop: when it may for `solver`."""
        return keeps_finished_state(self.solver)

    def step(self, fn, y, args, options, state, tags):
        # A finished solve may still be stepped (a batch runs in one loop until every
        # sample has finished, and the wrapped solver then changes nothing): nothing is
        # counted or recorded either. (optimistix's own loop never steps a finished
        # solve: there `done` is always False.)
        done, _ = self.solver.terminate(fn, y, args, options, state.inner, tags)
        new_y, inner, aux = self.solver.step(fn, y, args, options, state.inner, tags)
        count = state.count + jnp.where(done, 0, 1).astype(state.count.dtype)
        hit = (jnp.asarray(self.steps) == count) & ~done
        flat = ravel_pytree(new_y)[0].astype(state.states.dtype)
        states = jnp.where(hit[:, None], flat[None, :], state.states)
        new_state = _RecordingState(
            inner=inner, count=count, states=states, recorded=state.recorded | hit
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        return self.solver.terminate(fn, y, args, options, state.inner, tags)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        y_out, aux, stats = self.solver.postprocess(
            fn, y, aux, args, options, state.inner, tags, result
        )
        final = ravel_pytree(y_out)[0].astype(state.states.dtype)
        states = jnp.where(state.recorded[:, None], state.states, final[None, :])
        return y_out, aux, dict(stats, correction_states=states)


class FixedPointCorrection(eqx.Module):
    """Which states of the forward solve a [`fixedpoint_deq.DEQ`][] returns for
    fixed-point correction, and their phantom gradient (the formulas and the loss
    recipe: "Fixed-point correction" on the DEQ toolkit page)."""

    steps: tuple[int, ...] = eqx.field(static=True, converter=_as_steps)
    unroll: int = eqx.field(static=True, default=1, converter=as_int)
    beta: float = eqx.field(static=True, default=1.0)

    def __check_init__(self) -> None:
        if not isinstance(self.steps, tuple) or not self.steps:
            raise ValueError(
                f"`steps` must be a non-empty tuple of step counts, got {self.steps!r}."
            )
        for s in self.steps:
            check_int("steps", s, low=1)
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"`steps` must be strictly increasing, got {self.steps!r}.")
        check_int("unroll", self.unroll, low=1)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)

    def check_budget(self, max_steps: int) -> None:
        """Raise `ValueError` naming `correction.steps` if a step exceeds `max_steps`."""
        if self.steps[-1] > max_steps:
            raise ValueError(
                f"`correction.steps` must lie within the forward budget max_steps="
                f"{max_steps}; got {self.steps}."
            )

    def recording(self, solver: optx.AbstractRootFinder) -> optx.AbstractRootFinder:
        """`solver` wrapped so that the solve records the chosen iterates."""
        steps = tuple(int(s) for s in self.steps)
        # (rtol, atol and norm are properties read from `solver`.)
        return _Recording(solver, steps)

    def states(
        self,
        sol: optx.Solution,
        fn: Callable[[PyTree[Array], PyTree], PyTree[Array]],
        args: PyTree,
    ) -> PyTree[Array]:
        """The corrected states of a solve run with `recording(solver)`: each recorded
        iterate, detached, then `unroll` damped steps of `fn(z, args)` (differentiable
        with respect to `args`). Stacked along a leading axis."""
        _, unravel = ravel_pytree(sol.value)
        recorded = jax.lax.stop_gradient(sol.stats["correction_states"])
        beta = self.beta

        def unrolled(flat):
            z = unravel(flat)
            for _ in range(self.unroll):
                fz = fn(z, args)
                z = jtu.tree_map(lambda a, b: (1 - beta) * a + beta * b, z, fz)
            return z

        return jax.vmap(unrolled)(recorded)


def correction_weights(num_states: int, gamma: float = 0.8) -> tuple[float, ...]:
    """The weights of the corrected states in [`fixedpoint_deq.correction_loss`][]:
    ``gamma ** (num_states - j)`` for ``j = 0 .. num_states - 1`` (the last state gets
    `gamma`, the first `gamma ** num_states`; the fixed point itself gets 1)."""
    check_int("num_states", num_states, low=0)
    check_real("gamma", gamma, low=0.0, high=1.0)
    return tuple(float(gamma) ** (num_states - j) for j in range(num_states))


def correction_loss(
    loss_fn: Callable[[PyTree[Array]], Scalar],
    z_star: PyTree[Array],
    states: PyTree[Array] | None,
    gamma: float = 0.8,
) -> Scalar:
    r"""The fixed-point-correction loss $\ell(z^*) + \sum_j \gamma^{N-j}\,\ell(c_j)$.

    **Arguments:**

    - `loss_fn`: the loss of one state (e.g. the cross-entropy of the head's logits).
    - `z_star`: the fixed point (gradient: the DEQ's adjoint).
    - `states`: `record.states` of the DEQ call (stacked corrected states), or `None`
        (no correction: the loss of `z_star` alone).
    - `gamma`: the decay, in [0, 1].
    """
    total = loss_fn(z_star)
    if states is None:
        return total
    leaves = jtu.tree_leaves(states)
    num = leaves[0].shape[0] if leaves else 0
    for j, w in enumerate(correction_weights(num, gamma)):
        total = total + w * loss_fn(jtu.tree_map(lambda s: s[j], states))
    return total
