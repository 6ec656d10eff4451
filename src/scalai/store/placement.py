"""Choosing which hosts take which ranks of a new layout, to move the fewest bytes. Pure.

When a job shrinks from 4 hosts to 2, keeping hosts 0 and 1 or hosts 0 and 2 makes a large
difference: the new ranks of a host need some pipeline stages and tensor shards, and a
host that already holds most of them receives little. A distributed transformation takes
as long as its busiest link, so :func:`choose_hosts` assigns the new placement's host
slots (ranks ``[s*G, (s+1)*G)``) to hosts so that the most bytes any host must receive is
minimal (then the total), from shapes only: fragment groups of every tensor, no data.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import permutations
from typing import Sequence

from ..dtypes import itemsize
from ..layout.ptc import PTC
from ..planner.geometry import fragment_groups
from ..planner.plan import Deployment

__all__ = ["choose_hosts", "slot_needs"]

MAX_ORDERS = 50_000  # exhaustive search up to this many assignments, greedy beyond


def slot_needs(old: Deployment, new_ptc: PTC, gpus_per_host: int) -> list[dict[frozenset, int]]:
    """Per new host slot: ``{hosts holding the bytes now: bytes the slot needs}``.

    A slot needs each fragment once (its ranks share it through host fan-out).
    """
    slots = -(-new_ptc.config.world_size // gpus_per_host)
    needs: list[dict[frozenset, int]] = [defaultdict(int) for _ in range(slots)]
    for spec in new_ptc.specs:
        old_h, new_h = old.ptc.holdings(spec.name), new_ptc.holdings(spec.name)
        size = itemsize(spec.dtype)
        for g in fragment_groups(old_h, new_h):
            holders = frozenset(old.placement.host(r) for oi in g.old for r in old_h[oi].ranks)
            for s in {r // gpus_per_host for ni in g.new for r in new_h[ni].ranks}:
                needs[s][holders] += g.volume * size
    return needs


def choose_hosts(old: Deployment, new_ptc: PTC, gpus_per_host: int, candidates: Sequence[str]) -> tuple[str, ...]:
    """Hosts for the new placement, in slot order, chosen among ``candidates``.

    Minimizes the largest number of bytes one host must receive, then the total; on ties
    keeps the candidates' order. Exhaustive over assignments when there are at most
    :data:`MAX_ORDERS`, else greedy (largest need first, to the host that lacks least).

    Raises:
        ValueError: fewer candidates than the layout needs hosts.
    """
    needs = slot_needs(old, new_ptc, gpus_per_host)
    k = len(needs)
    if len(candidates) < k:
        raise ValueError(f"layout {new_ptc.config} needs {k} hosts of {gpus_per_host} GPUs but only "
                         f"{len(candidates)} stores are given; add stores or raise --gpus-per-host")
    cost = {(h, s): sum(b for holders, b in needs[s].items() if h not in holders)
            for h in candidates for s in range(k)}
    count = 1
    for i in range(k):
        count *= len(candidates) - i
    if count <= MAX_ORDERS:
        best = min(permutations(candidates, k),
                   key=lambda hs: (max(cost[h, s] for s, h in enumerate(hs)), sum(cost[h, s] for s, h in enumerate(hs))))
        return tuple(best)
    chosen: dict[int, str] = {}
    free = list(candidates)
    for s in sorted(range(k), key=lambda s: -sum(needs[s].values())):
        h = min(free, key=lambda h: cost[h, s])
        chosen[s] = h
        free.remove(h)
    return tuple(chosen[s] for s in range(k))
