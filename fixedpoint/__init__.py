"""fixedpoint: Anderson, Broyden and Neumann fixed-point / root-finding solvers for JAX.

Every solver is an `optimistix.AbstractRootFinder`, so both `optx.root_find` and
`optx.fixed_point` accept it.
"""

from ._solver import Anderson as Anderson, Broyden as Broyden, Neumann as Neumann

__version__ = "0.1.0"
