"""A store's part of a transformation as a source and a sink of the one plan runner.

- :class:`LocalVersion` (a :class:`~scalai.storage.FileSource`): the old version's tensors
  that this store holds, mapped from its files (whole tensors move file to file in the
  kernel; their recorded CRC-32s travel with them).
- :class:`PeerVersion` (an :class:`~scalai.storage.AsyncRangeSource`): a peer store's
  tensors, read with ranged HTTP GETs of exactly each window, sliced on the peer, in
  blocks of :data:`BLOCK_BYTES`, a few in flight; connection errors are retried with
  backoff, then the part fails with :class:`PeerError` naming the peer.
- :class:`HostSources`: the old version as a whole, each rank routed to the store that
  holds it (its own files, or its peer).
- :class:`NewVersion` (a :class:`~scalai.storage.FileSink`): this store's tensors of the
  new version, files allocated at full size (zeros) and filled in place, or hard links to
  the old version's files for tensors that move unchanged within the store; its ``commit``
  records every tensor's CRC-32 in the catalog (the version itself is committed by the
  coordinator, on every store, once every host succeeded); stopped, it refuses every
  write.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from urllib.parse import quote

import numpy as np

from ..layout.ptc import PTC
from ..planner.plan import Deployment, Window
from ..storage.base import AsyncRangeSource, FileSink, FileSource, TensorSource
from ..tls import tls_failure
from .catalog import Catalog, NotFound, VersionEntry
from .errors import PeerError
from .files import DATA_OFFSET, NewTensor, StoreFileError, TensorMeta
from .names import window_query
from .ratelimit import Link

__all__ = ["LocalVersion", "PeerVersion", "HostSources", "NewVersion", "BLOCK_BYTES", "RETRIES", "BACKOFF_S"]

BLOCK_BYTES = 4 << 20  # most bytes one ranged read asks for
RETRIES = 4            # attempts per read on connection errors
BACKOFF_S = 0.25       # first wait between attempts (doubles each time)


class LocalVersion(FileSource):
    """The committed version ``version`` of ``job`` in this store (the ranks it holds)."""

    def __init__(self, catalog: Catalog, job: str, version: str, ptc: PTC):
        self.catalog, self.job, self.version = catalog, job, version
        self.ptc, self.state = ptc, {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _stored(self, rank: int, tensor: str):
        return self.catalog.tensor(self.job, self.version, rank, tensor)

    def array(self, rank: int, tensor: str) -> np.ndarray:
        return self.catalog.array(self._stored(rank, tensor))

    def checksum(self, rank: int, tensor: str) -> int | None:
        return self._stored(rank, tensor).meta.crc32

    def file_path(self, rank: int, tensor: str) -> str:
        return self._stored(rank, tensor).path

    def file_range(self, rank: int, tensor: str) -> tuple[int, int]:
        path = self._stored(rank, tensor).path
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd, DATA_OFFSET

    def where(self, rank: int) -> str:
        return f"store {self.catalog.name}, rank {rank}"

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class PeerVersion(AsyncRangeSource):
    """The committed version ``version`` of ``job`` in the store of ``host``, read with
    ranged GETs from inside this store's event loop (``session``: its aiohttp client);
    the plan runner's small blocks of one rank come several to a request
    (``POST .../windows``, :meth:`read_many`)."""

    block_bytes = BLOCK_BYTES
    coalesce = True  # a request costs more than a small window's bytes: small ones go together

    def __init__(self, host: str, url: str, job: str, version: str, ptc: PTC, session, link: Link,
                 headers: dict[str, str], concurrency: int = 8, tls=None):
        self.host, self.url, self.job, self.version, self.tls = host, url, job, version, tls
        self.ptc, self.state = ptc, {}
        self.session, self.link, self.headers = session, link, headers
        self.concurrency = concurrency
        self.fetched = 0   # payload bytes received
        self.requests = 0

    def where(self, rank: int) -> str:
        return f"store {self.host} ({self.url}), rank {rank}"

    def _rank_path(self, rank: int) -> str:
        return f"{self.url}/v1/jobs/{self.job}/versions/{self.version}/ranks/{rank}"

    async def read_into(self, rank: int, tensor: str, window: Window, out: np.ndarray) -> None:
        await self._fetch(lambda: self.session.get(f"{self._rank_path(rank)}/tensors/{quote(tensor)}",
                                                   params=window_query(window), headers=self.headers), [out])

    async def read_many(self, rank: int, reads) -> None:
        """Small windows of one rank in one request (``POST .../windows``), in order."""
        body = {"reads": [{"tensor": tensor, **window_query(window)} for tensor, window, _ in reads]}
        await self._fetch(lambda: self.session.post(f"{self._rank_path(rank)}/windows", json=body,
                                                    headers=self.headers), [out for _, _, out in reads])

    async def _fetch(self, request, outs: list[np.ndarray]) -> None:
        """One request (``request()`` makes it, again on a retry) whose body is the bytes of
        ``outs`` one after the other; streamed into them."""
        import aiohttp

        targets = [memoryview(o.reshape(-1).view(np.uint8)) for o in outs if o.size]
        nbytes = sum(t.nbytes for t in targets)
        for attempt in range(RETRIES):
            try:
                async with request() as resp:
                    if resp.status in (404, 409):  # another writer dropped the source meanwhile
                        raise NotFound(f"store {self.host} ({self.url}) no longer holds the source: "
                                       f"{await _reason(resp)}")
                    if resp.status != 200:
                        raise PeerError(self.host, f"store {self.host} ({self.url}) answered "
                                                   f"{resp.status}: {await _reason(resp)}")
                    pos, which, at = 0, 0, 0  # bytes received; the target and the offset in it
                    async for chunk in resp.content.iter_chunked(1 << 18):
                        if pos + len(chunk) > nbytes:
                            raise PeerError(self.host, f"store {self.host} sent too many bytes")
                        await self.link.receive(len(chunk))
                        pos += len(chunk)
                        view = memoryview(chunk)
                        while view.nbytes:
                            take = min(view.nbytes, targets[which].nbytes - at)
                            targets[which][at:at + take] = view[:take]
                            view, at = view[take:], at + take
                            if at == targets[which].nbytes:
                                which, at = which + 1, 0
                    if pos != nbytes:
                        raise aiohttp.ClientPayloadError(f"short body: {pos} of {nbytes} bytes")
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                failure = tls_failure(exc, self.url, self.tls, f"store {self.host}")
                if failure is not None:  # a certificate that does not verify will not heal
                    raise PeerError(self.host, str(failure)) from None
                if attempt == RETRIES - 1:
                    raise PeerError(self.host, f"store {self.host} ({self.url}) is unreachable after "
                                               f"{RETRIES} attempts: {exc or type(exc).__name__}") from None
                await asyncio.sleep(BACKOFF_S * 2 ** attempt)
        self.requests += 1
        self.fetched += nbytes


async def _reason(resp) -> str:
    try:
        body = await resp.json(content_type=None)
        return str(body["error"]["message"])
    except Exception:  # noqa: BLE001 - any body: quote its start
        return (await resp.text())[:200]


class HostSources(TensorSource):
    """The old version across its hosts: this store's ranks are ``local``, every other
    rank reads from its host's :class:`PeerVersion` in ``peers``."""

    def __init__(self, old: Deployment, me: str, local: LocalVersion | None, peers: dict[str, PeerVersion]):
        self.ptc, self.state, self.placement = old.ptc, {}, old.placement
        self.me, self.local, self.peers = me, local, peers

    def part(self, rank: int) -> TensorSource:
        host = self.placement.host(rank)
        if host == self.me and self.local is not None:
            return self.local
        peer = self.peers.get(host)
        if peer is None:
            raise PeerError(host, f"the plan reads from host {host}, which is not among the peers given "
                                  f"({', '.join(sorted(self.peers))})")
        return peer

    def fetched(self) -> dict[str, int]:
        """Payload bytes received from each peer."""
        return {h: p.fetched for h, p in self.peers.items() if p.fetched}

    def close(self) -> None:
        if self.local is not None:
            self.local.close()


