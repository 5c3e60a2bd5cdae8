"""The MNIST DEQ training step, ours against torchdeq, side by side in one process.

The cell of `fixedpoint_deq.mnist` (width 12, 28x28, mean-pool head, batch 64, float32,
AdamW) with exactly 10 Anderson forward steps (history of 5 differences: our ``m=5``,
torchdeq's ``m=6`` stored iterates) and 5 backward steps, both frameworks on the same
number of threads. Ours is built the way a user builds it: `make_model` of
`fixedpoint_deq.mnist.build` and `make_train_step` of `fixedpoint_deq.mnist.steps`.
torchdeq (optional: ``pip install torch==2.13.0 torchdeq``) gets the same model written
in torch.

Rows: the training step with the phantom gradient (5 steps), with implicit
differentiation and a 5-step Neumann (torchdeq: ``fixed_point_iter``) backward, with a
5-step `fixedpoint.linear.Anderson` backward (ours only), and the forward solve alone
(projection + 10 steps, no gradient); then the cell alone, evaluated 10 times, and
the cell's work in each framework's 5-step phantom backward (ours: one linearisation,
4 vector-Jacobian products in the state and one in the parameters; torchdeq's: 5
forward passes under autograd and their 5 products); the last row, the forward solve
less the cell, is what the forward solver itself costs. Each figure is the median of
``--steps`` timed calls after warm-up; the frameworks are interleaved round by round so
that load on a shared machine hits both alike.

    python -m benchmarks.deq_step            # prints a markdown table
    python -m benchmarks.deq_step --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


BATCH = 64
WIDTH = 12
FWD_STEPS = 10
BWD_STEPS = 5
LR = 1e-3


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=BATCH).astype(np.int32)
    return images, labels


# ----------------------------------------------------------------------------- ours


def _our_config(backward: str, backward_solver: str = "neumann"):
    from fixedpoint_deq.mnist.config import Config

    config = Config(
        width=WIDTH,
        stem_stride=1,  # the 28x28 state of the torch model below (not the default 14x14)
        head="mean",
        batch_size=BATCH,
        solver="anderson",
        anderson_m=5,
        max_steps=FWD_STEPS,
        fwd_tol=0.0,  # exactly FWD_STEPS steps
        backward=backward,
        backward_solver=backward_solver,
        backward_max_steps=BWD_STEPS,
        backward_tol=0.0,  # exactly BWD_STEPS steps
        phantom_steps=BWD_STEPS,
        jac_reg=0.0,
        lr=LR,
        warmup_steps=0,
    )
    return config


def ours_train_step(backward: str, backward_solver: str = "neumann") -> Callable[[], None]:
    from fixedpoint_deq.mnist.build import make_model, make_optimizer
    from fixedpoint_deq.mnist.steps import make_train_step

    config = _our_config(backward, backward_solver)
    model = make_model(config)
    optimizer = make_optimizer(config, total_steps=10_000)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(config, optimizer)
    images, labels = (jnp.asarray(a) for a in _data())
    key = jax.random.key(0)
    state = [model, opt_state]

    def run():
        model, opt_state, metrics = step(state[0], state[1], images, labels, key)
        jax.block_until_ready(metrics["loss"])
        state[0], state[1] = model, opt_state

    return run


def ours_forward() -> Callable[[], None]:
    from fixedpoint_deq.mnist.build import make_model

    model = make_model(_our_config("phantom"))
    images = jnp.asarray(_data()[0])

    @eqx.filter_jit
    def forward(model, images):
        logits, record = jax.vmap(lambda im: model(im))(images)
        return logits, record.num_steps

    def run():
        logits, steps = forward(model, images)
        jax.block_until_ready(logits)

    return run


def _our_cell_and_input():
    """Our model's cell and the projected input of the batch."""
    from fixedpoint_deq.mnist.build import make_model

    model = make_model(_our_config("phantom"))
    return model.deq.cell, jax.vmap(model.inject)(jnp.asarray(_data()[0]))


