from typing import Any

from .._validate import check_choice
from ._base import AbstractFixedPointRootFinder as AbstractFixedPointRootFinder
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .neumann import Neumann as Neumann


_BY_NAME: dict[str, type[AbstractFixedPointRootFinder]] = {
    "anderson": Anderson,
    "broyden": Broyden,
    "neumann": Neumann,
    "picard": Neumann,
}


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
    check_choice("name", name, tuple(_BY_NAME))
    return _BY_NAME[name](**kwargs)
