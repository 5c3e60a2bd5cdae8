from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .neumann import Neumann as Neumann
