"""Helpers of the data tests (a uniquely named module: several test directories have a
conftest.py, so ``from conftest import ...`` would depend on collection order)."""

from __future__ import annotations

from pathlib import Path


def concat_bytes(paths: list[Path]) -> bytes:
    """The files' bytes, concatenated in order."""
    return b"".join(Path(p).read_bytes() for p in paths)
