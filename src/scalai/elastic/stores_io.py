"""The controller's store actions, carried out: transform, commit a dump, restore from disk.

Each takes the stores of the live hosts as a :class:`~scalai.store.StoreCluster` and
returns what the controller needs to hear (:class:`~.messages.TransformDone`); errors
propagate (the runner turns them into ``TransformFailed``).
"""

from __future__ import annotations

import shutil
import tempfile
import time

from .messages import RecoverDump, TransformDone

__all__ = ["transform", "commit_dump", "restore", "done"]


def done(token: int, version: str, moved: int, cross: int, plan, transform_span, linked: int = 0) -> TransformDone:
    return TransformDone(time.time(), token, version, moved, cross, plan, transform_span, linked)


def transform(cluster, job: str, source: str, alloc, target, lost, token: int, generation: int) -> TransformDone:
    """Transform committed ``source`` into ``target`` (a PTC or a layout) on ``alloc``'s hosts,
    distributed, keeping one replica per host; the source version is kept. It writes as
    ``generation`` (the one that will load it): stores fenced above it refuse it."""
    from ..store import reshard

    t0 = time.time()
    result = reshard(cluster, job, target, gpus_per_host=alloc.gpus_per_host, hosts=list(alloc.hosts),
                     version=source, keep_old=True, lost=list(lost), replicas="per_host",
                     owner_kind=f"g{generation}-reshard")
    plan_end = t0 + result.phases.get("plan", 0.0)
    return done(token, result.target, result.copied_bytes, result.cross_host_bytes, (t0, plan_end),
                (plan_end, time.time()), result.linked_bytes)


def commit_dump(cluster, job: str, a: RecoverDump) -> None:
    """Commit the survivors' dump as a version whose ``lost_ranks`` are the dead ranks, on
    the surviving hosts of its placement (its shards were saved once per host), as the
    owner the survivors wrote it with (:func:`~.recovery.dump_owner`)."""
    from ..store.manifest import VersionManifest
    from .recovery import dump_owner

    _, seq = cluster.next_version(job)
    placement = a.old_alloc.placement
    manifest = VersionManifest(job, a.dump_version, seq, a.ptc, placement, a.state, lost_ranks=a.lost_ranks)
    hosts = [h for h in placement.hosts_for(a.ptc.config.world_size) if h in a.alive_hosts]
    cluster.commit(manifest, hosts, owner=dump_owner(a.dump_generation))


def restore(cluster, path: str, alloc, job: str, generation: int) -> tuple[str, int]:
    """Put the persistent copy at ``path`` back into ``cluster``'s stores (``alloc``'s hosts,
    in slot order) in ``alloc``'s layout, as ``generation``: reshard it on disk, then push
    it. Returns ``(version, bytes)``."""
    from ..reshard import reshard_checkpoint

    scratch = tempfile.mkdtemp(prefix="scalai-restore-")
    out = f"{scratch}/ckpt"
    try:
        plan, _ = reshard_checkpoint(path, out, alloc.layout, sync=False)
        stored = cluster.push(out, job, alloc.gpus_per_host, owner_kind=f"g{generation}-restore")
        return stored.name, plan.stats.total_bytes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
