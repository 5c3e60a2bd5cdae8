"""`Config`: every setting of a training run, with its command-line documentation.

Each field carries its help text, its group in ``--help`` and, for a number, its rule
(`Integer`, `Real`: the allowed range) as field metadata (`option`), so that the command
line (`fixedpoint_deq.mnist.__main__`) is derived from this class and cannot drift from
it: one option ``--name-with-dashes`` per field, whose value is checked by the same rule
as in `Config.check` (a value out of range is an argparse error, exit status 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from fixedpoint.internal import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    solver_names,
    TRAINER_BACKWARD,
    TRAINER_FORWARD,
)

from .distributed import check_options
from .model import head_grid, HEADS


# The solver names of `fixedpoint.internal.SOLVERS`, without the alias "picard".
FORWARD_SOLVERS = solver_names(aliases=False)
NORMS = ("none", "weight", "spectral")
BACKWARD_MODES = ("implicit", "jfb", "phantom", "unrolled")
BACKWARD_SOLVERS = solver_names(aliases=False)

#: The groups of ``--help``, in order.
GROUPS = (
    "data and schedule",
    "model",
    "forward solver",
    "backward pass",
    "DEQ toolkit",
    "output, resuming, devices",
)

# Settings that shape the model or the data stream: a resumed run must agree on them.
RESUME_KEYS = ("width", "groups", "head", "seed", "batch_size", "train_subset", "augment_shift")
RESUME_KEYS += ("norm", "dropout", "stem_stride", "stem_width")  # they change the model's leaves

#: The sizes of MNIST's training and test sets.
MNIST_TRAIN_SIZE = 60000
MNIST_TEST_SIZE = 10000

# Settings that do not change the computation of a step (so runs differing only in
# them share the jitted steps and their compilations).
NOT_IN_STEP = (
    "data_dir",
    "epochs",
    "train_subset",
    "test_subset",
    "checkpoint_dir",
    "resume",
    "overwrite",
    "out_dir",
    "distributed",
    "eval_batch_size",
    "coordinator_address",
    "num_processes",
    "process_id",
    "coordinator_timeout",
    "compilation_cache",
)

# Names of fields in checkpoints written by earlier versions.
_RENAMED = {"phantom_damping": "phantom_beta"}
# The values of later settings in checkpoints written before they existed.
_LEGACY = {"stem_stride": 1, "stem_width": 16}


class SetupError(ValueError):
    """A run that cannot start as configured (an output path that cannot be written, a
    checkpoint in the way): raised before any data is read or step is run."""


@dataclasses.dataclass(frozen=True)
class Integer:
    """The rule of an integer setting: in ``[low, high]`` (`high=None`: no bound)."""

    low: int
    high: int | None = None

    def check(self, name: str, value: Any) -> None:
        check_int(name, value, low=self.low, high=self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"an integer >= {self.low}"
        return f"an integer in [{self.low}, {self.high}]"


@dataclasses.dataclass(frozen=True)
class Real:
    """The rule of a real setting: finite, from `low` to `high` (closed unless
    `low_open` / `high_open`)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def check(self, name: str, value: Any) -> None:
        check_real(
            name,
            value,
            low=self.low,
            high=self.high,
            low_open=self.low_open,
            high_open=self.high_open,
            finite=True,
        )

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Integer(1)
NON_NEGATIVE = Integer(0)
BETA = Real(0.0, 1.0, low_open=True)


