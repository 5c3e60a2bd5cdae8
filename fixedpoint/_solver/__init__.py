from typing import Any

from ._base import AbstractFixedPointRootFinder as AbstractFixedPointRootFinder
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .neumann import Neumann as Neumann
from .newton_krylov import NewtonKrylov as NewtonKrylov
from .polyalgorithm import Polyalgorithm as Polyalgorithm


def solver_from_name(name: str, **kwargs: Any) -> AbstractFixedPointRootFinder:
    """The root finder called `name`, built with `kwargs`.

    **Arguments:**

    - `name`: `"anderson"` ([`fixedpoint.Anderson`][]), `"broyden"`
        ([`fixedpoint.Broyden`][]), `"neumann"` or its alias `"picard"` (plain damped
        iteration, [`fixedpoint.Neumann`][]).
    - `kwargs`: the keyword arguments of that class (e.g. `rtol`, `atol`, `m`, `beta`).

    **Returns:** the solver. **Raises:** `ValueError` for an unknown name (the message
    lists the known ones); the class's own errors for invalid keyword arguments.

    The backward linear solvers have the same factory,
    [`fixedpoint.linear.solver_from_name`][].
    """
    from .._registry import root_finder  # (the registry imports this module)

    return root_finder(name, **kwargs)