def ours_cell() -> Callable[[], None]:
    """The cell alone: 10 evaluations (no solver), from the projected input."""
    cell, x = _our_cell_and_input()

    @jax.jit
    def evaluations(x):
        step = jax.vmap(cell)
        return jax.lax.fori_loop(0, FWD_STEPS, lambda _, z: step(z, x), jnp.zeros_like(x))

    def run():
        jax.block_until_ready(evaluations(x))

    return run


def ours_cell_vjp() -> Callable[[], None]:
    """The cell's work in our 5-step phantom backward: one linearisation at the fixed
    point, 4 vector-Jacobian products in the state in a chain, one in the parameters."""
    cell, x = _our_cell_and_input()

    @eqx.filter_jit
    def vjps(cell, z, x):
        _, pull = eqx.filter_vjp(lambda c, z: jax.vmap(c)(z, x), cell, z)

        def step(_, carry):
            u, acc = carry
            return u + 0.5 * pull(u)[1], acc + u

        u, acc = jax.lax.fori_loop(0, BWD_STEPS - 1, step, (jnp.ones_like(z), jnp.zeros_like(z)))
        return pull(acc + u)[0]

    def run():
        jax.block_until_ready(vjps(cell, 0.5 * x, x))

    return run


# ----------------------------------------------------------------------------- torchdeq


def torchdeq_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchdeq"))


