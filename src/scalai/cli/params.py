"""Option types shared by every command: one validator per kind of value.

Every count, port, seed, size, rate or positive number that a command takes is parsed by
one of these, so the same bad value gets the same one-line answer whichever command it is
given to (``-g 0`` to ``plan`` and to ``reshard`` alike). The checks themselves are
:mod:`scalai.validate`'s and :mod:`scalai.units`'; these wrap them as click types.
"""

from __future__ import annotations

import click

from ..units import parse_rate, parse_size
from ..validate import MAX_INT64, finite, integer

__all__ = ["COUNT", "NON_NEGATIVE", "PORT", "SEED", "POSITIVE_NUMBER", "SIZE", "RATE"]


class _Integer(click.ParamType):
    """An integer in ``[minimum, maximum]``; ``name`` is what ``--help`` calls it."""

    def __init__(self, name: str, minimum: int, maximum: int = MAX_INT64, hint: str = ""):
        self.name, self.minimum, self.maximum, self.hint = name, minimum, maximum, hint

    def convert(self, value, param, ctx):
        if not isinstance(value, int) or isinstance(value, bool):
            try:
                value = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{str(value)[:40]!r} is not an integer", param, ctx)
        # The 64-bit ceiling of most types is named only to a value above it.
        maximum = self.maximum if self.maximum < MAX_INT64 or value > MAX_INT64 else None
        try:
            return integer(None, value, self.minimum, maximum, self.hint)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Positive(click.ParamType):
    """A finite number above zero (``nan``, ``inf`` and ``-1`` refused)."""

    name = "number"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{str(value)[:40]!r} is not a number", param, ctx)
        try:
            return finite(None, number, 0.0, exclusive_minimum=True)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Parsed(click.ParamType):
    """A value parsed by a :mod:`scalai.units` function."""

    def __init__(self, name: str, parse):
        self.name, self._parse = name, parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


#: Something counted from one: devices, hosts, ranks per host, threads, steps, samples.
COUNT = _Integer("count", 1)
#: Zero or more (an epoch, a position, "every N steps" where 0 turns it off).
NON_NEGATIVE = _Integer("integer", 0)
#: A TCP port; 0 lets the system choose a free one.
PORT = _Integer("port", 0, 65535, hint=" (0: any free port)")
#: The seed of a random order or of synthetic values.
SEED = _Integer("seed", 0, MAX_INT64)
#: A finite number above zero (GiB of device memory, a learning rate).
POSITIVE_NUMBER = _Positive()
#: A byte size such as 512M or 8G.
SIZE = _Parsed("size", parse_size)
#: A rate such as 1gbit or 50MB (bytes per second).
RATE = _Parsed("rate", parse_rate)
