"""What a training job calls to keep its state in the stores of its hosts.

The training API's ``save``/``load`` take a list of store URLs as well as a directory.
With stores, every rank saves its local shards into the store of its own host (an upload
over loopback: a memory copy that outlives the worker), one rank commits once all ranks
are done, and on restart every rank loads its shards through a plan from whatever
version the stores hold, in whatever layout it was saved::

    cluster = StoreCluster(urls, load_token(), tls=Tls.from_env())   # every rank, same URLs, same order
    placement = cluster.placement(gpus_per_host)          # rank r lives on cluster.hosts[r // G]
    version, seq = next_version(cluster, job)             # rank 0, then broadcast
    save_rank(cluster, job, version, rank, ptc, placement, local_tensors)
    barrier()
    if rank == 0:
        commit(cluster, job, version, ptc, placement, state, seq)
    ...
    stored = load_rank(cluster, job, rank, ptc, placement, local_tensors)   # fills in place
    state = stored.state

With the training API (``scalai.training.save/load``), :class:`StoreWriter` is its
``StateWriter`` over the stores and :class:`StoreReader` a ``TensorSource`` of them::

    save(job, StoreWriter(urls, "gpt", gpus_per_host=4))
    load(job, StoreReader(urls, "gpt"))

When the elastic runner transformed the state in the stores first (``scalai store
reshard``), the plan of :func:`load_rank` is the identity: every rank reads its own
tensors from its own host's store. Otherwise each rank reads exactly the slices it needs
from whichever stores hold them (ranks load independently, so the plan has no host fan-out).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from ..config import Placement
from ..layout.ptc import PTC
from ..planner import Deployment, make_plan
from ..planner.plan import Plan
from ..storage.base import ArraySource, RangeSource, TensorSource
from ..storage.live import ArraysSink
from ..storage.run import run_plan
from .cluster import StoreCluster, parallel
from .errors import StoreRequestError
from .files import local_name, map_tensor, seal_tensor_file, write_tensor_file
from .lease import Lease, new_owner
from .local import StagedRank, unlink_quietly
from .manifest import VersionManifest

__all__ = ["save_rank", "commit", "next_version", "load_rank", "StoreWriter", "StoreReader"]

#: Bytes per ranged read while loading (more blocks = more parallel reads).
LOAD_BLOCK = 8 << 20


def next_version(cluster: StoreCluster, job: str) -> tuple[str, int]:
    """A version name that no store holds yet, and its sequence number (call on one rank)."""
    return cluster.next_version(job)


def save_rank(cluster: StoreCluster, job: str, version: str, rank: int, ptc: PTC, placement: Placement,
              tensors: Mapping[str, Any], workers: int = 4, owner: str | None = None) -> int:
    """Store every local tensor of ``rank`` (``ptc.rank_shards(rank)``) in its host's store
    (written into the store's upload directory where this process sees it, see
    :mod:`scalai.store.local`; over HTTP elsewhere), ``workers`` tensors at a time.

    Args:
        tensors: ``{name: tensor}`` (torch or numpy, the spec's dtype, the local shape;
            GPU tensors are copied to host memory one at a time).
        owner: the writer id every rank of the save uploads with (see
            :mod:`scalai.store.lease`; :class:`StoreWriter` makes and renews one).

    Returns:
        bytes uploaded.

    Raises:
        ValueError: a tensor is missing or has the wrong shape or dtype.
    """
    client = cluster.client(placement.host(rank))
    shards = ptc.rank_shards(rank)
    for name, shard in shards:
        if name not in tensors:
            raise ValueError(f"rank {rank} has no tensor {name}; give every tensor of ptc.rank_shards({rank})")
        if tuple(tensors[name].shape) != shard.shape:
            raise ValueError(f"{name} of rank {rank} has shape {list(tensors[name].shape)}, its local shape "
                             f"under {ptc.config} is {list(shard.shape)}")

    def one(item) -> int:
        name, _ = item
        value = tensors[name]
        if hasattr(value, "device") and str(value.device) != "cpu":
            value = value.detach().cpu()
        return client.put(job, version, rank, name, value, ptc.spec(name).dtype, owner=owner)["bytes"]

    return sum(parallel(one, shards, workers))


def commit(cluster: StoreCluster, job: str, version: str, ptc: PTC, placement: Placement, state: dict,
           sequence: int, parent: str | None = None, replicas: str = "all", owner: str | None = None
           ) -> VersionManifest:
    """Commit a saved version on every store (call on one rank, after every rank saved).
    ``replicas="per_host"``: the ranks saved ``ptc.stored_replicas(placement.host)``;
    ``owner``: the writer id the ranks uploaded with.

    Raises:
        StoreRequestError: a store lacks some of its ranks' tensors (409, naming them).
    """
    manifest = VersionManifest(job, version, sequence, ptc, placement, dict(state), parent, replicas=replicas)
    cluster.commit(manifest, owner=owner)
    return manifest


def load_rank(cluster: StoreCluster, job: str, rank: int, ptc: PTC, placement: Placement,
              out: Mapping[str, Any], version: str | None = None, workers: int = 8) -> VersionManifest:
    """Fill ``rank``'s local tensors ``out`` (writable, the local shapes of ``ptc``; torch
    on any device, or numpy) from the job's current version (or ``version``) in the
    stores, whatever its layout: a plan run from a :class:`StoreReader` into ``out``.

    Every element is written exactly once (the plan is checked); padding is zeroed.

    Returns:
        the stored version's manifest (its ``state`` holds step, RNG, data position).
    """
    with StoreReader(cluster, job, version) as reader:
        stored = reader.manifest
        for name, _ in ptc.rank_shards(rank):
            if name not in out:
                raise ValueError(f"out has no tensor {name}; give every tensor of ptc.rank_shards({rank})")
        plan = make_plan(Deployment(stored.ptc, stored.placement), Deployment(ptc, placement), fanout=False)
        mine = Plan(plan.old, plan.new, tuple(plan.copies_into(rank)), plan.stats)
        sink = ArraysSink(ptc, {rank: out})
        run_plan(mine, reader, sink, workers=workers)
        sink.commit()
    return stored


class StoreWriter:
    """:class:`scalai.training.storage.StateWriter` over the stores: ``save(job, writer)``.

    ``begin`` (rank 0) picks the next version name and claims it on every store for a new
    owner id (:mod:`scalai.store.lease`), renewing its lease from rank 0's process until
    ``commit`` or ``abort``; the token every rank receives is ``"<version>@<owner>"``.
    ``write_rank`` stores the rank's tensors in the store of its own host
    (``placement.host(rank)``) as that owner, ``workers`` at a time (written into the
    store's upload directory where the rank sees it, see :mod:`scalai.store.local`, else
    over HTTP); ``stage_rank`` (a background save, where the rank sees that directory)
    writes them there at once, without their CRC-32, and ``write_rank`` then records the
    CRCs and has the files adopted; ``commit`` (rank 0) commits the version on
    every store; ``abort`` deletes it everywhere (only where that owner created it). If
    the job dies mid-save, the version expires with its lease.

    Args:
        urls: the stores in host order (every rank gives the same list), or a cluster.
        job: the job's name in the stores.
        gpus_per_host: ranks per host: rank ``r`` lives on the ``r // G``-th store.
        owner_kind: what the writer's owner ids start with (an elastic run's workers give
            ``g<generation>-save``, so that their stores can fence off old generations).
        token / tls: the stores' token and TLS setting (:class:`~scalai.tls.Tls`), when
            ``urls`` are URLs.
        workers: tensors of one rank written at once.
    """

    def __init__(self, urls, job: str, gpus_per_host: int, token: str | None = None, owner_kind: str = "save",
                 tls=None, workers: int = 4):
        self.cluster = urls if isinstance(urls, StoreCluster) else StoreCluster(urls, token, tls=tls)
        self.job = job
        self.placement = self.cluster.placement(gpus_per_host)
        self.last_version: str | None = None  # the version the last save wrote (every rank)
        self._stored: tuple[PTC, PTC] | None = None  # (ptc, its per-host view)
        self._leases: dict[str, Lease] = {}  # rank 0: token -> the lease it renews
        self.owner_kind = owner_kind
        self.workers = workers

    def begin(self) -> str:
        version = self.cluster.next_version(self.job)[0]
        lease = Lease(self.cluster, self.job, new_owner(self.owner_kind))
        try:
            lease.claim(version, self.cluster.hosts)
        except BaseException:
            lease.close()
            self.cluster.drop(self.job, version, owner=lease.owner)
            raise
        token = f"{version}@{lease.owner}"
        self._leases[token] = lease
        return token

    def write_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, Any] | StagedRank):
        from ..checkpoint.manifest import RankRecord, TensorRecord

        version, owner = token.split("@")
        self.last_version = version
        client = self.cluster.client(self.placement.host(rank))
        staged = arrays if isinstance(arrays, StagedRank) else None

        def one(item) -> tuple[str, TensorRecord, int]:
            name, shard = item
            dtype = ptc.spec(name).dtype
            if staged is None:
                out = client.put(self.job, version, rank, name, arrays[name], dtype, owner=owner)
            else:
                out = _adopt_staged(client, staged.take(name)[0], self.job, version, rank, name, owner)
            return name, TensorRecord(dtype, shard.shape, int(out["crc32"], 16)), out["bytes"]

        done = parallel(one, list(self.stored(ptc).rank_shards(rank)), self.workers)
        records = {name: record for name, record, _ in done}
        total = sum(n for _, _, n in done)
        return RankRecord(rank, f"{client.url}/v1/jobs/{self.job}/versions/{version}/ranks/{rank}", total, records)

    def stage_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, Any]) -> StagedRank | None:
        """Write the tensors ``write_rank`` stores into the upload directory of the rank's
        store, without their CRC-32 (a background save's staging copy, see
        :mod:`scalai.training.background`); None where the rank does not see that
        directory (stage in host memory then)."""
        from ..storage.arrays import as_raw

        client = self.cluster.client(self.placement.host(rank))
        uploads = client.local_dir()
        if uploads is None:
            return None
        staged = StagedRank()

        def one(item) -> None:
            name, _ = item
            dtype = ptc.spec(name).dtype
            path = local_name(uploads)
            staged.add(name, path, write_tensor_file(path, as_raw(arrays[name], dtype, name), dtype, checksum=False))

        try:
            parallel(one, list(self.stored(ptc).rank_shards(rank)), self.workers)
        except BaseException:
            staged.clear()
            raise
        return staged

    def stored(self, ptc: PTC) -> PTC:
        """What the ranks upload of ``ptc``: a replica that ranks of one host share, once per
        host (the host that held a copy keeps one; none is uploaded twice into one store)."""
        if self._stored is None or self._stored[0] is not ptc:
            self._stored = (ptc, ptc.stored_replicas(self.placement.host))
        return self._stored[1]

    def commit(self, token: str, manifest) -> None:
        version, owner = token.split("@")
        sequence = int(version[1:]) if version[1:].isdigit() else self.cluster.next_version(self.job)[1]
        try:
            commit(self.cluster, self.job, version, manifest.ptc, self.placement, manifest.state, sequence,
                   replicas="per_host", owner=owner)
        finally:
            self._end(token)

    def abort(self, token: str) -> None:
        version, owner = token.split("@")
        self._end(token)
        self.cluster.drop(self.job, version, owner=owner)

    def _end(self, token: str) -> None:
        lease = self._leases.pop(token, None)
        if lease is not None:
            lease.close()


def _adopt_staged(client, path: str, job: str, version: str, rank: int, tensor: str, owner: str) -> dict:
    """Record a staged file's CRC-32 and have it adopted. A store without room for it in
    memory (507) deletes the file; its bytes then go over HTTP from a mapping taken
    before (it outlives the file), so the store may spill them."""
    try:
        meta = seal_tensor_file(path)
        data = map_tensor(path, meta)
    except BaseException:
        unlink_quietly(path)
        raise
    try:
        return client.adopt(job, version, rank, tensor, path, meta, owner=owner)
    except StoreRequestError as exc:
        if exc.status != 507:
            raise
    return client.put(job, version, rank, tensor, data, meta.dtype, owner=owner, local=False)


class StoreReader(TensorSource):
    """A committed version in the stores as a :class:`~scalai.storage.TensorSource`
    (``load(job, reader)``, :func:`load_rank`, ``run_plan``).

    Ranks of ``local_host`` (this machine's store) are an :class:`ArraySource` part: their
    files are mapped, no byte crosses HTTP. The others are a :class:`RangeSource` part:
    each plan window is a ranged read of the rank's store, sliced on the store (flat ZeRO
    views included), in blocks of :data:`LOAD_BLOCK`, several in flight.

    Args:
        urls: the stores in host order, or a cluster.
        job: the job's name in the stores.
        version: the version to read (default: the job's current one).
        local_host: the host this process runs on, to map its store's files.
        token / tls: the stores' token and TLS setting, when ``urls`` are URLs.
    """

    def __init__(self, urls, job: str, version: str | None = None, token: str | None = None,
                 local_host: str | None = None, tls=None):
        self._own_cluster = not isinstance(urls, StoreCluster)
        self.cluster = StoreCluster(urls, token, tls=tls) if self._own_cluster else urls
        self.job = job
        self.manifest = self.cluster.latest(job, version).manifest
        self.ptc: PTC = self.manifest.ptc
        self.placement: Placement = self.manifest.placement
        self.state: dict = self.manifest.state
        self.local_host = local_host
        self._remote = _RemoteRanks(self)
        self._local: dict[int, _MappedRank | None] = {}
        self._crcs: dict[str, dict[tuple[int, str], int]] = {}
        self._lock = threading.Lock()

    def client(self, rank: int):
        return self.cluster.client(self.placement.host(rank))

    def part(self, rank: int) -> TensorSource:
        """The rank's mapped files when it lives on ``local_host`` and its store gives them
        (same machine), else ranged reads of its store."""
        if self.local_host is None or self.placement.host(rank) != self.local_host:
            return self._remote
        with self._lock:
            if rank not in self._local:
                arrays = _map_rank(self.client(rank), self.job, self.manifest.version, rank)
                self._local[rank] = None if arrays is None else _MappedRank(self, arrays)
        return self._local[rank] or self._remote

    def checksum(self, rank: int, tensor: str) -> int | None:
        """The CRC-32 the rank's store recorded when the tensor was stored."""
        host = self.placement.host(rank)
        with self._lock:
            crcs = self._crcs.get(host)
        if crcs is None:
            listing = self.cluster.client(host).version(self.job, self.manifest.version)["ranks"]
            crcs = {(int(r), n): int(t["crc32"], 16) for r, ts in listing.items() for n, t in ts.items()
                    if t.get("crc32") is not None}
            with self._lock:
                self._crcs[host] = crcs
        return crcs.get((rank, tensor))

    def where(self, rank: int) -> str:
        return f"store {self.client(rank).label}, rank {rank}"

    def close(self) -> None:
        """Unmap local files; close the connections of a cluster this reader made."""
        self._local.clear()
        if self._own_cluster:
            for c in self.cluster.clients:
                c.close()


class _RemoteRanks(RangeSource):
    """Ranged reads of the stores (what a plan window selects, sliced on the store)."""

    block_bytes = LOAD_BLOCK
    concurrency = 8

    def __init__(self, reader: StoreReader):
        self.reader, self.ptc, self.state = reader, reader.ptc, reader.state

    def read_into(self, rank: int, tensor: str, window, out: np.ndarray) -> None:
        r = self.reader
        r.client(rank).read(r.job, r.manifest.version, rank, tensor, window, out=out)


class _MappedRank(ArraySource):
    """A rank's committed tensors mapped read-only from its store's files (same machine)."""

    def __init__(self, reader: StoreReader, arrays: dict[str, np.ndarray]):
        self.ptc, self.state, self._arrays = reader.ptc, reader.state, arrays

    def array(self, rank: int, tensor: str) -> np.ndarray:
        return self._arrays[tensor]


def _map_rank(client, job: str, version: str, rank: int) -> dict[str, np.ndarray] | None:
    """Every tensor of a committed rank mapped read-only from its store's files, or None when
    the store does not give them (another machine) or a file is not what the store says."""
    from .errors import StoreError
    from .files import StoreFileError, TensorMeta, map_tensor, read_meta

    try:
        files = client.files(job, version, rank)
        out = {}
        for name, f in files.items():
            meta = TensorMeta(f["dtype"], tuple(f["shape"]), None if f["crc32"] is None else int(f["crc32"], 16))
            if read_meta(f["path"]) != meta:  # the same file, not one that happens to share its path
                return None
            out[name] = map_tensor(f["path"], meta)
        return out
    except (StoreError, StoreFileError, OSError, KeyError, ValueError):
        return None