def option(
    default: Any,
    group: str,
    help: str,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    rule: Integer | Real | None = None,
) -> Any:
    """A `Config` field with its command-line documentation and, for a number, its
    `rule` (checked by `Config.check` and when the command line is parsed). In `help`,
    ``{default}`` is replaced by the default value."""
    assert group in GROUPS, group
    metadata = dict(group=group, help=help, metavar=metavar, choices=choices, rule=rule)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class Config:
    """Every setting of a training run (see ``fixedpoint-mnist --help``; the command line
    maps onto it one to one)."""

    data_dir: str | None = option(
        None,
        "data and schedule",
        "directory holding the four MNIST IDX files (default: $FIXEDPOINT_MNIST_DIR, else "
        "the cache; e.g. ../shared/data/mnist)",
        metavar="DIR",
    )
    epochs: int = option(
        10, "data and schedule", "training epochs (default {default})", rule=POSITIVE
    )
    batch_size: int = option(
        64,
        "data and schedule",
        "global batch size, a multiple of the device count (default {default})",
        rule=POSITIVE,
    )
    eval_batch_size: int = option(
        500,
        "data and schedule",
        "batch size for the test set (default {default})",
        rule=POSITIVE,
    )
    lr: float = option(
        5e-3,
        "data and schedule",
        "peak AdamW learning rate of the warmup+cosine schedule (default {default})",
        rule=Real(0.0, low_open=True),
    )
    warmup_steps: int = option(
        200, "data and schedule", "linear warmup steps (default {default})", rule=NON_NEGATIVE
    )
    weight_decay: float = option(
        1e-4,
        "data and schedule",
        "AdamW weight decay (default {default})",
        rule=Real(0.0),
    )
    clip_norm: float = option(
        1.0,
        "data and schedule",
        "clip gradients to this global norm (default {default})",
        rule=Real(0.0, low_open=True),
    )
    # Model.
    width: int = option(
        48, "model", "channels C of the DEQ state (default {default})", rule=POSITIVE
    )
    groups: int = option(1, "model", "GroupNorm groups (default {default})", rule=POSITIVE)
    stem_stride: int = option(
        2,
        "model",
        "stride of the stem: 1 keeps the DEQ state at 28x28, 2 downsamples it to 14x14 "
        "(a stride-2 convolution after a --stem-width convolution) (default {default})",
        rule=Integer(1, 2),
    )
    stem_width: int = option(
        16,
        "model",
        "channels of the first stem convolution of --stem-stride 2 (default {default})",
        rule=POSITIVE,
    )
    head: str = option(
        "pool7",
        "model",
        "classifier head: 'mean' = global mean pool + Linear(C, 10) (the seed's), "
        "'pool4' = 4x4 average pool + Linear(16 C, 10) (with --stem-stride 1 only: the grid "
        "must divide the state), 'pool7' = 7x7 average pool + Linear(49 C, 10) "
        "(default {default})",
        choices=HEADS,
    )
    # Forward solver.
    solver: str = option(
        "anderson",
        "forward solver",
        "forward root finder (default {default})",
        choices=FORWARD_SOLVERS,
    )
    anderson_m: int = option(
        5,
        "forward solver",
        "Anderson history size m, forward and backward (default {default})",
        rule=POSITIVE,
    )
    beta: float = option(
        1.0,
        "forward solver",
        "mixing/damping beta in (0, 1] of the forward solver (default {default})",
        rule=BETA,
    )
    broyden_memory: int = option(
        30,
        "forward solver",
        "Broyden memory, forward and backward (default {default})",
        rule=POSITIVE,
    )
    max_steps: int = option(
        30, "forward solver", "maximum forward steps (default {default})", rule=POSITIVE
    )
    fwd_tol: float = option(
        TRAINER_FORWARD.tol,
        "forward solver",
        "forward tolerance: stop when rms(r / (tol + tol |z|)) < 1 (default {default})",
        rule=Real(0.0),
    )
    # Backward pass.
    backward: str = option(
        "phantom",
        "backward pass",
        "'implicit' (implicit differentiation with a backward linear solve), 'jfb' "
        "(Jacobian-free), 'phantom' (damped unrolled steps) or 'unrolled' (backpropagation "
        "through every forward step: with --solver neumann --fwd-tol 0 --max-steps K, the "
        "weight-tied K-layer network, not a DEQ; the ablation) (default {default})",
        choices=BACKWARD_MODES,
    )
    backward_solver: str = option(
        "anderson",
        "backward pass",
        "linear solver of --backward implicit (default {default})",
        choices=BACKWARD_SOLVERS,
    )
    backward_max_steps: int = option(
        20,
        "backward pass",
        "maximum backward steps of --backward implicit (default {default})",
        rule=POSITIVE,
    )
    backward_tol: float = option(
        TRAINER_BACKWARD.tol,
        "backward pass",
        "relative tolerance of the backward solve (default {default})",
        rule=Real(0.0),
    )
    phantom_steps: int = option(
        5,
        "backward pass",
        "unrolled steps of --backward phantom (default {default})",
        rule=POSITIVE,
    )
    phantom_beta: float = option(
        0.5,
        "backward pass",
        "damping beta in (0, 1] of --backward phantom, as the forward --beta (default {default})",
        rule=BETA,
    )
    # Regularisation and data.
    jac_reg: float = option(
        0.5,
        "backward pass",
        "weight of the Jacobian regularisation ||J_f||_F^2 / d in the loss (0 turns it "
        "off; default {default})",
        rule=Real(0.0),
    )
    augment_shift: int = option(
        2,
        "data and schedule",
        "shift each training image by a random translation of up to PIXELS pixels in "
        "each direction; 0 turns the shifts off (default {default})",
        metavar="PIXELS",
        rule=Integer(0, 27),
    )
    train_subset: int | None = option(
        None,
        "data and schedule",
        "use only the first N training digits (default: all 60000)",
        metavar="N",
        rule=Integer(1, MNIST_TRAIN_SIZE),
    )
    test_subset: int | None = option(
        None,
        "data and schedule",
        "evaluate on the first N test digits only (default: all 10000)",
        metavar="N",
        rule=Integer(1, MNIST_TEST_SIZE),
    )
    seed: int = option(
        0,
        "data and schedule",
        "seed of initialisation, data order and probes (default {default})",
        rule=Integer(0, 2**32 - 1),
    )
    # The DEQ toolkit (fixedpoint_deq): stabilisers, budgets, monitoring, reuse.
    norm: str = option(
        "none",
        "DEQ toolkit",
        "normalise the cell's convolution: 'weight' or 'spectral' normalisation "
        "(default {default})",
        choices=NORMS,
    )
    norm_target: float = option(
        1.0,
        "DEQ toolkit",
        "target norm of --norm spectral (spectral norm of the kernel's matrix view) or "
        "of a fixed-scale --norm weight (default {default})",
        rule=Real(0.0, low_open=True),
    )
    norm_clip: bool = option(
        False, "DEQ toolkit", "--norm: only scale the weight down to the target, never up"
    )
    norm_learn_scale: bool = option(
        False, "DEQ toolkit", "--norm weight: learn the row scales (default: fixed target)"
    )
    power_iterations: int = option(
        1,
        "DEQ toolkit",
        "power-iteration steps per step of --norm spectral (default {default})",
        rule=POSITIVE,
    )
    dropout: float = option(
        0.0,
        "DEQ toolkit",
        "variational channel dropout rate in the cell, in [0, 1): one mask per sample "
        "per solve (default {default}: off)",
        rule=Real(0.0, 1.0, high_open=True),
    )
    eval_max_steps: int | None = option(
        None,
        "DEQ toolkit",
        "forward step budget at evaluation (default: --max-steps)",
        metavar="N",
        rule=POSITIVE,
    )
    eval_fwd_tol: float | None = option(
        None,
        "DEQ toolkit",
        "forward tolerance at evaluation (default: --fwd-tol)",
        metavar="TOL",
        rule=Real(0.0),
    )
    jac_reg_every: int = option(
        1,
        "DEQ toolkit",
        "compute the Jacobian regulariser on every N-th training step only (default {default})",
        metavar="N",
        rule=POSITIVE,
    )
    spectral_radius_steps: int = option(
        0,
        "DEQ toolkit",
        "log a power-iteration estimate (N JVPs) of the spectral radius of the cell's "
        "Jacobian at the test fixed points (default {default}: off)",
        metavar="N",
        rule=NON_NEGATIVE,
    )
    reuse_fixed_points: bool = option(
        False,
        "DEQ toolkit",
        "warm-start each training example from its fixed point of the previous epoch "
        "(a per-example cache: 28*28*width floats per training digit, in memory and in "
        "the checkpoint)",
    )
    correction_states: int = option(
        0,
        "DEQ toolkit",
        "fixed-point correction: supervise N intermediate forward states, evenly spaced "
        "in the budget, each with a one-step phantom gradient (default {default}: off)",
        metavar="N",
        rule=NON_NEGATIVE,
    )
    correction_gamma: float = option(
        0.8,
        "DEQ toolkit",
        "decay of the correction losses' weights (default {default})",
        rule=Real(0.0, 1.0),
    )
    # Output.
    checkpoint_dir: str | None = option(
        None,
        "output, resuming, devices",
        "write a checkpoint here after every epoch (atomically)",
        metavar="DIR",
    )
    resume: bool = option(
        False,
        "output, resuming, devices",
        "continue from the checkpoint in --checkpoint-dir (if there is one)",
    )
    overwrite: bool = option(
        False,
        "output, resuming, devices",
        "start afresh although --checkpoint-dir holds a checkpoint, replacing it (it is "
        "kept until this run's first epoch is saved); without --resume or --overwrite a "
        "run refuses a directory that holds a checkpoint",
    )
    out_dir: str | None = option(
        None, "output, resuming, devices", "write metrics.jsonl and metrics.png here", metavar="DIR"
    )
    distributed: bool = option(
        False,
        "output, resuming, devices",
        "multi-host: call jax.distributed.initialize() first (also when FIXEDPOINT_DISTRIBUTED=1)",
    )
    coordinator_address: str | None = option(
        None,
        "output, resuming, devices",
        "multi-process without a cluster JAX detects: the coordinator, hosted by process 0 "
        "(implies --distributed; else $FIXEDPOINT_COORDINATOR_ADDRESS)",
        metavar="HOST:PORT",
    )
    num_processes: int | None = option(
        None,
        "output, resuming, devices",
        "multi-process: the number of processes (else $FIXEDPOINT_NUM_PROCESSES)",
        metavar="N",
        rule=POSITIVE,
    )
    process_id: int | None = option(
        None,
        "output, resuming, devices",
        "multi-process: this process's index, 0 to N-1 (else $FIXEDPOINT_PROCESS_ID)",
        metavar="I",
        rule=NON_NEGATIVE,
    )
    coordinator_timeout: int = option(
        300,
        "output, resuming, devices",
        "multi-process: give up (exit 1) when the coordinator or another process has not "
        "answered after this many seconds (default {default})",
        metavar="SECONDS",
        rule=POSITIVE,
    )
    compilation_cache: str | None = option(
        None,
        "output, resuming, devices",
        "keep compiled programs in DIR for the next run, or 'off' (default: "
        "$FIXEDPOINT_COMPILATION_CACHE, else ~/.cache/fixedpoint/jax)",
        metavar="DIR|off",
    )

    def check(self) -> None:
        """Raise `ValueError` on a setting out of range (naming it): each field's rule
        (its metadata), then the rules that tie settings together."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            meta = field.metadata
            if value is None and field.default is None:
                continue
            if meta["rule"] is not None:
                meta["rule"].check(field.name, value)
            elif meta["choices"] is not None:
                check_choice(field.name, value, meta["choices"])
            elif isinstance(field.default, bool):
                check_bool(field.name, value)
            elif not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"`{field.name}` must be a path, got {value!r}.")
        head_grid(self.head, self.stem_stride)
        if self.stem_stride > 1 and self.stem_width % self.groups:
            raise ValueError(
                f"`groups` ({self.groups}) must divide `stem_width` ({self.stem_width})."
            )
        if self.width % self.groups:
            raise ValueError(
                f"`groups` ({self.groups}) must divide `width` ({self.width}): GroupNorm "
                "splits the channels into groups of equal size."
            )
        n_train = MNIST_TRAIN_SIZE if self.train_subset is None else self.train_subset
        if self.batch_size > n_train:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) is larger than the training set "
                f"({n_train} digits): an epoch would have no step."
            )
        if self.correction_states >= self.max_steps:
            raise ValueError(
                f"`correction_states` ({self.correction_states}) must be below `max_steps` "
                f"({self.max_steps}): the corrected states are distinct forward steps."
            )
        check_options(
            self.coordinator_address, self.num_processes, self.process_id, self.distributed
        )
        if self.reuse_fixed_points and self.distributed:
            raise ValueError(
                "`reuse_fixed_points` keeps the cache in this process: it does not support "
                "`distributed` (multi-host) runs."
            )
        if self.resume and self.overwrite:
            raise ValueError("`resume` and `overwrite` exclude each other: pick one.")
        for name in ("resume", "overwrite"):
            if getattr(self, name) and self.checkpoint_dir is None:
                raise ValueError(f"`{name}` needs a `checkpoint_dir`.")

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Config:
        """The configuration saved in a checkpoint (unknown keys are ignored, renamed
        ones are read under their new name)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {_RENAMED.get(k, k): v for k, v in saved.items()}
        # Settings added later: a checkpoint without them was trained with these.
        values = {**_LEGACY, **values}
        return cls(**{k: v for k, v in values.items() if k in fields})

    def correction_steps(self) -> tuple[int, ...]:
        """The forward steps supervised by fixed-point correction: `correction_states`
        steps evenly spaced in ``[1, max_steps)`` (empty when off)."""
        n = self.correction_states
        return tuple(sorted({max(1, (i + 1) * self.max_steps // (n + 1)) for i in range(n)}))

    def step_settings(self) -> tuple[tuple[str, Any], ...]:
        """The settings that determine the jitted steps (hashable: a cache key)."""
        return tuple(
            sorted((k, v) for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_STEP)
        )
