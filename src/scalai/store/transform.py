"""One host's part of a distributed transformation, run inside that host's store.

Every store receives the same request (old PTC and placement, new layout and placement,
the peers' addresses), computes the same plan (:func:`~scalai.planner.make_plan` is pure
and deterministic) and runs the copies whose destination is itself:

1. it allocates the files of its new ranks' tensors (zero-filled, in memory);
2. copies from an old rank of this host are memory copies between mappings, on a thread
   pool; copies from another host are ranged reads of that host's store, at most
   ``concurrency`` in flight, each cut into blocks of at most :data:`BLOCK_BYTES` so that
   memory stays bounded and the links stay busy;
3. then the ``from_new`` copies (host fan-out) copy from the new tensors just filled;
4. it checksums the new tensors (CRC-32, optional) and records them as the new version,
   uncommitted. The coordinator commits it on every store once every host succeeded.

A peer that is down is retried with backoff (connection errors only); then the whole
part fails with :class:`PeerError` naming the peer, and the caller deletes the new version.
A part that fails or is cancelled (its version deleted, its lease expired) stops its
worker threads at the next copy; they never write into a file of another version.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from urllib.parse import quote

import numpy as np

from ..storage.pages import populate
from ..storage.blocks import blocks, window_span
from ..storage.filler import Clock, Filler
from ..config import ParallelConfig
from ..dtypes import raw_numpy
from ..planner import Deployment, make_plan
from ..planner.plan import Copy, Window
from ..regions import Region
from .catalog import Catalog, NotFound, VersionEntry
from .errors import PeerError
from .files import StoreFileError, TensorMeta
from .manifest import parse_ptc, placement_from_json, untrusted_layout
from .names import check_name, window_query
from .ratelimit import Link

__all__ = ["TransformSpec", "PeerError", "run_host_part", "BLOCK_BYTES", "split_copy"]

BLOCK_BYTES = 4 << 20  # most bytes one ranged read asks for
RETRIES = 4            # attempts per read on connection errors
BACKOFF_S = 0.25       # first wait between attempts (doubles each time)


@dataclass(frozen=True)
class TransformSpec:
    """A parsed transformation request (see the ``TransformRequest`` schema)."""

    job: str
    from_version: str
    to_version: str
    old: Deployment
    new: Deployment
    peers: dict[str, str]
    checksum: bool = True
    concurrency: int = 8
    lost_hosts: tuple[str, ...] = ()
    lost_ranks: tuple[int, ...] = ()

    @property
    def unavailable(self) -> frozenset[int]:
        """Old ranks on lost hosts, and lost ranks: the plan reads their bytes from replicas."""
        return frozenset(r for r in range(self.old.ptc.config.world_size)
                         if self.old.placement.host(r) in self.lost_hosts or r in self.lost_ranks)

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
        return cls(check_name(job, "job"), obj["from_version"], obj["to_version"], old, new, peers,
                   obj.get("checksum", True), obj.get("concurrency", 8), tuple(obj.get("lost_hosts", ())),
                   tuple(obj.get("lost_ranks", ())))


def _sub(window: Window, box: Region) -> Window:
    """The part of ``window`` whose selection is ``box`` (box in selection coordinates)."""
    if window.view is None:
        return Window(Region(tuple(o + b for o, b in zip(window.region.offsets, box.offsets)), box.sizes))
    return Window(window.region, window.view,
                  Region(tuple(o + b for o, b in zip(window.sub.offsets, box.offsets)), box.sizes))


def split_copy(c: Copy, itemsize: int, max_bytes: int = BLOCK_BYTES) -> list[tuple[Window, Window]]:
    """Cut a copy into (source, destination) window pairs of at most ``max_bytes`` each
    (at least one element), in row-major order of the selection."""
    shape = c.src.shape
    if c.nbytes <= max_bytes:
        return [(c.src, c.dst)]
    out = []
    for index in blocks(shape, max(1, max_bytes // itemsize)):
        offsets, sizes = [], []
        for i in index:
            if isinstance(i, slice):
                offsets.append(i.start)
                sizes.append(i.stop - i.start)
            else:
                offsets.append(i)
                sizes.append(1)
        k = len(index)
        box = Region(tuple(offsets) + (0,) * (len(shape) - k), tuple(sizes) + tuple(shape[k:]))
        out.append((_sub(c.src, box), _sub(c.dst, box)))
    return out


async def _run_all(coros) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _HostPart:
    def __init__(self, catalog: Catalog, spec: TransformSpec, entry: VersionEntry, session, link: Link,
                 pool: Executor, headers: dict[str, str]):
        self.catalog, self.spec, self.entry, self.session, self.link = catalog, spec, entry, session, link
        self.pool, self.headers = pool, headers
        self.stopped = threading.Event()  # set when the part fails or is cancelled
        self.me = catalog.name
        self.dest: dict[tuple[int, str], np.ndarray] = {}
        self.fetched: dict[str, int] = defaultdict(int)
        self.local_bytes = 0
        self.requests = 0
        self._local = threading.local()

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _check(self) -> None:
        """Stop a worker thread of a part that failed or was cancelled."""
        if self.stopped.is_set():
            raise StoreFileError(f"the transformation into {self.spec.to_version} was stopped")

    def _allocate(self) -> None:
        s, cat = self.spec, self.catalog
        for rank in range(s.new.ptc.config.world_size):
            if s.new.placement.host(rank) != self.me:
                continue
            for name, shard in s.new.ptc.rank_shards(rank):
                self._check()
                meta = TensorMeta(s.new.ptc.spec(name).dtype, shard.shape)
                self.dest[(rank, name)] = cat.new_tensor(self.entry, rank, name, meta)

    def _copy_local(self, copies: list[Copy], from_new: bool) -> None:
        """Memory copies into one destination tensor: ``pwrite`` streams (with CRCs) for
        contiguous destination windows, strided copies into the mapping otherwise."""
        s, filler = self.spec, self._filler()
        dest = self.dest[(copies[0].dst_rank, copies[0].tensor)]
        for c in copies:
            self._check()
            if from_new:
                src = self.dest[(c.src_rank, c.tensor)].read()
                crc = None
            else:
                stored = self.catalog.tensor(s.job, s.from_version, c.src_rank, c.tensor)
                src, crc = self.catalog.array(stored), stored.meta.crc32
            whole = Region.full(dest.meta.shape)
            if (len(copies) == 1 and crc is not None and src.shape == dest.meta.shape and c.src.view is None
                    and c.dst.view is None and c.src.region == whole == c.dst.region):
                dest.declare(crc)  # moves unchanged: the source's CRC is the new one
                filler.stream(src, dest.write, 0, checksum=False)
                continue
            span = window_span(dest.meta.shape, c.dst)
            sel = c.src.select(src)
            if span is not None:
                filler.stream(sel, dest.write, span * sel.itemsize, True)
            else:
                populate(sel)
                np.copyto(c.dst.select(dest.mapping()), sel)

    def _filler(self) -> Filler:
        filler = getattr(self._local, "filler", None)
        if filler is None:
            filler = self._local.filler = Filler(lambda n: None, Clock())
        return filler

    async def _fetch(self, c: Copy, src: Window, dst: Window, sem: asyncio.Semaphore) -> None:
        s = self.spec
        url = s.peers.get(c.src_host)
        if url is None:
            raise PeerError(c.src_host, f"the plan reads from host {c.src_host}, which is not among the "
                                        f"peers given ({', '.join(sorted(s.peers))})")
        dtype = raw_numpy(s.old.ptc.spec(c.tensor).dtype)
        nbytes = dst.volume * dtype.itemsize
        path = (f"{url}/v1/jobs/{s.job}/versions/{s.from_version}/ranks/{c.src_rank}"
                f"/tensors/{quote(c.tensor)}")
        import aiohttp

        for attempt in range(RETRIES):
            try:
                async with sem:
                    async with self.session.get(path, params=window_query(src), headers=self.headers) as resp:
                        if resp.status in (404, 409):  # another writer dropped the source meanwhile
                            raise NotFound(f"store {c.src_host} ({url}) no longer holds the source: "
                                           f"{await _reason(resp)}")
                        if resp.status != 200:
                            raise PeerError(c.src_host, f"store {c.src_host} ({url}) answered "
                                                        f"{resp.status}: {await _reason(resp)}")
                        buf = bytearray(nbytes)
                        view, pos = memoryview(buf), 0
                        async for chunk in resp.content.iter_chunked(1 << 18):
                            if pos + len(chunk) > nbytes:
                                raise PeerError(c.src_host, f"store {c.src_host} sent too many bytes")
                            await self.link.receive(len(chunk))
                            view[pos:pos + len(chunk)] = chunk
                            pos += len(chunk)
                        if pos != nbytes:
                            raise aiohttp.ClientPayloadError(f"short body: {pos} of {nbytes} bytes")
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                if attempt == RETRIES - 1:
                    raise PeerError(c.src_host, f"store {c.src_host} ({url}) is unreachable after "
                                                f"{RETRIES} attempts: {exc or type(exc).__name__}") from None
                await asyncio.sleep(BACKOFF_S * 2 ** attempt)
        self.requests += 1
        self.fetched[c.src_host] += nbytes
        dest = self.dest[(c.dst_rank, c.tensor)]
        span = window_span(dest.meta.shape, dst)
        if span is not None:
            dest.write(span * dtype.itemsize, buf, zlib.crc32(buf))
        else:
            np.copyto(dst.select(dest.mapping()), np.frombuffer(buf, dtype).reshape(dst.shape))

    async def run(self) -> dict:
        try:
            return await self._run()
        except BaseException:
            self.stopped.set()  # worker threads still copying for this part stop at their next copy
            raise

    async def _run(self) -> dict:
        s, t0 = self.spec, time.perf_counter()
        if s.from_version == s.to_version:
            raise ValueError("from_version and to_version must differ")
        if self.me in s.old.placement.hosts:
            self.catalog.committed(s.job, s.from_version)  # 404/409 early if it is not there
        plan = await self._in_pool(partial(untrusted_layout, partial(make_plan, s.old, s.new, unavailable=s.unavailable),
                                           what="the layouts of the request"))
        mine = [c for c in plan.copies if c.dst_host == self.me and c.dst.volume]
        t1 = time.perf_counter()
        await self._in_pool(self._allocate)
        t2 = time.perf_counter()
        local, remote, fanout = defaultdict(list), [], defaultdict(list)
        for c in mine:
            if c.from_new:
                fanout[(c.dst_rank, c.tensor)].append(c)
            elif c.src_host == self.me:
                local[(c.dst_rank, c.tensor)].append(c)
            else:
                remote.append(c)
        self.local_bytes = sum(c.nbytes for c in mine if c.from_new or c.src_host == self.me)
        sem = asyncio.Semaphore(s.concurrency)
        item = {c.tensor: raw_numpy(s.old.ptc.spec(c.tensor).dtype).itemsize for c in remote}
        fetches = [self._fetch(c, sw, dw, sem) for c in remote for sw, dw in split_copy(c, item[c.tensor])]
        copies = [self._in_pool(self._copy_local, group, False) for group in local.values()]
        await _run_all(fetches + copies)
        t3 = time.perf_counter()
        await _run_all([self._in_pool(self._copy_local, group, True) for group in fanout.values()])
        t4 = time.perf_counter()
        await self._in_pool(self._finish)
        t5 = time.perf_counter()
        return {"host": self.me, "copies": len(mine), "local_bytes": self.local_bytes,
                "fetched_bytes": dict(self.fetched), "requests": self.requests,
                "tensors": len(self.dest), "bytes": int(sum(d.meta.nbytes for d in self.dest.values())),
                "seconds": {"plan": t1 - t0, "allocate": t2 - t1, "pull": t3 - t2, "fanout": t4 - t3,
                            "checksum": t5 - t4, "total": t5 - t0}}

    def _finish(self) -> None:
        """Record every new tensor's CRC-32 (combined from the pieces where possible)."""
        for key, dest in self.dest.items():
            self._check()
            self.catalog.set_meta(self.entry, key, dest.finish(self.spec.checksum))


async def _reason(resp) -> str:
    try:
        body = await resp.json(content_type=None)
        return str(body["error"]["message"])
    except Exception:
        return (await resp.text())[:200]


async def run_host_part(catalog: Catalog, spec: TransformSpec, entry: VersionEntry, session, link: Link,
                        pool: Executor, headers: dict[str, str]) -> dict:
    """Run this store's part of ``spec`` (see the module docstring); returns its statistics.

    The caller creates the (empty) new version ``entry`` first (:meth:`Catalog.begin`) and
    deletes it if this fails.

    Raises:
        PeerError: a peer failed; NotFound/Conflict: the versions are not as required.
    """
    return await _HostPart(catalog, spec, entry, session, link, pool, headers).run()
