"""What a training job calls to keep its state in the stores of its hosts.

The training API's ``save``/``load`` take a list of store URLs as well as a directory.
With stores, every rank saves its local shards into the store of its own host (an upload
over loopback: a memory copy that outlives the worker), one rank commits once all ranks
are done, and on restart every rank loads its shards through a plan from whatever
version the stores hold, in whatever layout it was saved::

    cluster = StoreCluster(urls, load_token())           # every rank, same URLs, same order
    placement = cluster.placement(gpus_per_host)          # rank r lives on cluster.hosts[r // G]
    version, seq = next_version(cluster, job)             # rank 0, then broadcast
    save_rank(cluster, job, version, rank, ptc, placement, local_tensors)
    barrier()
    if rank == 0:
        commit(cluster, job, version, ptc, placement, state, seq)
    ...
    stored = load_rank(cluster, job, rank, ptc, placement, local_tensors)   # fills in place
    state = stored.state

With the training API (``scalai.training.save/load``), :class:`StoreWriter` and
:class:`StoreReader` are its ``StateWriter``/``StateReader`` over the stores::

    save(job, StoreWriter(urls, "gpt", gpus_per_host=4))
    load(job, StoreReader(urls, "gpt"))

When the elastic runner transformed the state in the stores first (``scalai store
reshard``), the plan of :func:`load_rank` is the identity: every rank reads its own
tensors from its own host's store. Otherwise each rank reads exactly the slices it needs
from whichever stores hold them (ranks load independently, so the plan has no host fan-out).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..checkpoint.arrays import as_raw
from ..config import Placement
from ..layout.ptc import PTC
from ..planner import Deployment, make_plan
from ..planner.plan import Copy
from .cluster import StoreCluster, parallel
from .lease import Lease, new_owner
from .manifest import VersionManifest
from .transform import split_copy

__all__ = ["save_rank", "commit", "next_version", "load_rank", "StoreSource", "StoreWriter", "StoreReader"]

LOAD_BLOCK = 8 << 20  # bytes per ranged read while loading (more blocks = more parallel reads)


def next_version(cluster: StoreCluster, job: str) -> tuple[str, int]:
    """A version name that no store holds yet, and its sequence number (call on one rank)."""
    return cluster.next_version(job)


def save_rank(cluster: StoreCluster, job: str, version: str, rank: int, ptc: PTC, placement: Placement,
              tensors: Mapping[str, Any], workers: int = 4, owner: str | None = None) -> int:
    """Upload every local tensor of ``rank`` (``ptc.rank_shards(rank)``) to its host's store.

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
    """Fill ``rank``'s local tensors ``out`` (writable, the local shapes of ``ptc``) from the
    job's current version (or ``version``) in the stores, whatever its layout.

    Every element is written exactly once (the plan is checked); padding is zeroed.

    Returns:
        the stored version's manifest (its ``state`` holds step, RNG, data position).
    """
    stored = cluster.latest(job, version).manifest
    plan = make_plan(Deployment(stored.ptc, stored.placement), Deployment(ptc, placement), fanout=False)
    raw: dict[str, np.ndarray] = {}
    staged: dict[str, Any] = {}
    for name, shard in ptc.rank_shards(rank):
        if name not in out:
            raise ValueError(f"out has no tensor {name}; give every tensor of ptc.rank_shards({rank})")
        target = out[name]
        if hasattr(target, "device") and str(target.device) != "cpu":
            staged[name] = target
            target = target.detach().cpu()
        raw[name] = as_raw(target, ptc.spec(name).dtype, f"{name} of rank {rank}")
        if raw[name].shape != shard.shape:
            raise ValueError(f"{name} of rank {rank} has shape {list(raw[name].shape)}, expected {list(shard.shape)}")
        if shard.covered != raw[name].size:
            raw[name][...] = 0
    work: list[tuple[Copy, Any, Any]] = []
    for c in plan.copies_into(rank):
        size = raw[c.tensor].itemsize
        work.extend((c, src, dst) for src, dst in split_copy(c, size, LOAD_BLOCK))

    def one(item) -> None:
        c, src, dst = item
        target = dst.select(raw[c.tensor])
        client = cluster.client(c.src_host)
        if target.flags.c_contiguous:
            client.read(job, stored.version, c.src_rank, c.tensor, src, out=target)
        else:
            np.copyto(target, client.read(job, stored.version, c.src_rank, c.tensor, src))

    parallel(one, work, workers)
    for name, device_tensor in staged.items():
        import torch

        device_tensor.copy_(torch.from_numpy(raw[name]).view(device_tensor.dtype))
    return stored


