"""`Config`: every setting of a training run, with its command-line documentation.

Each field carries its help text and its group in ``--help`` as field metadata
(`option`), so that the command line (`fixedpoint_deq.mnist.__main__`) is derived
from this class and cannot drift from it: one option ``--name-with-dashes`` per field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fixedpoint._validate import check_bool, check_choice, check_int, check_real

from .model import HEADS


FORWARD_SOLVERS = ("anderson", "broyden", "neumann")
NORMS = ("none", "weight", "spectral")
BACKWARD_MODES = ("implicit", "jfb", "phantom")
BACKWARD_SOLVERS = ("anderson", "broyden", "neumann")

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
RESUME_KEYS += ("norm", "dropout")  # they change the model's leaves

# Settings that do not change the computation of a step (so runs differing only in
# them share the jitted steps and their compilations).
NOT_IN_STEP = (
    "data_dir",
    "epochs",
    "train_subset",
    "test_subset",
    "checkpoint_dir",
    "resume",
    "out_dir",
    "distributed",
    "eval_batch_size",
)

# Names of fields in checkpoints written by earlier versions.
_RENAMED = {"phantom_damping": "phantom_beta"}


def option(
    default: Any,
    group: str,
    help: str,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A `Config` field with its command-line documentation. In `help`, ``{default}``
    is replaced by the default value."""
    assert group in GROUPS, group
    metadata = dict(group=group, help=help, metavar=metavar, choices=choices)
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
    epochs: int = option(3, "data and schedule", "training epochs (default {default})")
    batch_size: int = option(
        64,
        "data and schedule",
        "global batch size, a multiple of the device count (default {default})",
    )
    eval_batch_size: int = option(
        500, "data and schedule", "batch size for the test set (default {default})"
    )
    lr: float = option(
        5e-3,
        "data and schedule",
        "peak AdamW learning rate of the warmup+cosine schedule (default {default})",
    )
    warmup_steps: int = option(200, "data and schedule", "linear warmup steps (default {default})")
    weight_decay: float = option(
        1e-4, "data and schedule", "AdamW weight decay (default {default})"
    )
    clip_norm: float = option(
        1.0, "data and schedule", "clip gradients to this global norm (default {default})"
    )
    # Model.
    width: int = option(12, "model", "channels C of the DEQ state (default {default})")
    groups: int = option(1, "model", "GroupNorm groups (default {default})")
    head: str = option(
        "pool4",
        "model",
        "classifier head: 'mean' = global mean pool + Linear(C, 10) (the seed's), "
        "'pool4' = 4x4 average pool + Linear(16 C, 10) (default {default})",
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
        5, "forward solver", "Anderson history size m, forward and backward (default {default})"
    )
    beta: float = option(
        1.0,
        "forward solver",
        "mixing/damping beta in (0, 1] of the forward solver (default {default})",
    )
    broyden_memory: int = option(
        30, "forward solver", "Broyden memory, forward and backward (default {default})"
    )
    max_steps: int = option(30, "forward solver", "maximum forward steps (default {default})")
    fwd_tol: float = option(
        1e-2,
        "forward solver",
        "forward tolerance: stop when rms(r / (tol + tol |z|)) < 1 (default {default})",
    )
    # Backward pass.
    backward: str = option(
        "phantom",
        "backward pass",
        "'implicit' (implicit differentiation with a backward linear solve), 'jfb' "
        "(Jacobian-free) or 'phantom' (damped unrolled steps) (default {default})",
        choices=BACKWARD_MODES,
    )
    backward_solver: str = option(
        "anderson",
        "backward pass",
        "linear solver of --backward implicit (default {default})",
        choices=BACKWARD_SOLVERS,
    )
    backward_max_steps: int = option(
        20, "backward pass", "maximum backward steps of --backward implicit (default {default})"
    )
    backward_tol: float = option(
        1e-2, "backward pass", "relative tolerance of the backward solve (default {default})"
    )
    phantom_steps: int = option(
        5, "backward pass", "unrolled steps of --backward phantom (default {default})"
    )
    phantom_beta: float = option(
        0.5,
        "backward pass",
        "damping beta in (0, 1] of --backward phantom, as the forward --beta (default {default})",
    )
    # Regularisation and data.
    jac_reg: float = option(
        0.5,
        "backward pass",
        "weight of the Jacobian regularisation ||J_f||_F^2 / d in the loss (0 turns it "
        "off; default {default})",
    )
    augment_shift: int = option(
        0,
        "data and schedule",
        "random translations of up to PIXELS (default {default}: off)",
        metavar="PIXELS",
    )
    train_subset: int | None = option(
        None,
        "data and schedule",
        "use only the first N training digits (default: all 60000)",
        metavar="N",
    )
    test_subset: int | None = option(
        None,
        "data and schedule",
        "evaluate on the first N test digits only (default: all 10000)",
        metavar="N",
    )
    seed: int = option(
        0, "data and schedule", "seed of initialisation, data order and probes (default {default})"
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
    )
    norm_clip: bool = option(
        False, "DEQ toolkit", "--norm: only scale the weight down to the target, never up"
    )
    norm_learn_scale: bool = option(
        False, "DEQ toolkit", "--norm weight: learn the row scales (default: fixed target)"
    )
    power_iterations: int = option(
        1, "DEQ toolkit", "power-iteration steps per step of --norm spectral (default {default})"
    )
    dropout: float = option(
        0.0,
        "DEQ toolkit",
        "variational channel dropout rate in the cell, in [0, 1): one mask per sample "
        "per solve (default {default}: off)",
    )
    eval_max_steps: int | None = option(
        None,
        "DEQ toolkit",
        "forward step budget at evaluation (default: --max-steps)",
        metavar="N",
    )
    eval_fwd_tol: float | None = option(
        None,
        "DEQ toolkit",
        "forward tolerance at evaluation (default: --fwd-tol)",
        metavar="TOL",
    )
    jac_reg_every: int = option(
        1,
        "DEQ toolkit",
        "compute the Jacobian regulariser on every N-th training step only (default {default})",
        metavar="N",
    )
    spectral_radius_steps: int = option(
        0,
        "DEQ toolkit",
        "log a power-iteration estimate (N JVPs) of the spectral radius of the cell's "
        "Jacobian at the test fixed points (default {default}: off)",
        metavar="N",
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
    )
    correction_gamma: float = option(
        0.8,
        "DEQ toolkit",
        "decay of the correction losses' weights (default {default})",
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
    out_dir: str | None = option(
        None, "output, resuming, devices", "write metrics.jsonl and metrics.png here", metavar="DIR"
    )
    distributed: bool = option(
        False,
        "output, resuming, devices",
        "multi-host: call jax.distributed.initialize() first (also when FIXEDPOINT_DISTRIBUTED=1)",
    )

    def check(self) -> None:
        """Raise `ValueError` on a setting out of range (naming it)."""
        for name in (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "width",
            "groups",
            "anderson_m",
            "broyden_memory",
            "max_steps",
            "backward_max_steps",
            "phantom_steps",
            "power_iterations",
            "jac_reg_every",
        ):
            check_int(name, getattr(self, name), low=1)
        for name in ("train_subset", "test_subset"):
            check_int(name, getattr(self, name), low=1, allow_none=True)
        for name in ("warmup_steps", "augment_shift", "seed", "spectral_radius_steps"):
            check_int(name, getattr(self, name), low=0)
        check_real("lr", self.lr, low=0.0, low_open=True)
        check_real("clip_norm", self.clip_norm, low=0.0, low_open=True)
        for name in ("weight_decay", "jac_reg", "fwd_tol", "backward_tol"):
            check_real(name, getattr(self, name), low=0.0)
        check_real("beta", self.beta, low=0.0, high=1.0, low_open=True)
        check_real("phantom_beta", self.phantom_beta, low=0.0, high=1.0, low_open=True)
        check_choice("solver", self.solver, FORWARD_SOLVERS)
        check_choice("backward", self.backward, BACKWARD_MODES)
        check_choice("backward_solver", self.backward_solver, BACKWARD_SOLVERS)
        check_choice("head", self.head, HEADS)
        check_choice("norm", self.norm, NORMS)
        check_real("norm_target", self.norm_target, low=0.0, low_open=True)
        check_bool("norm_clip", self.norm_clip)
        check_bool("norm_learn_scale", self.norm_learn_scale)
        check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_int("eval_max_steps", self.eval_max_steps, low=1, allow_none=True)
        check_real("eval_fwd_tol", self.eval_fwd_tol, low=0.0, allow_none=True)
        check_bool("reuse_fixed_points", self.reuse_fixed_points)
        check_int("correction_states", self.correction_states, low=0, high=self.max_steps - 1)
        check_real("correction_gamma", self.correction_gamma, low=0.0, high=1.0)
        if self.reuse_fixed_points and self.distributed:
            raise ValueError(
                "`reuse_fixed_points` keeps the cache in this process: it does not support "
                "`distributed` (multi-host) runs."
            )
        check_bool("resume", self.resume)
        check_bool("distributed", self.distributed)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("`resume` needs a `checkpoint_dir`.")

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Config:
        """The configuration saved in a checkpoint (unknown keys are ignored, renamed
        ones are read under their new name)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {_RENAMED.get(k, k): v for k, v in saved.items()}
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
