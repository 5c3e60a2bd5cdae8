"""``python -m fixedpoint_deq.mnist`` / ``fixedpoint-mnist``: train a DEQ on MNIST."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

from . import compile_cache, distributed
from .config import Config, GROUPS, SetupError


#: What `--quick` sets (each can still be overridden by giving the option explicitly).
QUICK = dict(epochs=1, augment_shift=0, warmup_steps=100)

_EPILOG = """\
data:
  The four MNIST IDX files (gzip-compressed or not) are looked up in --data-dir, else in
  $FIXEDPOINT_MNIST_DIR, else in the cache (~/.cache/fixedpoint/mnist, downloaded there
  if missing). A --data-dir or $FIXEDPOINT_MNIST_DIR that does not exist is passed over
  (a line on the console says so); one that exists must hold all four files.
  For example:
      fixedpoint-mnist --data-dir ../shared/data/mnist

presets:
  --quick   = --epochs 1 --augment-shift 0 --warmup-steps 100 (all 60000 training
              digits, full test set).
  default   = 10 epochs over the 60000 training digits, shifts of up to 2 pixels, a
              stride-2 stem to a 14x14 state of width 48, Anderson (m=5) forward at
              tolerance 1e-2, phantom backward (5 steps, beta 0.5), Jacobian
              regularisation 0.5, 7x7-pooled linear head, AdamW 5e-3 with warmup +
              cosine decay.
  What each reaches (test accuracy, solver steps, time): docs/benchmarks.md.

examples:
  fixedpoint-mnist --data-dir ../shared/data/mnist --quick --out-dir runs/quick
  fixedpoint-mnist --data-dir ../shared/data/mnist --checkpoint-dir runs/ckpt --out-dir runs/full
  fixedpoint-mnist --data-dir ../shared/data/mnist --checkpoint-dir runs/ckpt --resume
  fixedpoint-mnist --data-dir ../shared/data/mnist --checkpoint-dir runs/ckpt --overwrite
  fixedpoint-mnist --backward phantom --phantom-steps 5 --phantom-beta 0.5
  XLA_FLAGS=--xla_force_host_platform_device_count=4 fixedpoint-mnist ...  # 4 CPU "devices"

outputs:
  --out-dir DIR: metrics.jsonl (one JSON object per epoch: epoch, train_loss, train_acc,
  test_loss, test_acc, fwd_steps, bwd_steps, fwd_converged, test_fwd_steps, jac_reg,
  skipped, train_time, wall_time, and the training curve) and metrics.png (accuracy,
  loss, solver steps).
  --checkpoint-dir DIR: checkpoint.json + ckpt-XXXX-TOKEN.eqx (XXXX the epoch, TOKEN
  random: each save writes a new file, then removes the one the checkpoint it replaced
  named; with --reuse-fixed-points also fixed-points-XXXX.npz), rewritten atomically
  every epoch (with the user's umask). A directory that already holds a checkpoint is
  refused unless --resume (continue it) or --overwrite (replace it) is given. Both
  directories are created, and checked to be writable, before training starts; while a
  run owns them, each holds its lock file, .fixedpoint-mnist.lock.

exit status:
  0 done; 1 the data or a checkpoint could not be read, a checkpoint or metrics.jsonl
  could not be written (a full disk, a read-only directory: the last good checkpoint is
  kept), or the checkpoint or output directory is in use by another run (a run locks
  both until it ends); 2 invalid options (every number is checked against its range
  when parsed); 130 interrupted by Ctrl-C, between two steps (a second Ctrl-C: at once).
  Each error is one line naming the file or directory and the fault; a metrics.png that
  cannot be written is only a warning.
"""


def _option_type(field: dataclasses.Field) -> type:
    """The type of a `Config` field's command-line value (`int | None` -> `int`)."""
    hint = typing.get_type_hints(Config)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _value_parser(field: dataclasses.Field, kind: type):
    """The argparse `type` of a numeric option: parse, then check the field's rule (so
    that a value out of range is an argparse error naming the option)."""
    rule = field.metadata["rule"]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule.describe()}, got {text!r}")
        try:
            rule.check(field.name, value)
        except ValueError as e:  # "`lr` must be ..." -> "argument --lr: must be ..."
            raise argparse.ArgumentTypeError(str(e).replace(f"`{field.name}` ", "", 1))
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The parser: one option per `Config` field (``--name-with-dashes``, with the
    field's help text and group), plus ``--quick`` and ``--no-progress``."""
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
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for field in dataclasses.fields(Config):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        help_text = meta["help"].format(default=field.default).replace("%", "%%")
        kind = _option_type(field)
        g = groups[meta["group"]]
        if kind is bool:
            g.add_argument(flag, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = dict(type=kind, help=help_text)
        if meta["rule"] is not None:
            kwargs["type"] = _value_parser(field, kind)
            kwargs["help"] = f"{help_text} [{meta['rule'].describe()}]"
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        g.add_argument(flag, **kwargs)
    g = groups["data and schedule"]
    g.add_argument(
        "--quick",
        action="store_true",
        help="quick preset: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    groups["output, resuming, devices"].add_argument(
        "--no-progress", action="store_true", help="no progress bars"
    )
    return p


def config_from_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    """``(config, show_progress)`` from command-line arguments. Invalid settings
    (`Config.check`) are argparse errors: a message and exit status 2."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    quick = ns.pop("quick", False)
    progress = not ns.pop("no_progress", False)
    values: dict[str, Any] = dict(QUICK) if quick else {}
    values.update(ns)
    if os.environ.get("FIXEDPOINT_DISTRIBUTED", "") not in ("", "0"):
        values["distributed"] = True
    try:  # the coordinator's settings: the command line, else the environment
        values.update(distributed.from_environment(values))
    except ValueError as e:
        parser.error(str(e))
    if {"coordinator_address", "num_processes", "process_id"} & values.keys():
        values["distributed"] = True
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in values.items() if k in fields})
    try:
        config.check()
    except ValueError as e:
        parser.error(_as_options(str(e)))
    return config, progress


def _as_options(message: str) -> str:
    """A `Config` message in the command line's words: `batch_size` -> `--batch-size`."""
    for field in dataclasses.fields(Config):
        message = message.replace(f"`{field.name}`", "--" + field.name.replace("_", "-"))
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: train as `argv` (default: ``sys.argv[1:]``) says. Returns the
    exit status (see the epilog of `build_parser`); errors are one line on stderr."""
    config, progress = config_from_args(argv)
    try:
        from .checkpoint import CheckpointError
        from .data import MNISTDataError
        from .train import DirectoryInUseError, train, TrainingInterrupted, WriteError
    except KeyboardInterrupt:  # (importing JAX takes a while)
        print("fixedpoint-mnist: interrupted before training began; nothing saved", file=sys.stderr)
        return 130
    compile_cache.enable(config.compilation_cache)  # (before anything is compiled)
    try:
        result = train(config, progress=progress)
    except SetupError as e:
        print(f"fixedpoint-mnist: error: {_as_options(str(e))}", file=sys.stderr)
        return 2
    except (MNISTDataError, CheckpointError, DirectoryInUseError, WriteError) as e:
        print(f"fixedpoint-mnist: error: {_as_options(str(e))}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"fixedpoint-mnist: {_as_options(str(e))}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # (before training began: nothing was written)
        print("fixedpoint-mnist: interrupted before training began; nothing saved", file=sys.stderr)
        return 130
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