class StoreWriter:
    """:class:`scalai.training.storage.StateWriter` over the stores: ``save(job, writer)``.

    ``begin`` (rank 0) picks the next version name and claims it on every store for a new
    owner id (:mod:`scalai.store.lease`), renewing its lease from rank 0's process until
    ``commit`` or ``abort``; the token every rank receives is ``"<version>@<owner>"``.
    ``write_rank`` uploads the rank's tensors to the store of its own host
    (``placement.host(rank)``) as that owner; ``commit`` (rank 0) commits the version on
    every store; ``abort`` deletes it everywhere (only where that owner created it). If
    the job dies mid-save, the version expires with its lease.

    Args:
        urls: the stores in host order (every rank gives the same list), or a cluster.
        job: the job's name in the stores.
        gpus_per_host: ranks per host: rank ``r`` lives on the ``r // G``-th store.
    """

    def __init__(self, urls, job: str, gpus_per_host: int, token: str | None = None):
        self.cluster = urls if isinstance(urls, StoreCluster) else StoreCluster(urls, token)
        self.job = job
        self.placement = self.cluster.placement(gpus_per_host)
        self.last_version: str | None = None  # the version the last save wrote (every rank)
        self._stored: tuple[PTC, PTC] | None = None  # (ptc, its per-host view)
        self._leases: dict[str, Lease] = {}  # rank 0: token -> the lease it renews

    def begin(self) -> str:
        version = self.cluster.next_version(self.job)[0]
        lease = Lease(self.cluster, self.job, new_owner("save"))
        try:
            lease.claim(version, self.cluster.hosts)
        except BaseException:
            lease.close()
            self.cluster.drop(self.job, version, owner=lease.owner)
            raise
        token = f"{version}@{lease.owner}"
        self._leases[token] = lease
        return token

    def write_rank(self, token: str, rank: int, ptc: PTC, arrays: Mapping[str, Any]):
        from ..checkpoint.manifest import RankRecord, TensorRecord

        version, owner = token.split("@")
        self.last_version = version
        client = self.cluster.client(self.placement.host(rank))
        records, total = {}, 0
        for name, shard in self.stored(ptc).rank_shards(rank):
            dtype = ptc.spec(name).dtype
            out = client.put(self.job, version, rank, name, arrays[name], dtype, owner=owner)
            records[name] = TensorRecord(dtype, shard.shape, int(out["crc32"], 16))
            total += out["bytes"]
        return RankRecord(rank, f"{client.url}/v1/jobs/{self.job}/versions/{version}/ranks/{rank}", total, records)

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


