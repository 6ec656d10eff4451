"""One host's part of a distributed transformation, run inside that host's store.

The coordinator plans a transformation once (:func:`~scalai.planner.make_plan`) and sends
every destination host's store its part of the plan: the copies whose destination is that
host (:mod:`scalai.planner.serial`), with the old PTC and placement, the new layout and
placement, and the peers' addresses. The store runs its part with the one plan runner
(:func:`~scalai.storage.run_plan_async`, :mod:`scalai.store.parts`):

1. it allocates the files of its new ranks' tensors (zero-filled, in memory);
2. copies from an old rank of this host read its mapped files (a whole tensor moves file
   to file in the kernel, its CRC-32 with it; a new tensor that is an old one of this
   store unchanged becomes a hard link to its file, no byte copied: ``linked_bytes``,
   apart from the ``local_bytes`` copied); copies from another host are ranged reads
   of that host's store, cut into blocks of at most :data:`~scalai.store.parts.BLOCK_BYTES`,
   a few in flight per peer, so that memory stays bounded and the links stay busy;
3. then the ``from_new`` copies (host fan-out) copy from the new tensors just filled;
4. it records the new tensors' CRC-32s (combined from what the runner handed over, or read
   back; optional) and leaves the version uncommitted. The coordinator commits it on every
   store once every host succeeded.

A peer that is down is retried with backoff (connection errors only); then the whole
part fails with :class:`PeerError` naming the peer, and the caller deletes the new version.
A part that fails or is cancelled (its version deleted, its lease expired) stops its
worker threads at the next copy; they never write into a file of another version.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

from ..config import ParallelConfig
from ..errors import PlanError
from ..layout.ptc import PTC
from ..planner import Deployment
from ..planner.plan import Plan
from ..planner.serial import copies_from_json, plan_slice
from ..storage.run import run_plan_async
from ..storage.tasks import check_plan
from .catalog import Catalog, VersionEntry
from .errors import PeerError
from .manifest import parse_ptc, placement_from_json, untrusted_layout
from .names import check_name
from .parts import HostSources, LocalVersion, NewVersion, PeerVersion
from .ratelimit import Link

__all__ = ["TransformSpec", "PeerError", "run_host_part"]


@dataclass(frozen=True)
class TransformSpec:
    """A parsed transformation request (see the ``TransformRequest`` schema)."""

    job: str
    from_version: str
    to_version: str
    old: Deployment
    new: Deployment
    peers: dict[str, str]
    plan: Plan  # this host's part: the copies into its ranks, checked against both layouts
    checksum: bool = True
    concurrency: int = 8

    @classmethod
    def from_json(cls, job: str, obj: dict) -> TransformSpec:
        """Parse a request already checked against its schema; raises ValueError."""
        old_ptc = parse_ptc(obj["old"]["ptc"], "old.ptc")
        config = ParallelConfig.parse(obj["new"]["layout"])
        new_ptc = old_ptc.relayout(config)
        if "ptc" in obj["new"]:  # the job's own description of its tensors under the new layout
            new_ptc = parse_ptc(obj["new"]["ptc"], "new.ptc")
            if new_ptc.config != config:
                raise ValueError(f"new.ptc is laid out as {new_ptc.config}, new.layout says {config}; "
                                 f"send the PTC of the new layout")
        old_place = placement_from_json(obj["old"]["placement"])
        if obj["old"].get("replicas", "all") == "per_host":  # each host stored its replicas once
            old_ptc = old_ptc.stored_replicas(old_place.host)
        old = Deployment(old_ptc, old_place)
        new_place = placement_from_json(obj["new"]["placement"])
        if obj["new"].get("replicas", "all") == "per_host":  # write each host's replicas once
            new_ptc = new_ptc.stored_replicas(new_place.host)
        new = Deployment(new_ptc, new_place)
        for dep, what in ((old, "old"), (new, "new")):
            world, place = dep.ptc.config.world_size, dep.placement
            if place.gpus_per_host * len(place.hosts) < world:
                raise ValueError(f"{what} placement has room for {place.gpus_per_host * len(place.hosts)} "
                                 f"ranks, layout {dep.ptc.config} has {world}")
        peers = {check_name(h, "host"): url.rstrip("/") for h, url in obj["peers"].items()}
        copies = untrusted_layout(copies_from_json, obj["plan"], old, new, what="the plan of the request")
        plan = plan_slice(old, new, copies)
        untrusted_layout(_check_plan, plan, what="the plan of the request")
        return cls(check_name(job, "job"), obj["from_version"], obj["to_version"], old, new, peers, plan,
                   obj.get("checksum", True), obj.get("concurrency", 8))


def _check_plan(plan: Plan) -> None:
    """Every window of a plan a client sent fits both layouts, before any version is created."""
    try:
        check_plan(plan)
    except PlanError as exc:
        raise ValueError(f"the plan of the request does not fit its layouts: {exc}; send this host "
                         f"the part of the plan made for these layouts") from None


def _lay_out(s: TransformSpec) -> None:
    """Every local shard the part reads or writes (cached in the PTCs for the runner)."""
    for r in {c.src_rank for c in s.plan.copies if not c.from_new}:
        s.old.ptc.rank_shards(r)
    s.new.ptc.rank_shards(0)


async def run_host_part(catalog: Catalog, spec: TransformSpec, entry: VersionEntry, session, link: Link,
                        pool: Executor, headers: dict[str, str], tls=None) -> dict:
    """Run this store's part of ``spec`` (see the module docstring); returns its statistics.

    The caller creates the (empty) new version ``entry`` first (:meth:`Catalog.begin`) and
    deletes it if this fails. A part that fails or is cancelled (its version deleted, its
    lease expired) stops its worker threads at their next block; they never write into a
    file of another version.

    ``session`` reads from the peers (verifying ``https://`` peers against ``tls.ca``,
    which error messages name).

    Raises:
        PeerError: a peer failed; NotFound/Conflict: the versions are not as required.
    """
    s, me, t0 = spec, catalog.name, time.perf_counter()
    if s.from_version == s.to_version:
        raise ValueError("from_version and to_version must differ")
    if any(c.dst_host != me for c in s.plan.copies):
        raise ValueError(f"the plan sent to store {me} copies into other hosts; send each host its own part")
    local = None
    if me in s.old.placement.hosts:
        catalog.committed(s.job, s.from_version)  # 404/409 early if it is not there
        local = LocalVersion(catalog, s.job, s.from_version, s.old.ptc)
    sources = {c.src_host for c in s.plan.copies if not c.from_new and c.src_host != me}
    per_peer = max(1, -(-s.concurrency // max(1, len(sources))))  # `concurrency` reads in flight in all
    peers = {h: PeerVersion(h, url, s.job, s.from_version, s.old.ptc, session, link, headers, per_peer, tls)
             for h, url in s.peers.items() if h in sources}
    source = HostSources(s.old, me, local, peers)
    sink = NewVersion(catalog, entry, s.new, s.checksum)
    plan = s.plan
    loop = asyncio.get_running_loop()
    # the layouts the client sent, laid out here first: a split rule whose arithmetic fails is its fault
    await loop.run_in_executor(pool, partial(untrusted_layout, _lay_out, s, what="the layouts of the request"))
    try:
        report = await run_plan_async(plan, source, sink, pool=pool)
        t1 = time.perf_counter()
        await loop.run_in_executor(pool, sink.commit)
    except BaseException:
        sink.stop()  # worker threads still copying for this part stop at their next block
        raise
    finally:
        await loop.run_in_executor(pool, source.close)
    t2 = time.perf_counter()
    local_bytes = sum(c.nbytes for c in plan.copies if c.from_new or c.src_host == me) - report.linked
    return {"host": me, "copies": report.copies, "local_bytes": local_bytes, "linked_bytes": report.linked,
            "fetched_bytes": source.fetched(), "requests": sum(p.requests for p in peers.values()),
            "tensors": len(sink.tensors), "bytes": int(sum(t.meta.nbytes for t in sink.tensors.values())),
            "seconds": {"allocate": report.seconds["prepare"], "copy": t1 - t0 - report.seconds["prepare"],
                        "checksum": t2 - t1, "total": t2 - t0},
            "parts": {k: v for k, v in report.seconds.items() if k not in ("total", "prepare")}}
