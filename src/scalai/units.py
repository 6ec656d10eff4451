"""Byte sizes and rates, in both directions: ``human_bytes(2**30) == "1.00 GiB"``,
``parse_size("8G") == 8 * 2**30``, ``parse_rate("1gbit") == 125e6`` (bytes per second)."""

from __future__ import annotations

import math

__all__ = ["human_bytes", "parse_size", "parse_rate"]

_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RATE_UNITS = (("gbit", 1e9 / 8), ("mbit", 1e6 / 8), ("kbit", 1e3 / 8), ("gb", 1e9), ("mb", 1e6),
               ("kb", 1e3), ("b", 1.0))


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"`` (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def parse_size(text: str, name: str | None = None) -> int:
    """``"8G"``, ``"512M"``, ``"1.5T"``, ``"1000000"`` (bytes; K/M/G/T are powers of 1024,
    a trailing ``B`` or ``iB`` is allowed) -> a positive number of bytes.

    Raises:
        ValueError: not a size, or not positive.
    """
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = _SIZE_UNITS.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _SIZE_UNITS else t
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value * scale < 1 or value * scale >= 2**63:
        raise ValueError(f"{_named(name, text)} is not a positive size; write e.g. 512M or 8G")
    return int(value * scale)


def parse_rate(text: str, name: str | None = None) -> float:
    """``"1gbit"``, ``"400mbit"``, ``"50MB"`` (optionally ``/s`` or ``ps``) -> a positive,
    finite number of bytes per second.

    Raises:
        ValueError: not a rate, or not positive.
    """
    t = str(text).strip().lower().removesuffix("/s").removesuffix("ps")
    for suffix, scale in _RATE_UNITS:
        if t.endswith(suffix):
            try:
                value = float(t[: -len(suffix)]) * scale
            except ValueError:
                break
            if math.isfinite(value) and value > 0:
                return value
            break
    raise ValueError(f"{_named(name, text)} is not a positive rate; write e.g. 1gbit, 400mbit or 50MB")


def _named(name: str | None, text: str) -> str:
    return f"{name} {text!r}" if name else repr(text)