class NewVersion(FileSink):
    """This store's tensors of the uncommitted version ``entry`` (a transformation's): the
    ranks of ``new`` placed on this host, each tensor one file allocated at full size.

    After :meth:`stop` (the part failed or was cancelled: its version deleted, its lease
    expired) every write refuses, so that a worker thread still copying stops at its next
    block; files are opened as the very files this sink created, never a file that took
    their name after the version was deleted.

    Args:
        checksum: record every tensor's CRC-32 at :meth:`commit` (from what the runner
            handed over, else by reading the tensor back).
    """

    zero_filled = True
    links = True  # one file per tensor: one that moves unchanged is linked

    def __init__(self, catalog: Catalog, entry: VersionEntry, new: Deployment, checksum: bool = True):
        self.catalog, self.entry = catalog, entry
        self.ptc, self.records_checksums = new.ptc, checksum
        self.ranks = [r for r in range(new.ptc.config.world_size) if new.placement.host(r) == catalog.name]
        self._mine = set(self.ranks)
        self.tensors: dict[tuple[int, str], NewTensor] = {}
        self.timings = {"checksum": 0.0, "sync": 0.0}
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Refuse every further write (the part is over)."""
        self._stopped.set()

    def _tensor(self, rank: int, tensor: str) -> NewTensor:
        if self._stopped.is_set():
            raise StoreFileError(f"the transformation into {self.entry.version} was stopped")
        return self.tensors[(rank, tensor)]

    def stores(self, rank: int, tensor: str) -> bool:
        return rank in self._mine

    def prepare(self, ranks) -> None:
        """Allocate every tensor of this host's new ranks (also those no copy writes: all
        padding), whatever ranks the plan names.

        Raises:
            NotFound: the version was deleted meanwhile; StorageFull: no room.
        """
        for rank in self.ranks:
            for name, shard in self.ptc.rank_shards(rank):
                if (rank, name) not in self.tensors:
                    if self._stopped.is_set():
                        raise StoreFileError(f"the transformation into {self.entry.version} was stopped")
                    meta = TensorMeta(self.ptc.spec(name).dtype, shard.shape)
                    self.tensors[(rank, name)] = self.catalog.new_tensor(self.entry, rank, name, meta)

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        self._tensor(rank, tensor).write(byte_offset, data, crc)

    def copy_from(self, rank: int, tensor: str, byte_offset: int, fd: int, offset: int, nbytes: int,
                  crc: int | None) -> bool:
        return self._tensor(rank, tensor).copy_from(byte_offset, fd, offset, nbytes, crc)

    def link_from(self, rank: int, tensor: str, path: str, fd: int, offset: int, nbytes: int, crc: int) -> bool:
        """A tensor that moves unchanged from this store's old version: linked to its file
        (:meth:`NewTensor.link`, which checks that the file is exactly this tensor)."""
        return offset == DATA_OFFSET and self._tensor(rank, tensor).link(path, fd, crc)

    def array(self, rank: int, tensor: str) -> np.ndarray:
        return self._tensor(rank, tensor).mapping()

    def written(self, rank: int, tensor: str) -> np.ndarray:
        return self._tensor(rank, tensor).read()

    def declare_checksum(self, rank: int, tensor: str, crc: int) -> None:
        self._tensor(rank, tensor).declare(crc)

    def commit(self) -> None:
        """Record every new tensor's CRC-32 (and final meta) in this store's catalog."""
        t0 = time.perf_counter()
        for key in self.tensors:
            t = self._tensor(*key)
            self.catalog.set_meta(self.entry, key, t.finish(self.records_checksums), t.ident if t.linked else None)
        self.timings["checksum"] = time.perf_counter() - t0

    def abort(self) -> None:
        """Stop writing; the caller deletes the uncommitted version with its files."""
        self.stop()
