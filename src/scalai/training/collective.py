"""Collective steps that fail together: no rank is left waiting in a collective.

Every step of ``save`` and ``load`` that can fail on one rank (a missing file, a layout
that does not fit, a full disk) runs through :func:`agree`: each rank runs its part,
catches what it raised, and all ranks exchange outcomes with one ``all_gather_object``.
If any rank failed, every rank raises the same :class:`CollectiveError`, which names the
failing ranks and their messages (DCP's rule: rank -> traceback, re-raised everywhere).

The exchange carries Python objects between the job's own ranks (pickled by torch's
object collectives); nothing from outside the job is ever unpickled.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ..errors import ScalaiError

__all__ = ["CollectiveError", "RankFailure", "agree", "gather", "broadcast", "world"]

T = TypeVar("T")


@dataclass(frozen=True)
class RankFailure:
    """What one rank raised: the exception's type name, message and formatted traceback."""

    rank: int
    kind: str
    message: str
    traceback: str


class CollectiveError(ScalaiError):
    """A collective step failed on one or more ranks; raised on every rank alike.

    Attributes:
        what: the step (``"save: write shards"``).
        failures: one :class:`RankFailure` per failing rank, in rank order.
    """

    def __init__(self, what: str, failures: list[RankFailure]):
        self.what, self.failures = what, failures
        groups: dict[tuple[str, str], list[int]] = {}
        for f in failures:
            groups.setdefault((f.kind, f.message), []).append(f.rank)
        parts = [f"{_ranks(ranks)}: {kind}: {message}" for (kind, message), ranks in groups.items()]
        super().__init__(f"{what} failed on {_ranks([f.rank for f in failures])} - " + "; ".join(parts))

    @property
    def kinds(self) -> set[str]:
        return {f.kind for f in self.failures}


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without an initialized process group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (one ``all_gather_object``)."""
    import torch.distributed as dist

    rank, size = world(group)
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    import torch.distributed as dist

    rank, size = world(group)
    if size == 1:
        return obj
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def agree(what: str, fn: Callable[[], T], group: Any = None, share: bool = False) -> Any:
    """Run ``fn`` on this rank; raise :class:`CollectiveError` on all ranks if any failed.

    Returns ``fn()``'s value on this rank when every rank succeeded, or with ``share``
    the list of every rank's value (in rank order). Costs one ``all_gather_object``.
    """
    rank, _ = world(group)
    value, failure = None, None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
        failure = RankFailure(rank, type(exc).__name__, str(exc), traceback.format_exc())
    outcomes = gather((failure, value if share else None), group)
    failures = [f for f, _ in outcomes if f is not None]
    if failures:
        raise CollectiveError(what, failures)
    return [v for _, v in outcomes] if share else value
