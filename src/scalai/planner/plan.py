"""Plans as data: the copies that turn one layout of the job state into another.

A :class:`Plan` is produced by :func:`scalai.planner.make_plan` (pure, no I/O) and consumed
by an executor (local files, per-host stores). The windows of a :class:`Copy` are in the
*local* coordinates of the source and destination ranks' tensors, so an executor never
needs to know about global layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Placement
from ..layout.ptc import PTC
from ..regions import Region

__all__ = ["Deployment", "Window", "Copy", "PlanStats", "Plan"]


@dataclass(frozen=True)
class Deployment:
    """A PTC and where its ranks run."""

    ptc: PTC
    placement: Placement

    def host(self, rank: int) -> str:
        return self.placement.host(rank)


@dataclass(frozen=True, slots=True)
class Window:
    """Which elements of a rank's local tensor a copy reads or writes.

    The elements are ``local[region]``; when ``view`` is set, that box (a flat 1-d range of
    a ZeRO shard) is first reshaped to ``view`` (the shape of the global box the range
    stands for) and then cut to ``sub``. Either way the selection has shape :attr:`shape`,
    and a copy pairs source and destination selections element by element.
    """

    region: Region
    view: tuple[int, ...] | None = None
    sub: Region | None = None
    # ``region`` as an index (its slices and a trailing Ellipsis), made once: windows are
    # shared by every layer's copies, and each copy indexes two arrays with them
    index: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", self.region.to_slices() + (...,))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sub.sizes if self.sub is not None else self.region.sizes

    @property
    def volume(self) -> int:
        return self.sub.volume if self.sub is not None else self.region.volume

    def select(self, local):
        """The selected elements of ``local`` (a numpy array or torch tensor) as a view."""
        # The trailing Ellipsis keeps 0-d selections views (plain () indexing copies a scalar).
        out = local[self.index]
        if self.view is not None:
            out = out.reshape(self.view)[self.sub.to_slices() + (...,)]
        return out


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy the ``src`` window of the source rank's local ``tensor`` into the ``dst`` window
    of the destination rank's local ``tensor``. Both windows select arrays of the same shape.

    ``from_new`` marks a host fan-out: the source is the *destination* layout's local tensor
    on ``src_rank``, filled by an earlier copy of this plan, so that bytes needed by several
    ranks of one host cross the network once. Executors run all copies with
    ``from_new=False`` before any with ``from_new=True``.
    """

    tensor: str
    src_rank: int
    dst_rank: int
    src: Window
    dst: Window
    nbytes: int
    src_host: str
    dst_host: str
    from_new: bool = False

    @property
    def crosses_hosts(self) -> bool:
        return self.src_host != self.dst_host


@dataclass(frozen=True)
class PlanStats:
    """Byte counts of a plan (all in bytes).

    Attributes:
        total_bytes: bytes written into destination shards.
        same_device_bytes: copied within one device (old and new rank on the same device).
        same_host_bytes: copied within one host (same device included).
        cross_host_bytes: sent from one host to another.
        cross_host_lower_bound_bytes: for each destination host, the distinct bytes its new
            shards need that no old shard on that host holds, summed over hosts; no plan
            can send fewer.
        host_sent_bytes / host_received_bytes: cross-host bytes per host.
        copies: number of copies.
    """

    total_bytes: int
    same_device_bytes: int
    same_host_bytes: int
    cross_host_bytes: int
    cross_host_lower_bound_bytes: int
    host_sent_bytes: dict[str, int] = field(default_factory=dict)
    host_received_bytes: dict[str, int] = field(default_factory=dict)
    copies: int = 0

    def to_json(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "same_device_bytes": self.same_device_bytes,
            "same_host_bytes": self.same_host_bytes,
            "cross_host_bytes": self.cross_host_bytes,
            "cross_host_lower_bound_bytes": self.cross_host_lower_bound_bytes,
            "copies": self.copies,
            "hosts": {
                h: {"sent_bytes": self.host_sent_bytes.get(h, 0),
                    "received_bytes": self.host_received_bytes.get(h, 0)}
                for h in sorted(set(self.host_sent_bytes) | set(self.host_received_bytes),
                                key=_host_order)
            },
        }


@dataclass(frozen=True)
class Plan:
    """Copies from ``old`` to ``new`` and their statistics."""

    old: Deployment
    new: Deployment
    copies: tuple[Copy, ...]
    stats: PlanStats

    def copies_into(self, rank: int) -> list[Copy]:
        return [c for c in self.copies if c.dst_rank == rank]


def _host_order(name: str):
    digits = name.lstrip("abcdefghijklmnopqrstuvwxyz_-")
    return (name[: len(name) - len(digits)], int(digits) if digits.isdigit() else 0, name)
