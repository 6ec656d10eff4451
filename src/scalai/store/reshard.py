"""Transforming a job's state in its stores from one layout to another.

Distributed (the default): the plan is made once, here, and every destination host's
store receives its part of it (the copies into its ranks) and runs them at the same time
(see :mod:`scalai.store.transform`), pulling each slice from the store that the planner
chose: its own (memory copy) or a peer (ranged read). Cross-host bytes are the plan's,
which equal the lower bound.

Central (the baseline, the way consolidate-then-split tools work): the first destination
host first pulls the whole state into one consolidated copy (``tp=1,pp=1,dp=1`` on that
host: a scratch version), then every destination host pulls its new shards from it. All
bytes go through one host's link, twice.

Either way the result is a new version, committed on every store only after every host
finished; the old version is deleted after that (unless kept). When anything fails, the
new version is deleted everywhere, the old one is untouched, and the error names the
store that failed.

The coordinator owns the new version (:mod:`scalai.store.lease`): it claims it on every
destination store before any byte moves (so that of two coordinators aiming at the same
version, one gets 409 before writing anything), names itself on every request, renews the
lease while the stores work, and its cleanup deletes only what it created. A coordinator
that dies stops renewing: the stores cancel its transformation and delete its version
when the lease runs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from ..config import ParallelConfig, Placement
from ..layout.ptc import PTC
from ..planner import Deployment, make_plan
from ..planner.plan import Plan, PlanStats
from ..planner.serial import copies_to_json
from .cluster import StoreCluster, StoredVersion, parallel
from .errors import StoreError, StoreRequestError, StoreUnavailable
from .lease import Lease, new_owner
from .manifest import REPLICAS, VersionManifest, placement_to_json
from .placement import choose_hosts

__all__ = ["ReshardResult", "reshard", "TransformError"]


class TransformError(StoreError):
    """A transformation failed; the old version is intact (the message says how to retry)."""


@dataclass
class ReshardResult:
    """What a transformation did (times in seconds, sizes in bytes).

    Attributes:
        source / target: the old and new version names.
        mode: ``distributed`` or ``central``.
        seconds: wall time, start to old version dropped.
        phases: ``plan``, ``transform`` (central: ``consolidate`` and ``split``), ``commit``, ``drop``.
        stats: the plan's statistics (its cross-host bytes and the lower bound).
        cross_host_bytes: bytes that stores actually pulled from other stores, counted by
            their transport (payload bytes of ranged reads).
        hosts: every host's own report (bytes pulled per peer, local bytes copied, bytes
            linked, its phases).
        placement: the hosts of the new layout, in slot order.
    """

    source: str
    target: str
    mode: str
    seconds: float
    phases: dict[str, float]
    stats: PlanStats
    cross_host_bytes: int
    hosts: dict[str, dict] = field(default_factory=dict)
    placement: tuple[str, ...] = ()

    @property
    def linked_bytes(self) -> int:
        """Bytes of new tensors that the stores linked to the old version's unchanged files
        instead of copying them (of the plan's ``total_bytes``)."""
        return sum(h.get("linked_bytes", 0) for h in self.hosts.values())

    @property
    def copied_bytes(self) -> int:
        """Bytes the stores actually copied: the plan's ``total_bytes`` less those linked."""
        return self.stats.total_bytes - self.linked_bytes

    def to_json(self) -> dict:
        return {"source": self.source, "target": self.target, "mode": self.mode, "seconds": self.seconds,
                "phases": self.phases, "plan": self.stats.to_json(), "cross_host_bytes": self.cross_host_bytes,
                "copied_bytes": self.copied_bytes, "linked_bytes": self.linked_bytes,
                "hosts": self.hosts, "placement": list(self.placement)}


def _request(src_version: str, to_version: str, old: Deployment, new: Deployment, peers: dict[str, str],
             checksum: bool, replicas: str = "all") -> dict:
    """The request every destination host gets, less its part of the plan."""
    out = {"from_version": src_version, "to_version": to_version,
           "old": {"ptc": old.ptc.full.to_json(), "placement": placement_to_json(old.placement),
                   "replicas": replicas},
           "new": {"layout": str(new.ptc.config), "placement": placement_to_json(new.placement)},
           "peers": peers, "checksum": checksum, "claimed": True}
    if new.ptc.full.specs != old.ptc.full.specs:  # the job described its new layout itself
        out["new"]["ptc"] = new.ptc.full.to_json()
    if new.ptc is not new.ptc.full:
        out["new"]["replicas"] = "per_host"
    return out


def _run_parts(cluster: StoreCluster, job: str, hosts: Sequence[str], request: dict, plan: Plan,
               lease: Lease) -> dict[str, dict]:
    """Send every destination host the request with its own part of ``plan``; their reports."""
    def one(host: str) -> dict:
        return cluster.client(host).transform(job, {**request, "plan": copies_to_json(plan, host)},
                                              owner=lease.owner, lease=lease.seconds)

    results = parallel(one, list(hosts), workers=len(hosts))
    lease.check()
    return dict(zip(hosts, results))


def _failure(exc: Exception, cluster: StoreCluster, job: str, source: str, what: str,
             lost: Sequence[str] = ()) -> TransformError:
    host = getattr(exc, "host", None)
    down = isinstance(exc, StoreUnavailable) or (isinstance(exc, StoreRequestError) and exc.status == 502)
    if isinstance(exc, StoreRequestError) and exc.status in (404, 409):
        # another writer has the target version, or dropped the source: say what the job's
        # state now is, not what it was
        try:
            current = cluster.latest(job, lost=lost).name
        except StoreError:
            current = None
        state = (f"this {what} changed nothing; version {source} is still the job's current state"
                 if current == source else
                 f"this {what} changed nothing; the job's current state is now version {current}, which "
                 f"another writer committed" if current else f"this {what} changed nothing")
        return TransformError(f"{what} of job {job} failed: {exc}. Another writer is working on the same "
                              f"job; {state}. Wait for it to finish (scalai store ls), then run the "
                              f"command again if it is still needed", host)
    hint = (f"restart the store of {host} (same --root keeps its data) and run the command again" if down
            else "fix the cause and run the command again")
    return TransformError(f"{what} of job {job} failed: {exc}. Version {source} is intact and still the "
                          f"job's current state; {hint}", host)


def reshard(cluster: StoreCluster, job: str, layout: ParallelConfig | str | PTC, gpus_per_host: int | None = None,
            hosts: Sequence[str] | str | None = None, central: bool = False, keep_old: bool = False,
            version: str | None = None, checksum: bool = True, lost: Sequence[str] = (),
            replicas: str = "all", owner_kind: str = "reshard") -> ReshardResult:
    """Transform the job's current version (or ``version``) into ``layout``.

    Args:
        layout: the new layout, e.g. ``"tp=2,pp=2,dp=2,zero=1"``, or the job's PTC under
            it. Given a layout, the old PTC's split rules are applied at the new degrees,
            which is exact for rule tables and for DTensor layouts that keep their mesh
            axes; a job described from live DTensors gives its new PTC instead when an
            axis appears (a tensor replicated at ``tp=1`` is sharded at ``tp=2``; FSDP
            sharding appears with ``zero=1``), or every rank would receive whole tensors.
        gpus_per_host: devices per host in the new placement (default: as before).
        hosts: hosts of the new placement, in order (default: every store given, in order;
            a disjoint set is a redeployment), or ``"auto"``: the hosts, among all stores,
            whose assignment makes the busiest host receive the fewest bytes
            (:func:`~scalai.store.placement.choose_hosts`; e.g. which 2 of 4 hosts to keep).
        central: consolidate-then-split through the first new host (the baseline).
        keep_old: keep the old version after the new one is committed.
        checksum: CRC-32 every new tensor in the stores (``pull`` verifies against it).
        replicas: ``"per_host"``: a replica that ranks of one host share is written once on
            that host (:meth:`PTC.stored_replicas`); its ranks read it from there.
        lost: hosts of the old placement whose stores are gone (a failure): their ranks'
            bytes are read from surviving replicas; give the surviving stores only. The
            version's own ``lost_ranks`` (ranks that died before they could save) are
            read from replicas as well.
        owner_kind: what the transformation's owner id starts with (an elastic run's
            coordinator gives ``g<generation>-reshard``: stores fenced above it refuse it).

    Raises:
        ValueError: the layout does not fit the model or the hosts.
        TransformError: a store failed; the new version was removed, the old one is intact.
    """
    from ..state import carry_state

    t0 = time.perf_counter()
    given = layout if isinstance(layout, PTC) else None
    config = given.config if given is not None else \
        ParallelConfig.parse(layout) if isinstance(layout, str) else layout
    cluster.drop_incomplete(job)  # fragments of commits that a killed coordinator interrupted
    src: StoredVersion = cluster.latest(job, version, lost)
    old = Deployment(src.manifest.ptc, src.manifest.placement)
    new_ptc = given if given is not None else old.ptc.relayout(config)
    for h in src.manifest.hosts:
        if h not in lost:
            cluster.client(h)  # every surviving old host must be reachable through --stores
    lost_ranks = src.manifest.lost_ranks
    unavailable = frozenset(r for r in range(old.ptc.config.world_size)
                            if old.placement.host(r) in lost or r in lost_ranks)
    g = gpus_per_host or old.placement.gpus_per_host
    if hosts == "auto" or (not isinstance(hosts, str) and list(hosts or []) == ["auto"]):
        chosen = choose_hosts(old, new_ptc, g, cluster.hosts)
        hosts = list(chosen) + [h for h in cluster.hosts if h not in chosen]
    new_place = cluster.placement(g, hosts)
    if replicas not in REPLICAS:
        raise ValueError(f"replicas={replicas!r} is not one of {REPLICAS}")
    new = Deployment(new_ptc.stored_replicas(new_place.host) if replicas == "per_host" else new_ptc, new_place)
    slots = new_place.gpus_per_host * len(new_place.hosts)
    if config.world_size > slots:
        raise ValueError(f"layout {config} needs {config.world_size} devices but {len(new_place.hosts)} hosts x "
                         f"{new_place.gpus_per_host} GPUs give {slots}; add stores or raise --gpus-per-host")
    if set(new_place.hosts_for(config.world_size)) & set(lost):
        raise ValueError(f"the new placement uses lost host(s) {sorted(set(lost))}; place the layout on "
                         f"surviving hosts")
    plan = make_plan(old, new, unavailable=unavailable)
    target, seq = cluster.next_version(job)
    dest_hosts = new_place.hosts_for(config.world_size)
    t1 = time.perf_counter()
    phases = {"plan": t1 - t0}
    results: dict[str, dict] = {}
    owner = new_owner(owner_kind)
    scratch = f"{target}.consolidated" if central else None

    def abandon(exc: Exception, what: str) -> TransformError:
        """Delete what this coordinator created (only that), and say why it failed."""
        for v in filter(None, (target, scratch)):
            cluster.drop(job, v, owner=owner)
        return _failure(exc, cluster, job, src.name, what, lost)

    with Lease(cluster, job, owner) as lease:
        try:
            lease.claim(target, dest_hosts)  # 409 here, before any byte moves, if another writer has it
            if not central:
                req = _request(src.name, target, old, new, cluster.peers, checksum, src.manifest.replicas)
                results = _run_parts(cluster, job, dest_hosts, req, plan, lease)
                phases["transform"] = time.perf_counter() - t1
            else:
                hub = dest_hosts[0]
                lease.claim(scratch, [hub])
                one = ParallelConfig(tp=1, pp=1, dp=1)
                mid = Deployment(old.ptc.relayout(one), Placement(1, (hub,)))
                req = _request(src.name, scratch, old, mid, cluster.peers, checksum, src.manifest.replicas)
                results["consolidate"] = _run_parts(cluster, job, [hub], req,
                                                    make_plan(old, mid, unavailable=unavailable), lease)[hub]
                cluster.commit(VersionManifest(job, scratch, src.manifest.sequence, mid.ptc, mid.placement,
                                               {}, src.name, scratch=True), [hub], owner=owner)
                t2 = time.perf_counter()
                phases["consolidate"] = t2 - t1
                req = _request(scratch, target, mid, new, cluster.peers, checksum)
                results.update(_run_parts(cluster, job, dest_hosts, req, make_plan(mid, new), lease))
                phases["split"] = time.perf_counter() - t2
        except Exception as exc:
            raise abandon(exc, "transformation") from None
        t3 = time.perf_counter()
        state = carry_state(src.manifest.state, old.ptc.config, config)
        manifest = VersionManifest(job, target, seq, new.ptc, new_place, state, src.name, replicas=replicas)
        try:
            lease.check()
            cluster.commit(manifest, owner=owner)
        except Exception as exc:
            raise abandon(exc, "commit") from None
    t4 = time.perf_counter()
    phases["commit"] = t4 - t3
    if scratch:
        cluster.drop(job, scratch, [dest_hosts[0]], owner=owner)
    if not keep_old:
        cluster.drop(job, src.name)
    phases["drop"] = time.perf_counter() - t4
    counted = sum(n for r in results.values() for n in r["fetched_bytes"].values())
    return ReshardResult(src.name, target, "central" if central else "distributed", time.perf_counter() - t0,
                         phases, plan.stats, counted, results, tuple(dest_hosts))