class StoreReader:
    """:class:`scalai.training.storage.StateReader` over the stores: ``load(job, reader)``.

    ``view(rank, tensor, region)`` reads from the store of the saved rank's host, only the
    region when one is given (the whole tensor otherwise; the last few are cached, since
    a loader may select several windows of one tensor). :meth:`read_window` reads exactly
    a plan's window (flat ZeRO views included), sliced on the store.
    """

    def __init__(self, urls, job: str, version: str | None = None, token: str | None = None, cache: int = 4,
                 local_host: str | None = None):
        self.cluster = urls if isinstance(urls, StoreCluster) else StoreCluster(urls, token)
        self.job = job
        self.manifest = self.cluster.latest(job, version).manifest
        self.ptc: PTC = self.manifest.ptc
        self.placement: Placement = self.manifest.placement
        self.state: dict = self.manifest.state
        self._cache: dict[tuple[int, str], np.ndarray] = {}
        self._cache_size = cache
        self.local_host = local_host
        self._local: dict[int, dict[str, np.ndarray] | None] = {}

    def _client(self, rank: int):
        return self.cluster.client(self.placement.host(rank))

    def _mapped(self, rank: int, tensor: str) -> np.ndarray | None:
        """The saved rank's tensor mapped from its store's file, when the rank lives on
        ``local_host`` (this machine's store) and the store gives its files; else None."""
        if self.local_host is None or self.placement.host(rank) != self.local_host:
            return None
        if rank not in self._local:
            self._local[rank] = _map_rank(self._client(rank), self.job, self.manifest.version, rank)
        arrays = self._local[rank]
        return None if arrays is None else arrays.get(tensor)

    def view(self, rank: int, tensor: str, region=None) -> np.ndarray:
        mapped = self._mapped(rank, tensor)
        if mapped is not None:
            return mapped if region is None else mapped[region.to_slices() + (...,)]
        if region is not None:
            return self._client(rank).read(self.job, self.manifest.version, rank, tensor, region)
        key = (rank, tensor)
        if key not in self._cache:
            while len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._client(rank).read(self.job, self.manifest.version, rank, tensor)
            self._cache[key].flags.writeable = False
        return self._cache[key]

    def read_window(self, rank: int, tensor: str, window, out: np.ndarray | None = None) -> np.ndarray:
        """The elements a plan's ``Window`` selects from the saved rank's tensor."""
        mapped = self._mapped(rank, tensor)
        if mapped is not None:
            sel = window.select(mapped)
            if out is None:
                return np.array(sel)
            np.copyto(out, sel.reshape(out.shape))
            return out
        return self._client(rank).read(self.job, self.manifest.version, rank, tensor, window, out=out)

    def verify(self, ranks) -> None:
        """Stream the given saved ranks' tensors and check each against the CRC-32 its
        store recorded (the bytes cross the network once; pass ``verify=False`` to skip).

        Raises:
            ChecksumError: naming the store, rank and tensor.
        """
        import zlib

        from ..errors import ChecksumError

        for rank in ranks:
            client = self._client(rank)
            listing = client.version(self.job, self.manifest.version)["ranks"].get(str(rank), {})
            for name, _ in self.ptc.rank_shards(rank):
                crc = 0
                mapped = self._mapped(rank, name)
                chunks = client.stream(self.job, self.manifest.version, rank, name) if mapped is None \
                    else _byte_blocks(mapped)
                for chunk in chunks:
                    crc = zlib.crc32(chunk, crc)
                want = listing.get(name, {}).get("crc32")
                if want is not None and int(want, 16) != crc:
                    raise ChecksumError(f"{name} of rank {rank} in store {client.label} does not match the "
                                        f"CRC-32 recorded when it was stored; the store's memory is damaged")

    def close(self) -> None:
        self._cache.clear()
        self._local.clear()
        for c in self.cluster.clients:
            c.close()


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


def _byte_blocks(array: np.ndarray, block: int = 4 << 20):
    flat = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
    for lo in range(0, flat.nbytes, block):
        yield flat[lo:lo + block]


class _RemoteTensor:
    """A stored tensor as a lazy array: slicing it reads only that box from the store."""

    def __init__(self, cluster: StoreCluster, job: str, version: str, host: str, rank: int, name: str,
                 shape: tuple[int, ...], dtype: np.dtype):
        self._args = (job, version, rank, name)
        self._client = cluster.client(host)
        self.shape, self.dtype = shape, dtype

    def __getitem__(self, index) -> np.ndarray:
        from ..regions import Region

        index = index if isinstance(index, tuple) else (index,)
        if index and index[-1] is Ellipsis:
            index = index[:-1]
        if len(index) != len(self.shape) or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
            raise TypeError("a stored tensor supports box slicing only, e.g. t[0:4, 8:16]")
        box = Region(tuple(i.start or 0 for i in index),
                     tuple((n if i.stop is None else i.stop) - (i.start or 0) for i, n in zip(index, self.shape)))
        return self._client.read(*self._args, box)


class StoreSource:
    """A stored version as the source of :func:`scalai.executor.execute`: ``view(rank,
    tensor)`` is a lazy array whose box slices are ranged reads from the rank's store."""

    def __init__(self, cluster: StoreCluster, job: str, version: str | None = None):
        from ..dtypes import raw_numpy

        self.version = cluster.latest(job, version).manifest
        self._cluster, self._job, self._raw_numpy = cluster, job, raw_numpy

    def view(self, rank: int, tensor: str) -> _RemoteTensor:
        m = self.version
        shard = dict(m.ptc.rank_shards(rank))[tensor]
        return _RemoteTensor(self._cluster, self._job, m.version, m.placement.host(rank), rank, tensor,
                             shard.shape, self._raw_numpy(m.ptc.spec(tensor).dtype))
