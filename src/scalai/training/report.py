"""What a save did, as seen from one rank: the one record both the synchronous save
(:mod:`scalai.training.save`) and the background save (:mod:`scalai.training.background`)
return."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SaveReport"]


@dataclass(frozen=True)
class SaveReport:
    """What :func:`save` did, as seen from one rank.

    Attributes:
        step: the step saved.
        rank_bytes: bytes of tensor data this rank wrote (a replica is written by one of
            its holders: once in a checkpoint directory, once per host in stores).
        total_bytes: bytes of tensor data all ranks wrote.
        seconds: wall time per phase (``begin``, ``write``, ``commit``; in the background:
            ``begin``, ``stage``) and ``total``.
        background: written in the background (the bytes are those staged; the version
            is committed by the next collective call, see :mod:`scalai.training.background`).
        skipped: a background save skipped because the previous one was still writing.
    """

    step: int
    rank_bytes: int
    total_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    background: bool = False
    skipped: bool = False
