"""SHINE on the MNIST cell: does reusing forward Broyden's inverse-Jacobian estimate pay
in the backward pass? (`benchmarks.shine_adjoint.ShineAdjoint`; measured, not kept in
the library: see the README.)

For test digits, the DEQ cell of a trained MNIST model (read from a checkpoint of
``python -m fixedpoint_deq.mnist``) is solved with `fixedpoint.Broyden` (memory 30, RMS
norm) and the gradient of each digit's cross-entropy with respect to the cell's
parameters is computed with several backward passes. Each is compared, digit by digit,
with the exact implicit gradient (an Anderson backward solve to ``rtol 1e-9``, in
float64): cosine similarity and relative error, and the backward steps (VJPs of the
cell) it used.

Rows: ``implicit`` at the trainer's backward tolerance (``--backward-tol``, from 0) and
the same solve warm-started (``shine-warm``) or preconditioned (``shine-precondition``)
by Broyden's estimate; ``shine`` (the estimate as the gradient, no solve); the
Jacobian-free and phantom gradients for scale.

    python -m benchmarks.shine --checkpoint runs/mnist/ckpt --digits 64
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import optimistix as optx


def _rows(backward_tol: float, max_steps: int):
    import fixedpoint as fp

    from .shine_adjoint import ShineAdjoint

    def linear(tol):
        return fp.linear.Anderson(rtol=tol, atol=1e-12, norm=optx.rms_norm, max_steps=max_steps)

    return {
        "implicit": fp.ImplicitAdjoint(linear(backward_tol), throw=False),
        "shine-warm": ShineAdjoint("warm", linear(backward_tol), throw=False),
        "shine-precondition": ShineAdjoint("precondition", linear(backward_tol), throw=False),
        "shine": ShineAdjoint("shine"),
        "jfb": fp.JacobianFreeAdjoint(),
        "phantom (5, 0.5)": fp.PhantomAdjoint(steps=5, beta=0.5),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/mnist/ckpt")
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--digits", type=int, default=64)
    p.add_argument("--fwd-tol", type=float, nargs="+", default=[1e-2, 1e-4])
    p.add_argument("--backward-tol", type=float, default=1e-2)
    p.add_argument("--memory", type=int, default=30)
    args = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)

    import fixedpoint as fp
    import fixedpoint_deq as fd
    from fixedpoint_deq.mnist.checkpoint import load_model
    from fixedpoint_deq.mnist.data import load_mnist
    from fixedpoint_deq.mnist.inputs import prepare_images

    model, config, epoch = load_model(args.checkpoint)
    model = jtu.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    data = load_mnist(args.data_dir, verify=False)
    images = jnp.asarray(prepare_images(data.test_images[: args.digits]), jnp.float64)
    labels = jnp.asarray(data.test_labels[: args.digits].astype(np.int32))
    print(
        f"model: {args.checkpoint} (epoch {epoch}; width {config.width}, trained with "
        f"{config.solver} forward, {config.backward} backward, train_subset "
        f"{config.train_subset}); {args.digits} test digits, float64\n"
    )
    cell = model.deq.prepared_cell(inference=True)

    def injection(image):
        x = model.project_norm(jax.nn.gelu(model.project(image)))
        return jnp.moveaxis(x, 0, -1)

    xs = jax.vmap(injection)(images)

    for tol in args.fwd_tol:
        solver = fp.Broyden(rtol=tol, atol=tol, norm=optx.rms_norm, memory=args.memory)
        exact = fp.ImplicitAdjoint(
            fp.linear.Anderson(rtol=1e-9, atol=1e-14, norm=optx.rms_norm, max_steps=500),
            throw=False,
        )

        def grads(adjoint):
            @eqx.filter_jit
            def run(cell, adjoint):
                def one(x, y, adjoint):
                    def loss(cell_and_adjoint):
                        c, a = cell_and_adjoint
                        deq = fd.DEQ(c, solver=solver, adjoint=a, max_steps=100)
                        z, record = deq(x, inference=True)
                        logits = model.logits(z)
                        return optax.softmax_cross_entropy_with_integer_labels(logits, y), record

                    g, record = eqx.filter_grad(loss, has_aux=True)((cell, adjoint))
                    flat = jax.flatten_util.ravel_pytree(eqx.filter(g[0], eqx.is_inexact_array))[0]
                    return flat, fd.backward_stats(g), record

                return jax.vmap(one, in_axes=(0, 0, None))(xs, labels, adjoint)

            out = run(cell, adjoint)
            jax.block_until_ready(out)
            t0 = time.perf_counter()
            out = run(cell, adjoint)
            jax.block_until_ready(out)
            return out, time.perf_counter() - t0

        (g_ref, s_ref, rec), _ = grads(exact)
        assert s_ref is not None  # the adjoints of fixedpoint carry statistics
        print(
            f"forward Broyden rtol = atol = {tol:g}: mean forward steps "
            f"{float(jnp.mean(rec.num_steps)):.1f}, converged "
            f"{100 * float(jnp.mean(rec.converged)):.0f}%; exact backward: "
            f"{float(jnp.mean(s_ref.num_steps)):.1f} steps, failed {int(jnp.sum(s_ref.failed))}\n"
        )
        print(
            "| backward | steps / digit | failed | cosine (mean, min) | rel. error (median, max) | time (s) |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for name, adjoint in _rows(args.backward_tol, 200).items():
            (g, stats, _), seconds = grads(adjoint)
            assert stats is not None
            cos = jnp.sum(g * g_ref, 1) / (
                jnp.linalg.norm(g, axis=1) * jnp.linalg.norm(g_ref, axis=1)
            )
            rel = jnp.linalg.norm(g - g_ref, axis=1) / jnp.linalg.norm(g_ref, axis=1)
            print(
                f"| {name} | {float(jnp.mean(stats.num_steps)):.1f} | "
                f"{int(jnp.sum(stats.failed))} | {float(jnp.mean(cos)):.4f}, "
                f"{float(jnp.min(cos)):.4f} | {float(jnp.median(rel)):.3g}, "
                f"{float(jnp.max(rel)):.3g} | {seconds:.2f} |"
            )
        print()


if __name__ == "__main__":
    main()
