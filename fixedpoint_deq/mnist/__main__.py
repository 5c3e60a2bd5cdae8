"""``python -m fixedpoint_deq.mnist`` / ``fixedpoint-mnist``: train a DEQ on MNIST."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from .train import BACKWARD_MODES, BACKWARD_SOLVERS, Config, FORWARD_SOLVERS
from .model import HEADS

#: What `--quick` sets (each can still be overridden by giving the option explicitly).
QUICK = dict(epochs=1, train_subset=30000, warmup_steps=50)

_EPILOG = """\
data:
  The four MNIST IDX files (gzip-compressed or not) are looked up in --data-dir, else in
  $FIXEDPOINT_MNIST_DIR, else in the cache (~/.cache/fixedpoint/mnist, downloaded there
  if missing). In this repository's CI the data lives one level up:
      fixedpoint-mnist --data-dir ../shared/data/mnist

presets:
  --quick   = --epochs 1 --train-subset 30000 --warmup-steps 50 (full test set).
              Measured on a busy 2-core CPU: 97.14%% test accuracy in 9.7 min
              (training + the test pass); forward 10.3 steps/sample, backward 5.
  default   = 3 epochs over the 60000 training digits, width 12, Anderson (m=5)
              forward, phantom backward (5 steps, damping 0.5), Jacobian
              regularisation 0.5, AdamW 5e-3 with warmup + cosine decay.
              About 0.5-2 s per batch of 64 on 2 CPU cores (15-30 min per epoch).

examples:
  fixedpoint-mnist --data-dir ../shared/data/mnist --quick --out-dir runs/quick
  fixedpoint-mnist --data-dir ../shared/data/mnist --checkpoint-dir runs/ckpt --out-dir runs/full
  fixedpoint-mnist --data-dir ../shared/data/mnist --checkpoint-dir runs/ckpt --resume
  fixedpoint-mnist --backward phantom --phantom-steps 5 --phantom-beta 0.5
  XLA_FLAGS=--xla_force_host_platform_device_count=4 fixedpoint-mnist ...  # 4 CPU "devices"

outputs:
  --out-dir DIR: metrics.jsonl (one JSON object per epoch: epoch, train_loss, train_acc,
  test_loss, test_acc, fwd_steps, bwd_steps, fwd_converged, test_fwd_steps, jac_reg,
  skipped, train_time, wall_time) and metrics.png (accuracy, loss, solver steps).
  --checkpoint-dir DIR: checkpoint.json + ckpt-XXXX.eqx, rewritten atomically every epoch.
