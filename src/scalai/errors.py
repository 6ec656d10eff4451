"""Project exception types.

Bad input raises :class:`ValueError` (or a subclass) with what is wrong and how to fix it.
Failures of storage, processes and networks raise :class:`ScalaiError` subclasses. The CLI
turns both into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

__all__ = ["ScalaiError", "CheckpointError", "ChecksumError", "PlanError"]


class ScalaiError(Exception):
    """Base of scalai's own failures (I/O, distributed, integrity)."""


class CheckpointError(ScalaiError):
    """A checkpoint directory is missing, incomplete, truncated or unreadable."""


class ChecksumError(CheckpointError):
    """Stored bytes do not match the checksum recorded in the manifest."""

    @classmethod
    def mismatch(cls, where: str, tensor: str, stored: int, computed: int) -> ChecksumError:
        """The one message for a tensor whose bytes differ from its record."""
        return cls(f"checksum mismatch in {where}, tensor {tensor}: stored {stored:08x}, computed "
                   f"{computed:08x}; the data is corrupt: use an earlier checkpoint")


class PlanError(ScalaiError):
    """A plan cannot be made or does not cover its destination exactly once."""
