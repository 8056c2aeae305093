"""Integer and bool arguments, checked one way across the package.

An int argument is anything ``numbers.Integral`` but a bool: Python's ints and numpy's integer
scalars (a batch size computed with numpy is fine), never ``True`` (an int to Python, a mistake
here). A value of another type is a TypeError, an int out of range a ValueError; both name the
caller, the argument, what it must be and what it was: ``few_shot: shots=-1 must be an int >=
0``. A bool argument is a Python bool: a switch given as 1, "yes" or ``numpy.True_`` is a
TypeError, not read as true.
"""
from __future__ import annotations

import numbers
from typing import Optional

__all__ = ["is_int", "check_int", "check_bool"]


def is_int(value) -> bool:
    """True for an integer that is not a bool (int, numpy's integer scalars)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(where: str, name: str, value, minimum: Optional[int] = None,
              maximum: Optional[int] = None, *, none: Optional[str] = None,
              means: Optional[str] = None) -> Optional[int]:
    """``int(value)``, checked: TypeError unless ``value`` is an int (``is_int``), ValueError
    unless ``minimum <= value <= maximum`` (a bound that is None is not checked).

    ``none``: None is allowed and returned; the text says what it stands for (``"whole texts"``
    reads "must be None (whole texts) or an int >= 1"). ``means``: what the number counts, added
    to the message (``"slots per token"``)."""
    if value is None and none is not None:
        return None
    if minimum is not None and maximum is not None:
        want = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        want = f"an int >= {minimum}"
    elif maximum is not None:
        want = f"an int <= {maximum}"
    else:
        want = "an int"
    if none is not None:
        want = f"None ({none}) or {want}"
    if means is not None:
        want = f"{want} ({means})"
    if not is_int(value):
        raise TypeError(f"{where}: {name}={value!r} must be {want}, got {type(value).__name__}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{where}: {name}={value!r} must be {want}")
    return int(value)


def check_bool(where: str, name: str, value) -> bool:
    """``value``, unless it is not a Python bool: TypeError naming its type by module where it
    has one (``numpy.bool``, not a puzzling "bool")."""
    if not isinstance(value, bool):
        kind = type(value)
        kind_name = (kind.__name__ if kind.__module__ == "builtins"
                     else f"{kind.__module__}.{kind.__qualname__}")
        raise TypeError(f"{where}: {name}={value!r} must be a bool, got {kind_name}")
    return value