"""


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="fixedpoint-mnist",
        description=(
            "Train a deep-equilibrium (DEQ) convolutional classifier on MNIST with the "
            "fixedpoint solvers: forward root finding, implicit (or approximate) "
            "backward pass, Jacobian regularisation. Data-parallel over all JAX devices."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("data and schedule")
    g.add_argument("--data-dir", metavar="DIR",
                   help="directory holding the four MNIST IDX files (default: "
                        "$FIXEDPOINT_MNIST_DIR, else the cache; e.g. ../shared/data/mnist)")
    g.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    g.add_argument("--batch-size", type=int,
                   help=f"global batch size, a multiple of the device count (default {d.batch_size})")
    g.add_argument("--eval-batch-size", type=int,
                   help=f"batch size for the test set (default {d.eval_batch_size})")
    g.add_argument("--lr", type=float,
                   help=f"peak AdamW learning rate of the warmup+cosine schedule (default {d.lr})")
    g.add_argument("--warmup-steps", type=int, help=f"linear warmup steps (default {d.warmup_steps})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--clip-norm", type=float,
                   help=f"clip gradients to this global norm (default {d.clip_norm})")
    g.add_argument("--train-subset", type=int, metavar="N",
                   help="use only the first N training digits (default: all 60000)")
    g.add_argument("--test-subset", type=int, metavar="N",
                   help="evaluate on the first N test digits only (default: all 10000)")
    g.add_argument("--augment-shift", type=int, metavar="PIXELS",
                   help=f"random translations of up to PIXELS (default {d.augment_shift}: off)")
    g.add_argument("--seed", type=int, help=f"seed of initialisation, data order and probes (default {d.seed})")
    g.add_argument("--quick", action="store_true",
                   help="quick preset: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))

    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, help=f"channels C of the DEQ state (default {d.width})")
    g.add_argument("--groups", type=int, help=f"GroupNorm groups (default {d.groups})")
    g.add_argument("--head", choices=HEADS,
                   help=f"classifier head: 'mean' = global mean pool + Linear(C, 10) (the seed's), "
                        f"'pool4' = 4x4 average pool + Linear(16 C, 10) (default {d.head})")

    g = p.add_argument_group("forward solver")
    g.add_argument("--solver", choices=FORWARD_SOLVERS, help=f"forward root finder (default {d.solver})")
    g.add_argument("--anderson-m", type=int,
                   help=f"Anderson history size m, forward and backward (default {d.anderson_m})")
    g.add_argument("--beta", type=float,
                   help=f"mixing/damping beta in (0, 1] of the forward solver (default {d.beta})")
    g.add_argument("--broyden-memory", type=int,
                   help=f"Broyden memory, forward and backward (default {d.broyden_memory})")
    g.add_argument("--max-steps", type=int, help=f"maximum forward steps (default {d.max_steps})")
    g.add_argument("--fwd-tol", type=float,
                   help=f"forward tolerance: stop when rms(r / (tol + tol |z|)) < 1 (default {d.fwd_tol})")

    g = p.add_argument_group("backward pass")
    g.add_argument("--backward", choices=BACKWARD_MODES,
                   help="'implicit' (implicit differentiation with a backward linear solve), "
                        "'jfb' (Jacobian-free) or 'phantom' (damped unrolled steps) "
                        f"(default {d.backward})")
    g.add_argument("--backward-solver", choices=BACKWARD_SOLVERS,
                   help=f"linear solver of --backward implicit (default {d.backward_solver})")
    g.add_argument("--backward-max-steps", type=int,
                   help=f"maximum backward steps of --backward implicit (default {d.backward_max_steps})")
    g.add_argument("--backward-tol", type=float,
                   help=f"relative tolerance of the backward solve (default {d.backward_tol})")
    g.add_argument("--phantom-steps", type=int,
                   help=f"unrolled steps of --backward phantom (default {d.phantom_steps})")
    g.add_argument("--phantom-beta", type=float,
                   help=f"damping in (0, 1] of --backward phantom (default {d.phantom_beta})")
    g.add_argument("--jac-reg", type=float,
                   help="weight of the Jacobian regularisation ||J_f||_F^2 / d in the loss "
                        f"(0 turns it off; default {d.jac_reg})")

    g = p.add_argument_group("output, resuming, devices")
    g.add_argument("--out-dir", metavar="DIR", help="write metrics.jsonl and metrics.png here")
    g.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write a checkpoint here after every epoch (atomically)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --checkpoint-dir (if there is one)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (also when "
                        "FIXEDPOINT_DISTRIBUTED=1)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    """``(config, show_progress)`` from command-line arguments."""
    import os

    ns = vars(build_parser().parse_args(argv))
    quick = ns.pop("quick", False)
    progress = not ns.pop("no_progress", False)
    values = dict(QUICK) if quick else {}
    values.update(ns)
    if os.environ.get("FIXEDPOINT_DISTRIBUTED", "") not in ("", "0"):
        values["distributed"] = True
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in values.items() if k in fields})
    return config, progress


def main(argv: Sequence[str] | None = None) -> int:
    config, progress = config_from_args(argv)
    try:
        config.check()
    except ValueError as e:
        print(f"fixedpoint-mnist: error: {e}", file=sys.stderr)
        return 2
    from .data import MNISTDataError
    from .train import train

    try:
        result = train(config, progress=progress)
    except MNISTDataError as e:
        print(f"fixedpoint-mnist: error: {e}", file=sys.stderr)
        return 1
    if result.history:
        last = result.history[-1]
        print(
            f"final (epoch {last['epoch']}): test accuracy {100 * last['test_acc']:.2f}%, "
            f"mean forward steps {last['fwd_steps']:.1f} (test {last['test_fwd_steps']:.1f}), "
            f"mean backward steps {last['bwd_steps']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