def _torch_model(grad: str):
    import torch  # pyright: ignore[reportMissingImports]
    import torch.nn as nn  # pyright: ignore[reportMissingImports]
    from torchdeq import get_deq  # pyright: ignore[reportMissingImports]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.project = nn.Conv2d(1, WIDTH, 3, padding=1)
            self.project_norm = nn.GroupNorm(1, WIDTH)
            self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
            self.norm = nn.GroupNorm(1, WIDTH)
            self.head = nn.Linear(WIDTH, 10)
            kwargs = dict(
                f_solver="anderson",
                f_max_iter=FWD_STEPS,
                f_tol=0.0,
                f_stop_mode="abs",
                eval_f_max_iter=FWD_STEPS,
            )
            if grad == "phantom":
                kwargs.update(grad=BWD_STEPS, tau=0.5)
            else:
                kwargs.update(
                    ift=True, b_solver="fixed_point_iter", b_max_iter=BWD_STEPS, b_tol=0.0
                )
            self.deq = get_deq(**kwargs)

        # (Our model's GELU is `jax.nn.gelu`'s tanh form; torch's default is the erf
        # form, a different function, and 35% cheaper in torch's cell here.)
        def inject(self, images):
            return self.project_norm(nn.functional.gelu(self.project(images), approximate="tanh"))

        def cell(self, z, x):
            return self.norm(nn.functional.gelu(self.conv(z), approximate="tanh")) + x

        def forward(self, images):
            x = self.inject(images)
            z0 = torch.zeros_like(x)
            z_out, info = self.deq(lambda z: self.cell(z, x), z0, solver_kwargs=dict(m=6))
            return self.head(z_out[-1].mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Model()


def torchdeq_train_step(grad: str) -> Callable[[], None]:
    import torch  # pyright: ignore[reportMissingImports]

    model = _torch_model(grad)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    images, labels = (torch.from_numpy(a) for a in _data())
    labels = labels.long()

    def run():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return run


def torchdeq_forward() -> Callable[[], None]:
    import torch  # pyright: ignore[reportMissingImports]

    model = _torch_model("phantom")
    model.eval()
    images = torch.from_numpy(_data()[0])

    def run():
        with torch.no_grad():
            model(images)

    return run


def _torch_model_and_input():
    """The torch twin and the projected input of the batch (no graph)."""
    import torch  # pyright: ignore[reportMissingImports]

    model = _torch_model("phantom")
    images = torch.from_numpy(_data()[0])
    with torch.no_grad():
        x = model.inject(images)
    return model, x


def torchdeq_cell() -> Callable[[], None]:
    import torch  # pyright: ignore[reportMissingImports]

    model, x = _torch_model_and_input()
    model.eval()

    def run():
        with torch.no_grad():
            z = torch.zeros_like(x)
            for _ in range(FWD_STEPS):
                z = model.cell(z, x)

    return run


def torchdeq_cell_vjp() -> Callable[[], None]:
    """The cell's work in torchdeq's 5-step phantom backward: 5 forward passes with
    autograd and their vector-Jacobian products."""
    import torch  # pyright: ignore[reportMissingImports]

    model, x = _torch_model_and_input()
    params = list(model.conv.parameters()) + list(model.norm.parameters())

    def run():
        u = torch.ones_like(x)
        z = (0.5 * x).requires_grad_(True)
        for _ in range(BWD_STEPS):
            out = model.cell(z, x)
            grads = torch.autograd.grad(out, [z] + params, u)
            u = grads[0]

    return run


# ----------------------------------------------------------------------------- timing


FORWARD = "forward solve alone (projection + 10 Anderson steps)"
CELL = "the cell alone, 10 evaluations (no solver)"
CELL_VJP = "the cell's work in a 5-step phantom backward (no solver)"


@dataclasses.dataclass
class Row:
    name: str
    ours: Callable[[], None]
    peer: Callable[[], None] | None


def rows(with_torchdeq: bool) -> list[Row]:
    def peer(make, *args):
        return make(*args) if with_torchdeq else None

    return [
        Row(
            "phantom backward, 5 steps",
            ours_train_step("phantom"),
            peer(torchdeq_train_step, "phantom"),
        ),
        Row(
            "implicit, 5-step Neumann backward",
            ours_train_step("implicit", "neumann"),
            peer(torchdeq_train_step, "ift"),
        ),
        Row(
            "implicit, 5-step `linear.Anderson` backward",
            ours_train_step("implicit", "anderson"),
            None,
        ),
        Row(FORWARD, ours_forward(), peer(torchdeq_forward)),
        Row(CELL, ours_cell(), peer(torchdeq_cell)),
        Row(CELL_VJP, ours_cell_vjp(), peer(torchdeq_cell_vjp)),
    ]


def measure(table: list[Row], steps: int, warmup: int = 3) -> list[tuple[str, float, float]]:
    """Median milliseconds per call, frameworks interleaved call by call."""
    for row in table:
        for _ in range(warmup):
            row.ours()
            if row.peer is not None:
                row.peer()
    times: dict[str, tuple[list[float], list[float]]] = {r.name: ([], []) for r in table}
    for _ in range(steps):
        for row in table:
            t0 = time.perf_counter()
            row.ours()
            times[row.name][0].append(time.perf_counter() - t0)
            if row.peer is not None:
                t0 = time.perf_counter()
                row.peer()
                times[row.name][1].append(time.perf_counter() - t0)
    out = []
    for row in table:
        ours, peer = times[row.name]
        out.append(
            (
                row.name,
                1e3 * float(np.median(ours)),
                1e3 * float(np.median(peer)) if peer else float("nan"),
            )
        )
    return out


def markdown(results: list[tuple[str, float, float]]) -> str:
    lines = [
        "| | ours [ms] | torchdeq [ms] | ours / torchdeq |",
        "| --- | ---: | ---: | ---: |",
    ]
    medians = {name: (ours, peer) for name, ours, peer in results}
    if FORWARD in medians and CELL in medians:
        # What the solver itself costs: the forward solve less its 10 evaluations.
        (f_ours, f_peer), (c_ours, c_peer) = medians[FORWARD], medians[CELL]
        results = results + [
            (
                "forward solve less the cell (the solver's own work)",
                f_ours - c_ours,
                f_peer - c_peer,
            )
        ]
    for name, ours, peer in results:
        if np.isnan(peer):
            lines.append(f"| {name} | {ours:.1f} | - | - |")
        else:
            lines.append(f"| {name} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed calls per row (>= 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (>= 1)")
    parser.add_argument("--no-torchdeq", action="store_true", help="time ours only")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1")
    from fixedpoint_deq.mnist import compile_cache

    compile_cache.enable()  # ($FIXEDPOINT_COMPILATION_CACHE: another directory, or off)
    with_torchdeq = torchdeq_available() and not args.no_torchdeq
    if with_torchdeq:
        import torch  # pyright: ignore[reportMissingImports]

        torch.set_num_threads(args.threads)
    elif not args.no_torchdeq:
        print("torch/torchdeq not installed: timing ours only")
    print(markdown(measure(rows(with_torchdeq), args.steps)))


if __name__ == "__main__":
    main()
