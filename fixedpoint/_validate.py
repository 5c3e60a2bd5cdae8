"""Validation of hyperparameters, shared by every module of `fixedpoint` and, through
`fixedpoint.internal`, of `fixedpoint_deq` (solvers, adjoints, linear solvers, the DEQ
layer, the seed API and the MNIST configuration).

The rules follow what optimistix accepts, and refuse early what would fail (or silently
misbehave) later inside a solve:

- a real number may be a Python `int`/`float`, a NumPy scalar (`np.float32(1e-3)`), a
  0-d array, or a *traced* 0-d JAX value (a tolerance built inside `jax.jit`): its range
  is then checked only when it is concrete;
- an integer may be a Python `int`, a NumPy integer or a concrete 0-d integer array, but
  not a traced value (integers set shapes and loop lengths); use `as_int` as the field
  converter so that the stored value is a Python `int`;
- refused with a `ValueError` naming the parameter and the allowed range: strings
  (`rtol="1e-3"`, as a YAML file gives), `bool`s where a number is expected, NaN, arrays
  that are not scalars, values out of range.
"""

import math
from collections.abc import Collection
from typing import Any

import numpy as np
from jax.core import Tracer


def _is_traced(value: Any) -> bool:
    return isinstance(value, Tracer)


def _describe(value: Any) -> str:
    return f"{value!r} (a {type(value).__name__})"


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """The allowed range in words, led by a space (empty when there are no bounds: an
    infinite bound is no bound)."""
    if low == -math.inf and high == math.inf:
        return ""
    if high == math.inf:
        return f" > {low:g}" if low_open else f" >= {low:g}"
    if low == -math.inf:
        return f" < {high:g}" if high_open else f" <= {high:g}"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f" in {left}{low:g}, {high:g}{right}"


def _dtype_kind(value: Any) -> str | None:
    """The NumPy dtype kind of a numeric scalar-like value, or None if it is not one."""
    if isinstance(value, (bool, np.bool_)):
        return "b"
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    dtype = getattr(value, "dtype", None)
    if dtype is None or getattr(value, "shape", None) != ():
        return None
    try:
        return np.dtype(dtype).kind
    except TypeError:  # e.g. a PRNG key dtype
        return None


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    finite: bool = False,
) -> None:
    """Raise `ValueError` naming `name` unless `value` is a real scalar in the interval
    from `low` to `high` (closed unless `low_open` / `high_open`), and not infinite if
    `finite`. NaN is always refused. A traced value is accepted if it is a real 0-d
    array; its range cannot be checked."""
    allowed = _interval(low, high, low_open, high_open)
    what = "a finite real number" if finite else "a real number"
    if value is None and allow_none:
        return
    kind = _dtype_kind(value)
    if kind not in ("i", "u", "f"):
        raise ValueError(f"`{name}` must be {what}{allowed}, got {_describe(value)}.")
    if _is_traced(value):
        return
    v = float(value)  # pyright: ignore[reportArgumentType]  (a real scalar, checked above)
    if math.isnan(v):
        raise ValueError(f"`{name}` must be {what}{allowed}, got NaN (not a number).")
    ok = not (finite and math.isinf(v))
    ok = ok and (v > low if low_open else v >= low)
    ok = ok and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"`{name}` must be {what}{allowed}, got {value!r}.")


def check_int(
    name: str,
    value: Any,
    *,
    low: int,
    high: int | None = None,
    allow_none: bool = False,
) -> None:
    """Raise `ValueError` naming `name` unless `value` is a concrete integer in
    ``[low, high]`` (`high=None`: no upper bound)."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    if value is None and allow_none:
        return
    if _is_traced(value):
        raise ValueError(
            f"`{name}` must be a concrete integer {allowed} (it sets a shape or a loop "
            f"length), not a traced value: pass it as a static (non-traced) argument."
        )
    if _dtype_kind(value) not in ("i", "u"):
        raise ValueError(f"`{name}` must be an integer {allowed}, got {_describe(value)}.")
    v = int(value)  # pyright: ignore[reportArgumentType]  (an integer scalar, checked above)
    if v < low or (high is not None and v > high):
        raise ValueError(f"`{name}` must be an integer {allowed}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raise `ValueError` naming `name` unless `value` is a `bool` (or `np.bool_`)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {_describe(value)}.")


def check_choice(name: str, value: Any, allowed: Collection[str]) -> None:
    """Raise `ValueError` naming `name` unless `value` is one of `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def check_callable(name: str, value: Any, what: str) -> None:
    """Raise `ValueError` naming `name` unless `value` is callable (`what` says how)."""
    if not callable(value):
        raise ValueError(f"`{name}` must be a callable {what}, got {_describe(value)}.")


def as_int(value: Any) -> Any:
    """Field converter: a NumPy integer or a concrete 0-d integer array becomes a Python
    `int` (so that it stays static under `jax.jit`); anything else is returned
    unchanged, for `check_int` to accept or refuse."""
    if isinstance(value, (bool, np.bool_)) or _is_traced(value):
        return value
    if _dtype_kind(value) in ("i", "u"):
        return int(value)
    return value


def as_bool(value: Any) -> Any:
    """Field converter: `np.bool_` becomes `bool`; anything else is unchanged."""
    return bool(value) if isinstance(value, np.bool_) else value
