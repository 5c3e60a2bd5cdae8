"""MNIST deep-equilibrium example: data loading (`data`)."""
