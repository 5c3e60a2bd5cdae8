"""MNIST deep-equilibrium example.

- `data`: the strict IDX reader and the verified loader (`load_mnist`).
- `model`: the convolutional DEQ classifier (`DEQClassifier`, `ConvCell`).
- `config`: `Config`, every setting of a run (the command line is derived from it).
- `build`: the model, its solvers and the optimiser, from a `Config`.
- `inputs`, `steps`, `sharding`, `checkpoint`, `metrics`: the input pipeline, the jitted
  steps, data parallelism, checkpoints (and `load_model`), metrics files and plots.
- `train`: the training loop (`train`), data-parallel and resumable, and the errors of
  a run.
- `load_model(directory)`: a trained model from its checkpoint
  (`fixedpoint_deq.mnist.checkpoint.load_model`).
- ``python -m fixedpoint_deq.mnist`` / ``fixedpoint-mnist``: the command line
  (``--help`` lists every option; ``--quick`` for a short run).
"""

from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:
    from .checkpoint import load_model as load_model

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `fixedpoint_deq.mnist.data` must stay importable without
    # the training dependencies (optax, matplotlib).
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
