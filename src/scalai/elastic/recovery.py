"""After a failure: from the survivors' dumps if replicas hold every lost byte, else from the
last committed version (in the stores, or its persistent copy on disk).

When a worker (or a whole host) dies, the collectives of the other workers fail; each of
them uploads the shards of the last step it completed to its own host's store, under the
generation's dump version, and reports its non-tensor state (see
:mod:`scalai.elastic.worker`). The runner then:

1. :func:`consistent_dumps`: keeps the dumps only if every survivor dumped the same step;
2. :func:`replicas_cover`: plans from the old layout, with the dead ranks unavailable, to
   the new one; a :class:`~scalai.errors.PlanError` means some bytes existed only on dead
   ranks (a layout without data-parallel replicas, or ZeRO-1 optimizer shards);
3. commits the dump as a version whose ``lost_ranks`` are the dead ranks, on the surviving
   hosts, so that the stores can transform it, reading the dead ranks' bytes from replicas
   (:func:`scalai.elastic.stores_io.commit_dump`);

otherwise it restarts from the newest committed version whose hosts are all alive, or
from the newest persistent copy on disk (:func:`scalai.elastic.stores_io.restore`), and
counts the steps lost. The decisions are the controller's (:mod:`.changes`); these are
its pure helpers.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..config import Placement
from ..errors import PlanError
from ..layout.ptc import PTC
from ..planner import Deployment, make_plan

__all__ = ["consistent_dumps", "merged_state", "replicas_cover", "dump_owner"]


def consistent_dumps(reports: Mapping[int, dict]) -> tuple[dict[int, dict], str]:
    """``({rank: dump}, why_not)``: the dumps if every one is of the same step (pure).

    ``why_not`` is empty when the dumps can be used, else the reason they cannot.
    """
    dumps = {r: rep["dump"] for r, rep in reports.items() if rep.get("dump")}
    if not dumps:
        return {}, "no surviving worker dumped its shards"
    steps = sorted({d["step"] for d in dumps.values()})
    if len(steps) > 1:
        return {}, f"survivors dumped different steps {steps} (a worker died inside a step's last collective)"
    return dumps, ""


def merged_state(dumps: Mapping[int, dict]) -> dict:
    """The job's non-tensor state from the survivors' dumps: one rank's view, every
    survivor's RNG (pure)."""
    first = dumps[min(dumps)]["state"]
    state = dict(first)
    rng = dict(state.get("rng") or {})
    rng["ranks"] = {str(r): d["state"]["rng"]["ranks"][str(r)] for r, d in sorted(dumps.items())}
    state["rng"] = rng
    return state


def replicas_cover(old_ptc: PTC, old_place: Placement, new_ptc: PTC, new_place: Placement,
                   dead: Sequence[int]) -> str:
    """Empty if surviving ranks hold every byte the new layout needs, else why not (pure)."""
    try:
        make_plan(Deployment(old_ptc, old_place), Deployment(new_ptc, new_place), unavailable=frozenset(dead))
    except PlanError as exc:
        return str(exc)
    return ""


def dump_owner(generation: int) -> str:
    """The writer id the survivors of ``generation`` dump with (the coordinator holds the
    dump's lease, and commits or drops it, as the same owner; see :mod:`scalai.store.lease`).
    It names the generation, so that stores fenced above it refuse it."""
    return f"g{generation}-dump"
