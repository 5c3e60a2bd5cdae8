"""MNIST deep-equilibrium example.

- `data`: the strict IDX reader and the verified loader (`load_mnist`).
- `model`: the convolutional DEQ classifier (`DEQClassifier`, `ConvCell`).
- `train`: data-parallel, resumable training (`Config`, `train`) and `load_model` (a
  trained model from its checkpoint).
- ``python -m fixedpoint_deq.mnist`` / ``fixedpoint-mnist``: the command line
  (``--help`` lists every option; ``--quick`` for a short run).
"""
