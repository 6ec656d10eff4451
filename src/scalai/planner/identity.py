"""The identity plan: every local tensor of some ranks copied whole into the same layout.

What a save is (live tensors into files, or into a store) and what a transfer between two
storages of one layout is (a pull from stores into a directory). Pure; no geometry needed.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..config import Placement
from ..dtypes import itemsize
from ..layout.ptc import PTC
from ..regions import Region
from .plan import Copy, Deployment, Plan, PlanStats, Window

__all__ = ["identity_plan"]


def identity_plan(ptc: PTC, ranks: Iterable[int], stored: Callable[[int, str], bool] | None = None,
                  source_rank: Callable[[int, str], int] | None = None,
                  placement: Placement | None = None) -> Plan:
    """Copies of every local tensor of ``ranks`` from ``ptc`` into ``ptc``, each whole.

    Args:
        ranks: the destination ranks.
        stored: ``(rank, tensor) -> bool``: only the tensors the destination stores itself
            (a sink that keeps each replica once); default: all.
        source_rank: ``(rank, tensor) -> rank`` that holds the bytes in the source (a
            replica stored once); default: the same rank.
        placement: where the ranks' bytes are (copies name the hosts); default: one host.
    """
    place = placement or Placement(ptc.config.world_size)
    copies = []
    for rank in ranks:
        for name, shard in ptc.rank_shards(rank):
            if stored is not None and not stored(rank, name):
                continue
            src = rank if source_rank is None else source_rank(rank, name)
            window = Window(Region.full(shard.shape))
            copies.append(Copy(name, src, rank, window, window, window.volume * itemsize(ptc.spec(name).dtype),
                               place.host(src), place.host(rank)))
    total = sum(c.nbytes for c in copies)
    same_device = sum(c.nbytes for c in copies if c.src_rank == c.dst_rank)
    same_host = sum(c.nbytes for c in copies if not c.crosses_hosts)
    return Plan(Deployment(ptc, place), Deployment(ptc, place), tuple(copies),
                PlanStats(total, same_device, same_host, total - same_host, 0, copies=len(copies)))
