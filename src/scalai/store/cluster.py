"""The stores of a job's hosts seen together: versions, push from and pull to checkpoints.

:class:`StoreCluster` is given the stores' URLs; it asks each for its name, which is the
host name in placements (``Placement(gpus_per_host, hosts=cluster.hosts)``): rank ``r``'s
shards live on the store named ``placement.host(r)``. The job's current state is the
committed version with the highest sequence that every store of its placement holds
(:meth:`StoreCluster.latest`); transformations are in :mod:`scalai.store.reshard`.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import Placement
from ..layout.ptc import PTC
from .client import StoreClient
from .errors import StoreError, StoreRequestError
from .manifest import VersionManifest

__all__ = ["StoreCluster", "StoredVersion", "parallel"]

_VNAME = re.compile(r"v(\d+)")


def parallel(fn: Callable, items: Sequence, workers: int = 8) -> list:
    """``[fn(x) for x in items]`` on threads; every item runs, the first error is raised."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, x) for x in items]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]


def _interleave(items: Sequence[tuple[str, object]]) -> list:
    """Items grouped by host, dealt round-robin: every host's link is busy from the start."""
    by_host: dict[str, list] = {}
    for host, item in items:
        by_host.setdefault(host, []).append(item)
    queues = list(by_host.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


@dataclass(frozen=True)
class StoredVersion:
    """A committed version: its parsed manifest and the JSON the stores hold."""

    manifest: VersionManifest
    raw: dict

    @property
    def name(self) -> str:
        return self.manifest.version


class StoreCluster:
    """Clients of several stores, one per host, addressed by the stores' names.

    Args:
        urls: the stores, in host order (``host0`` first when names are the defaults).
        token: the shared token (see :func:`~scalai.store.client.load_token`).
        client_kw: passed to every :class:`~scalai.store.client.StoreClient`.

    Raises:
        StoreUnavailable: a store does not answer (the message names it).
        ValueError: two stores have the same name.
    """

    def __init__(self, urls: Sequence[str], token: str | None = None, **client_kw):
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u]
        if not urls:
            raise ValueError("give at least one store URL, e.g. --stores http://127.0.0.1:7070")
        self.clients = [StoreClient(u, token, **client_kw) for u in urls]
        names = parallel(lambda c: c.name, self.clients)
        seen: dict[str, str] = {}
        for name, c in zip(names, self.clients):
            if name in seen:
                raise ValueError(f"stores {seen[name]} and {c.url} are both named {name!r}; start each "
                                 f"with its own --name (the host name)")
            seen[name] = c.url
        self.hosts: list[str] = names
        self.by_host = dict(zip(names, self.clients))

    def client(self, host: str) -> StoreClient:
        try:
            return self.by_host[host]
        except KeyError:
            raise StoreError(f"host {host} holds part of the job but no store named {host} is among the "
                             f"stores given ({', '.join(self.hosts)}); add its URL to --stores", host) from None

    def placement(self, gpus_per_host: int, hosts: Sequence[str] | None = None) -> Placement:
        return Placement(gpus_per_host, tuple(hosts or self.hosts))

    @property
    def peers(self) -> dict[str, str]:
        return {h: c.url for h, c in self.by_host.items()}

    # -- versions ---------------------------------------------------------------------
    def _job_versions(self, job: str) -> dict[str, list[dict]]:
        def one(c: StoreClient) -> list[dict]:
            try:
                return c.job(job)["versions"]
            except StoreRequestError as exc:
                if exc.status == 404:
                    return []
                raise
        return dict(zip(self.hosts, parallel(one, self.clients)))

    def next_version(self, job: str) -> tuple[str, int]:
        """A version name unused on every store, ``v<n>``, and its sequence number ``n``."""
        n = -1
        for versions in self._job_versions(job).values():
            for v in versions:
                m = _VNAME.match(v["version"])
                n = max(n, v.get("sequence") or 0, int(m.group(1)) if m else 0)
        return f"v{n + 1}", n + 1

    def latest(self, job: str, version: str | None = None, lost: Sequence[str] = ()) -> StoredVersion:
        """The job's current state: ``version`` if given, else the committed version with
        the highest sequence that is committed on every host of its placement (except the
        ``lost`` hosts, whose stores are gone).

        Raises:
            StoreError: no such version (the message lists what the stores hold).
        """
        per_host = self._job_versions(job)
        committed: dict[str, set[str]] = {}
        sequence: dict[str, int] = {}
        for host, versions in per_host.items():
            for v in versions:
                if v["committed"]:
                    committed.setdefault(v["version"], set()).add(host)
                    sequence[v["version"]] = v.get("sequence") or 0
        names = [version] if version else sorted(committed, key=lambda v: -sequence[v])
        for name in names:
            if name not in committed:
                break
            host = sorted(committed[name])[0]
            raw = self.client(host).version(job, name, tensors=False)["manifest"]
            manifest = VersionManifest.from_json(raw)
            if manifest.scratch:
                continue
            missing = [h for h in manifest.hosts if h not in committed[name] and h not in lost]
            if not missing:
                return StoredVersion(manifest, raw)
            if version:
                raise StoreError(f"version {name} of job {job} is not committed on host(s) "
                                 f"{', '.join(missing)}; give their stores in --stores, or use another version")
        held = {h: [f"{v['version']}{'' if v['committed'] else ' (uncommitted)'}" for v in vs]
                for h, vs in per_host.items()}
        what = f"committed version {version}" if version else "committed version"
        raise StoreError(f"job {job} has no {what} in the stores given (they hold: {held}); "
                         f"push one with 'scalai store push'")

    def drop_incomplete(self, job: str) -> list[str]:
        """Delete the fragments of interrupted commits: versions committed on some stores of
        their placement but absent from another one that answers (its writer died between
        two commits, and the uncommitted rest expired). They can never become the job's
        state. Safe against a commit in progress: its writer claimed the version on every
        store before committing any, so until it finishes the version is present on all.
        Returns the versions deleted."""
        per_host = self._job_versions(job)
        committed: dict[str, tuple[list[str], list[str]]] = {}  # version -> (stores holding it, its hosts)
        for host, versions in per_host.items():
            for v in versions:
                if v["committed"]:
                    committed.setdefault(v["version"], ([], v.get("hosts", [])))[0].append(host)
        dropped = []
        for name, (holders, hosts) in sorted(committed.items()):
            if any(h in per_host and all(v["version"] != name for v in per_host[h]) for h in hosts):
                self.drop(job, name, holders)
                dropped.append(name)
        return dropped

    def commit(self, manifest: VersionManifest, hosts: Sequence[str] | None = None, owner: str | None = None) -> dict:
        """Commit ``manifest`` on every store (or ``hosts``); each checks its own shards
        (and, with ``owner``, that the version is that writer's)."""
        raw = manifest.to_json()
        targets = [self.client(h) for h in (hosts or self.hosts)]
        parallel(lambda c: c.commit(manifest.job, manifest.version, raw, owner=owner), targets)
        return raw

    def fence(self, job: str, generation: int, hosts: Sequence[str] | None = None) -> list[str]:
        """Fence ``job`` at ``generation`` on every store (or ``hosts``) that answers; returns
        the hosts that did (one that does not is fenced when it joins again: emptied)."""
        def one(host: str) -> str | None:
            try:
                self.client(host).fence(job, generation)
                return host
            except StoreError:
                return None
        return [h for h in parallel(one, list(hosts or self.hosts)) if h]

    def drop(self, job: str, version: str, hosts: Sequence[str] | None = None, owner: str | None = None) -> list[str]:
        """Delete ``version`` wherever it is; returns the hosts that had it. Unreachable
        stores are skipped (they are reported by the error of the operation that failed).

        ``owner``: a writer's cleanup: only where that owner created the version (a store
        where another writer has it keeps it, and so does its running transformation)."""
        def one(host: str) -> str | None:
            try:
                self.client(host).delete(job, version, owner=owner)
                return host
            except StoreError:
                return None
        return [h for h in parallel(one, list(hosts or self.hosts)) if h]

    # -- checkpoints ------------------------------------------------------------------
    def push(self, ckpt_dir: str, job: str, gpus_per_host: int, version: str | None = None,
             progress: Callable[[int], None] | None = None, workers: int = 2,
             owner_kind: str = "push") -> StoredVersion:
        """Upload a checkpoint directory: each rank's shards to the store of its host, then
        commit on every store (``workers`` uploads in flight per host). The stores' CRC-32 of every upload is checked against the
        checkpoint's manifest. On failure the new version is deleted everywhere.

        Raises:
            ValueError: the layout does not fit the hosts (``gpus_per_host x stores``).
            ChecksumError: a shard's bytes do not match the checkpoint's manifest.
            StoreRequestError: 409, another writer is writing a version of that name.
        """
        from ..checkpoint import Checkpoint
        from ..errors import ChecksumError
        from .lease import Lease, new_owner

        placement = self.placement(gpus_per_host)
        owner = new_owner(owner_kind)
        self.drop_incomplete(job)
        with Checkpoint.open(ckpt_dir) as ckpt, Lease(self, job, owner) as lease:
            ptc: PTC = ckpt.ptc
            name, seq = self.next_version(job) if version is None else (version, self.next_version(job)[1])
            manifest = VersionManifest(job, name, seq, ptc, placement, ckpt.state)
            work = _interleave([(placement.host(r), (r, n)) for r in range(ptc.config.world_size)
                                for n, _ in ptc.rank_shards(r)])

            def upload(item: tuple[int, str]) -> None:
                rank, tensor = item
                out = self.client(placement.host(rank)).put(job, name, rank, tensor, ckpt.view(rank, tensor),
                                                            ptc.spec(tensor).dtype, owner=owner,
                                                            lease=lease.seconds)
                if int(out["crc32"], 16) != ckpt.checksum(rank, tensor):
                    raise ChecksumError(f"{tensor} of rank {rank} in {ckpt_dir} does not match its checksum "
                                        f"in the manifest; the checkpoint is corrupt (scalai inspect --verify)")
                if progress is not None:
                    progress(out["bytes"])

            try:
                lease.claim(name, manifest.hosts)
                parallel(upload, work, workers * len(manifest.hosts))
                self.commit(manifest, owner=owner)
            except BaseException:
                self.drop(job, name, owner=owner)
                raise
        return StoredVersion(manifest, manifest.to_json())
