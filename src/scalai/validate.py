"""Validators of single values, shared by configurations, parsers and the CLI.

One function per kind of value, so that every place that takes, say, a count says the
same thing about a bad one. Each returns the value (normalized) or raises
:class:`ValueError` naming it, what is wrong and, through ``hint``, how to fix it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["integer", "finite", "MAX_INT64"]

#: Largest signed 64-bit integer: positions and counts that go into numpy arrays must fit.
MAX_INT64 = 2**63 - 1


def integer(name: str | None, value: Any, minimum: int | None = 0, maximum: int | None = None,
            hint: str = "") -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Accepts Python and numpy integers; refuses ``bool``, floats (``1100.5`` is not
    truncated to 1100, nor is ``4.0`` taken for 4) and strings.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{_what(name, value)} is not an integer{_bounds(minimum, maximum)}{hint}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{_what(name, value)} is out of range: it must be an integer"
                         f"{_bounds(minimum, maximum)}{hint}")
    return value


def finite(name: str | None, value: Any, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float`` (no NaN, no infinity) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{_what(name, value)} is not a finite number"
                         f"{_bounds(minimum, maximum, exclusive_minimum)}{hint}")
    value = float(value)
    low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if low or (maximum is not None and value > maximum):
        raise ValueError(f"{_what(name, value)} is out of range: it must be a number"
                         f"{_bounds(minimum, maximum, exclusive_minimum)}{hint}")
    return value


def _what(name: str | None, value: Any) -> str:
    """``name=value``, or the value alone when the caller names it (a CLI option)."""
    shown = _num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
    return shown if name is None else f"{name}={shown}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds(minimum, maximum, exclusive_minimum: bool = False) -> str:
    low = "" if minimum is None else f" {'>' if exclusive_minimum else '>='} {_num(minimum)}"
    high = "" if maximum is None else f" <= {_num(maximum)}"
    if low and high:
        return f"{low} and{high}"
    return low or high
