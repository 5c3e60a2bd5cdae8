"""What each piece of the DEQ toolkit costs per MNIST training step, measured robustly on a
shared machine: the jitted training steps of several configurations (the MNIST trainer's
own `make_train_step`) on the same batch of real digits, timed round-robin (one step of
each configuration per round) so that load on the machine hits all of them alike; the
median over rounds.

The model is trained first for `--warm-steps` steps with the baseline settings (so that
the solves look like those of a training run, not of random weights); every
configuration starts from that model. For ``reuse``, the forward solves start from the
fixed points that the model of 62 steps earlier (one epoch of 4,000 digits) had on the
same batch: what the cache holds one epoch later.

    python -m benchmarks.toolkit_steps --data-dir ../shared/data/mnist --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


CONFIGS: dict[str, dict] = {
    "baseline": {},
    "--norm spectral": dict(norm="spectral"),
    "--norm weight": dict(norm="weight"),
    "--dropout 0.1": dict(dropout=0.1),
    "--jac-reg 0 (no regulariser)": dict(jac_reg=0.0),
    "--reuse-fixed-points": dict(reuse_fixed_points=True),
    "--correction-states 2": dict(correction_states=2),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warm-steps", type=int, default=60)
    args = p.parse_args(argv)

    from fixedpoint_deq.mnist.build import make_model
    from fixedpoint_deq.mnist.config import Config
    from fixedpoint_deq.mnist.data import load_mnist
    from fixedpoint_deq.mnist.inputs import prepare_images
    from fixedpoint_deq.mnist.steps import compiled_steps

    data = load_mnist(args.data_dir, verify=False)
    n = 64 * args.warm_steps + 64
    images = prepare_images(data.train_images[:n])
    labels = data.train_labels[:n].astype(np.int32)
    x, y = jnp.asarray(images[-64:]), jnp.asarray(labels[-64:])

    base = Config(batch_size=64, warmup_steps=10)
    step, _, optimizer = compiled_steps(base, 10_000)
    model = make_model(base)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    earlier = model  # the model one (4000-digit) epoch before the timed one
    for s in range(args.warm_steps):
        if s == args.warm_steps - 62:
            earlier = model
        sl = slice(64 * s, 64 * (s + 1))
        model, opt_state, _ = step(
            model, opt_state, jnp.asarray(images[sl]), jnp.asarray(labels[sl]), jax.random.key(s)
        )

    runs = {}
    for name, settings in CONFIGS.items():
        config = Config(batch_size=64, warmup_steps=10, **settings)
        step, _, optimizer = compiled_steps(config, 10_000)
        # The trained parameters in this configuration's model (normalisation wraps
        # the cell's convolution: its raw weight is the trained one).
        m = make_model(config)
        m = eqx.tree_at(
            lambda t: (t.project, t.project_norm, t.head, t.deq.cell.norm),
            m,
            (model.project, model.project_norm, model.head, model.deq.cell.norm),
        )
        if settings.get("norm"):
            m = eqx.tree_at(lambda t: t.deq.cell.conv.layer, m, model.deq.cell.conv)
        else:
            m = eqx.tree_at(lambda t: t.deq.cell.conv, m, model.deq.cell.conv)
        state = optimizer.init(eqx.filter(m, eqx.is_inexact_array))
        extra = {}
        if config.reuse_fixed_points:
            extra["z0"] = jax.vmap(lambda im: earlier.solve(im)[2])(x)
        out = step(m, state, x, y, jax.random.key(0), **extra)  # compile
        jax.block_until_ready(out)
        runs[name] = (step, m, state, extra, [], [])

    for r in range(args.rounds):
        for name, (step, m, state, extra, times, fwd) in runs.items():
            t0 = time.perf_counter()
            out = step(m, state, x, y, jax.random.key(r + 1), **extra)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            fwd.append(float(out[2]["fwd_steps"]))

    base_time = statistics.median(runs["baseline"][4])
    print(
        f"MNIST training step, batch 64, width 12, after {args.warm_steps} baseline steps; "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print("| configuration | step time (ms) | relative to baseline | forward steps / digit |")
    print("| --- | --- | --- | --- |")
    for name, (_, _, _, _, times, fwd) in runs.items():
        t = statistics.median(times)
        print(f"| {name} | {1000 * t:.0f} | {t / base_time:.2f} | {np.mean(fwd):.1f} |")


if __name__ == "__main__":
    main()
