"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``az://``, ...): the checkpoint format on
object storage, as one :class:`~scalai.storage.TensorSource` and one
:class:`~scalai.storage.TensorSink` of the plan runner.

The objects are the files of a checkpoint directory, under the URL as a prefix:
``URL/rank-00000.safetensors``, ... and ``URL/manifest.json`` (the same bytes a directory
holds, so a copy either way is a plain object copy).

- :class:`ObjectSource` reads the manifest and, per rank file on first use, its safetensors
  header (one ranged GET); every window a plan reads is then ranged GETs of exactly its
  byte runs, issued by the runner's ``concurrency`` worker threads at once. The runner
  hands small windows of one rank together (:meth:`~scalai.storage.RangeSource.read_many`,
  up to ``block_bytes``): their runs that touch, or lie closer than ``max_gap_bytes``, share
  one request (the bytes between are read and dropped), so a rank file of many small
  tensors costs a few GETs, not one per tensor.
- :class:`ObjectSink` assembles each rank file in host memory (zero-filled: padding nobody
  writes is zeros) and uploads it as soon as its last tensor is complete, several files at
  once (``upload_workers``; the backend splits a large file into a multipart upload). The
  commit is the manifest, written last, once every rank file is uploaded: object stores
  have no rename, so a save that is interrupted leaves rank files but no manifest, and
  readers (which open the manifest first) do not see it; the previous version at another
  URL stands. :meth:`ObjectSink.abort` deletes what it uploaded (best effort); a later
  sink at the same URL deletes the rank files of a save that has no manifest before it
  writes (never two saves to one URL at once: object stores cannot tell a running save from
  a dead one). Memory: the rank files being filled (at most the whole checkpoint's stored
  bytes when a plan fills every rank at once, as one process writing every rank does).

Endpoints and credentials come from the backend's own environment and configuration files
(for S3 through s3fs/botocore: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE`` and ``~/.aws``), never from
scalai's arguments; no credential is written to a manifest, and errors name the URL with
any user information removed and the values of those variables masked.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Mapping

import numpy as np

from ..errors import CheckpointError, ScalaiError
from ..layout.ptc import PTC
from ..planner.plan import Window
from ..regions import flat_runs
from ..storage.base import RangeSource, TensorSink
from ..storage.checksum import ChecksumLedger, crc32
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, manifest_bytes, parse_manifest, rank_file_name
from .safetensors_io import file_layout, header_length, parse_header
from .writer import checked_state, created_by, rank_record

__all__ = ["ObjectSource", "ObjectSink", "is_object_url", "object_exists", "object_children", "delete_objects",
           "redact"]

#: Environment variables whose values never appear in a message.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY",
                    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
                    "GOOGLE_APPLICATION_CREDENTIALS")
_LOCAL_SCHEMES = ("file", "memory")
_BUCKET_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
#: First bytes fetched of a rank file: its header in one GET for any but huge layouts.
_HEADER_PROBE = 64 << 10


def is_object_url(location: Any) -> bool:
    """Whether ``location`` is a URL of an fsspec backend (not ``file://`` nor scalai's
    in-process ``memory://``)."""
    if not isinstance(location, str) or "://" not in location:
        return False
    return location.split("://", 1)[0].lower() not in _LOCAL_SCHEMES


def redact(text: str) -> str:
    """``text`` with URL user information and the values of credential variables masked."""
    text = _USERINFO.sub("***@", str(text))
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _filesystem(url: str):
    """``(fs, root)`` of an fsspec URL; one line naming the missing package otherwise."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"{redact(url)} needs fsspec; install it (pip install 'scalai[objects]')") from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme)
        fix = f"install {hint} (pip install {hint})" if hint else "use s3://, gs://, az:// or a directory"
        raise ValueError(f"checkpoint location {redact(url)} cannot be opened ({redact(exc)}); {fix}") from None
    return fs, root.rstrip("/")


@contextmanager
def _io(what: str):
    """Turn a backend's failure into one :class:`CheckpointError` line (credentials masked)."""
    try:
        yield
    except (ScalaiError, ValueError, FileExistsError):
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what}: not found ({redact(exc) or 'no such object or bucket'}); check the "
                              f"URL and that the bucket exists") from None
    except PermissionError as exc:
        raise CheckpointError(f"{what}: access denied ({redact(exc)}); check the credentials in the "
                              f"environment or the backend's configuration files") from None
    except Exception as exc:  # noqa: BLE001 - every backend has its own errors (botocore, aiohttp, ...)
        raise CheckpointError(f"{what}: {type(exc).__name__}: {redact(exc)}; check the URL, the endpoint "
                              f"and the credentials") from None


def _check_bucket(fs, root: str, url: str) -> None:
    """Refuse a URL whose bucket (container) is missing, in one line naming it."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not set(protocols) & _BUCKET_SCHEMES:
        return
    bucket = root.split("/", 1)[0]
    if bucket and not fs.exists(bucket):
        raise CheckpointError(f"bucket {bucket!r} of {redact(url)} is not found (it does not exist, or these "
                              f"credentials cannot see it); create it or check the URL")


def _sweep(fs, root: str) -> None:
    """Delete the rank files under ``root`` (a save that left no manifest)."""
    stale = [n for n in _children(fs, root) if re.fullmatch(r"rank-\d{5}\.safetensors", n.rstrip("/").rsplit("/", 1)[-1])]
    if stale:
        fs.rm(stale)


def object_children(url: str) -> list[str]:
    """Names of the objects and prefixes directly under ``url`` (none if it is absent)."""
    fs, root = _filesystem(url)
    with _io(f"cannot list {redact(url)}"):
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in _children(fs, root))


def delete_objects(url: str) -> None:
    """Delete every object under ``url`` (a checkpoint: its manifest first, so that no
    reader opens it half deleted)."""
    fs, root = _filesystem(url)
    with _io(f"cannot delete {redact(url)}"):
        if fs.exists(f"{root}/{MANIFEST_NAME}"):
            fs.rm(f"{root}/{MANIFEST_NAME}")
        names = _children(fs, root)
        if names:
            fs.rm(names, recursive=True)


def _children(fs, root: str) -> list[str]:
    try:
        return fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return []


def object_exists(url: str) -> bool:
    """Whether a committed checkpoint (its manifest) is at ``url``."""
    fs, root = _filesystem(url)
    with _io(f"cannot reach {redact(url)}"):
        return fs.exists(f"{root}/{MANIFEST_NAME}")


class ObjectSource(RangeSource):
    """The committed checkpoint at an fsspec URL, read with ranged GETs.

    Args:
        url: the checkpoint's URL (the prefix of its objects).
        fs: an fsspec filesystem to use instead of the one the URL names (tests).
        max_gap_bytes: runs of a window closer than this are fetched in one GET (the bytes
            between are read and dropped); 0 reads exactly the window's bytes.

    Raises:
        CheckpointError: no manifest (nothing committed there), an invalid one, or the
            store refused (credentials, a missing bucket).
    """

    block_bytes = 8 << 20
    concurrency = 16
    coalesce = True

    def __init__(self, url: str, fs=None, max_gap_bytes: int = 64 << 10):
        self.url = url.rstrip("/")
        self.fs, self.root = (fs, self.url.split("://", 1)[-1]) if fs is not None else _filesystem(self.url)
        self.max_gap_bytes = max_gap_bytes
        self.fetched = 0    # payload bytes received (headers included)
        self.header_bytes = 0
        self.requests = 0
        name = f"{redact(self.url)}/{MANIFEST_NAME}"
        with _io(f"cannot read {name}"):
            try:
                size = self.fs.size(f"{self.root}/{MANIFEST_NAME}")
            except FileNotFoundError:
                _check_bucket(self.fs, self.root, self.url)
                raise CheckpointError(f"{redact(self.url)} has no {MANIFEST_NAME}: nothing was committed "
                                      f"there (a save that did not finish leaves none); check the URL or "
                                      f"use an earlier checkpoint") from None
            if size is None or size > MAX_MANIFEST_BYTES:
                raise CheckpointError(f"{name} has {size} bytes, more than a manifest may ({MAX_MANIFEST_BYTES})")
            text = self.fs.cat_file(f"{self.root}/{MANIFEST_NAME}")
        self.manifest: Manifest = parse_manifest(text, name)
        self.ptc: PTC = self.manifest.ptc
        self.state: dict = self.manifest.state
        self._entries: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._counter = threading.Lock()

    def _path(self, rank: int) -> str:
        return f"{self.root}/{self.manifest.ranks[rank].file}"

    def where(self, rank: int) -> str:
        return f"{redact(self.url)}/{self.manifest.ranks[rank].file}"

    def stored_in(self, rank: int, tensor: str) -> int:
        owner = self.manifest.ranks[rank].tensors[tensor].stored_in
        return rank if owner is None else owner

    def checksum(self, rank: int, tensor: str) -> int:
        return self.manifest.ranks[self.stored_in(rank, tensor)].tensors[tensor].checksum

    def stored(self, rank: int) -> list[str]:
        return [n for n, t in self.manifest.ranks[rank].tensors.items() if t.stored_in is None]

    def _get(self, rank: int, start: int, stop: int) -> bytes:
        with _io(f"cannot read {self.where(rank)}"):
            data = self.fs.cat_file(self._path(rank), start=start, end=stop)
        if len(data) != stop - start:
            raise CheckpointError(f"{self.where(rank)} is shorter than its manifest says (bytes {start}-{stop} "
                                  f"gave {len(data)}); the checkpoint is damaged: use an earlier one")
        with self._counter:
            self.fetched += len(data)
            self.requests += 1
        return data

    def entries(self, rank: int) -> dict:
        """The tensor entries of ``rank``'s file (its header, fetched once and checked
        against the manifest)."""
        found = self._entries.get(rank)
        if found is not None:
            return found
        record = self.manifest.ranks[rank]
        where = self.where(rank)

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where} is truncated or corrupt: {why}")

        head = self._get(rank, 0, min(record.nbytes, _HEADER_PROBE))
        n = header_length(head, record.nbytes, bad)
        raw = head[8:8 + n] if 8 + n <= len(head) else head[8:] + self._get(rank, len(head), 8 + n)
        _, entries = parse_header(raw, n, record.nbytes, bad)
        with self._counter:
            self.header_bytes += max(len(head), 8 + n)
        if not record.holds(entries):
            raise CheckpointError(f"{where} holds other tensors than the manifest lists; the object was "
                                  f"replaced: use an earlier checkpoint")
        with self._lock:
            self._entries[rank] = entries
        return entries

    def read_into(self, rank: int, tensor: str, window: Window, out: np.ndarray) -> None:
        self.read_many(rank, [(tensor, window, out)])

    def read_many(self, rank: int, reads) -> None:
        """Every window's byte runs, in file order, fetched in as few ranged GETs as
        ``max_gap_bytes`` allows (runs of one file closer than that share one request;
        the requests of one call are issued at once), then copied into their outputs."""
        pieces: dict[int, list[tuple[int, int, np.ndarray, int]]] = {}  # owner -> (start, stop, out, at)
        for tensor, window, out in reads:
            owner = self.stored_in(rank, tensor)
            entry = self.entries(owner)[tensor]
            runs = flat_runs(entry.shape, window.region)
            if window.view is not None:  # a box of a flat (ZeRO) range seen as ``view``: its runs only
                (base, _), = runs
                runs = [(base + a, base + b) for a, b in flat_runs(window.view, window.sub)]
            size, flat, at = out.dtype.itemsize, out.reshape(-1).view(np.uint8), 0
            for a, b in runs:
                pieces.setdefault(owner, []).append((entry.start + a * size, entry.start + b * size, flat, at))
                at += (b - a) * size
        spans = [(owner, span) for owner, found in pieces.items() for span in self._spans(sorted(
            found, key=lambda p: p[0]))]
        datas = self._get_many([(owner, span[0][0], max(p[1] for p in span)) for owner, span in spans])
        for (_, span), data in zip(spans, datas):
            lo = span[0][0]
            for start, stop, flat, at in span:
                flat[at:at + stop - start] = np.frombuffer(data, np.uint8, stop - start, start - lo)

    def _spans(self, pieces: list[tuple[int, int, np.ndarray, int]]):
        """Byte pieces (sorted by start) grouped into requests: runs of pieces whose gaps
        are at most ``max_gap_bytes``."""
        group: list = []
        stop = 0
        for p in pieces:
            if group and p[0] - stop > self.max_gap_bytes:
                yield group
                group = []
            stop = max(stop, p[1]) if group else p[1]
            group.append(p)
        if group:
            yield group

    def _get_many(self, ranges: list[tuple[int, int, int]]) -> list[bytes]:
        """``(rank, start, stop)`` byte ranges of rank files: one GET each, issued at once
        where the backend can (``cat_ranges``)."""
        if len(ranges) == 1:
            return [self._get(*ranges[0])]
        paths = [self._path(rank) for rank, _, _ in ranges]
        with _io(f"cannot read {self.where(ranges[0][0])}"):
            datas = self.fs.cat_ranges(paths, [a for _, a, _ in ranges], [b for _, _, b in ranges])
        for (rank, start, stop), data in zip(ranges, datas):
            if isinstance(data, BaseException):
                with _io(f"cannot read {self.where(rank)}"):
                    raise data
            if len(data) != stop - start:
                raise CheckpointError(f"{self.where(rank)} is shorter than its manifest says (bytes {start}-"
                                      f"{stop} gave {len(data)}); the checkpoint is damaged: use an earlier one")
        with self._counter:
            self.fetched += sum(len(d) for d in datas)
            self.requests += len(datas)
        return datas


class ObjectSink(TensorSink):
    """A new checkpoint of ``ptc`` at an fsspec URL (see the module docstring): rank files
    assembled in memory and uploaded when complete, the manifest last.

    Args:
        url: where to write; must not hold a committed checkpoint.
        ptc: the layout; plans write into ``ptc.stored_replicas()`` (each replica once).
        state: JSON-serializable non-tensor state.
        fs: an fsspec filesystem to use instead of the one the URL names (tests).
        upload_workers: rank files uploaded at once.

    Raises:
        FileExistsError: a committed checkpoint is at ``url`` (nothing is touched).
        CheckpointError: the store refused (credentials, a missing bucket).
    """

    zero_filled = True
    records_checksums = True

    def __init__(self, url: str, ptc: PTC, state: Mapping[str, Any] | None = None, fs=None,
                 upload_workers: int = 8, joined: bool = False):
        self.url = url.rstrip("/")
        self.fs, self.root = (fs, self.url.split("://", 1)[-1]) if fs is not None else _filesystem(self.url)
        self.ptc = ptc
        self.state = checked_state(state)
        self._where = redact(self.url)
        self.joined = joined
        if not joined:
            self.begin(self.url, self.fs)
        self._files: dict[int, tuple[bytearray, dict]] = {}
        self._sizes: dict[int, int] = {}
        self._pending: dict[int, set[str]] = {}
        self._crcs: dict[int, dict[str, int]] = {}
        self._uploads: dict[int, Future] = {}
        self._ledger = ChecksumLedger()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(upload_workers, thread_name_prefix="scalai-upload")
        self.committed = False
        self.uploaded = 0   # bytes
        self.timings = {"checksum": 0.0, "sync": 0.0}

    @staticmethod
    def begin(url: str, fs=None) -> str:
        """Check that ``url`` can take a new checkpoint and delete the rank files of a save
        there that left no manifest; returns the URL (the token of a save by several ranks:
        each writes its rank files with ``joined=True`` and :meth:`finish`, one calls
        :meth:`publish`).

        Raises:
            FileExistsError: a committed checkpoint is there.
            CheckpointError: the store refused, or the bucket is missing.
        """
        url = url.rstrip("/")
        fs, root = (fs, url.split("://", 1)[-1]) if fs is not None else _filesystem(url)
        with _io(f"cannot write {redact(url)}"):
            _check_bucket(fs, root, url)
            if fs.exists(f"{root}/{MANIFEST_NAME}"):
                raise FileExistsError(f"{redact(url)} already holds a checkpoint; choose another URL or "
                                      f"delete it first")
            _sweep(fs, root)
        return url

    @staticmethod
    def publish(url: str, manifest: Manifest, fs=None) -> None:
        """Write ``manifest`` at ``url``, once every rank file is uploaded: the commit.

        Raises:
            FileExistsError: another writer committed there meanwhile (nothing replaced).
        """
        fs, root = (fs, url.split("://", 1)[-1]) if fs is not None else _filesystem(url)
        with _io(f"cannot write {redact(url)}/{MANIFEST_NAME}"):
            if fs.exists(f"{root}/{MANIFEST_NAME}"):
                raise FileExistsError(f"{redact(url)} got a checkpoint from another writer meanwhile; "
                                      f"this one is not committed")
            fs.pipe_file(f"{root}/{MANIFEST_NAME}", manifest_bytes(manifest))

    @staticmethod
    def discard(url: str, fs=None) -> None:
        """Delete the rank files at ``url`` of a save that has no manifest (best effort)."""
        try:
            fs, root = (fs, url.split("://", 1)[-1]) if fs is not None else _filesystem(url)
            if not fs.exists(f"{root}/{MANIFEST_NAME}"):
                _sweep(fs, root)
        except Exception:  # noqa: BLE001 - best effort; the next save there sweeps again
            pass

    def stores(self, rank: int, tensor: str) -> bool:
        return self.ptc.replica_owner(tensor, rank) == rank

    def _file(self, rank: int) -> tuple[bytearray, dict]:
        found = self._files.get(rank)
        if found is not None:
            return found
        with self._lock:
            found = self._files.get(rank)
            if found is None:
                if rank in self._uploads:
                    raise ValueError(f"rank {rank}'s file of {self._where} is uploaded already")
                names = [(n, self.ptc.spec(n).dtype, s.shape) for n, s in self.ptc.rank_shards(rank)
                         if self.stores(rank, n)]
                meta = {"format": "pt", "scalai.rank": str(rank), "scalai.layout": str(self.ptc.config)}
                header, entries, size = file_layout(names, meta)
                buf = bytearray(size)
                buf[:len(header)] = header
                found = self._files[rank] = (buf, entries)
                self._sizes[rank] = size
                self._pending[rank] = set(entries)
        return found

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        buf, entries = self._file(rank)
        entry = entries[tensor]
        src = memoryview(data).cast("B")
        if byte_offset < 0 or byte_offset + src.nbytes > entry.nbytes:
            raise ValueError(f"write of {src.nbytes} bytes at {byte_offset} falls outside {tensor} of rank "
                             f"{rank} ({entry.nbytes} bytes)")
        memoryview(buf)[entry.start + byte_offset:entry.start + byte_offset + src.nbytes] = src
        self._ledger.piece((rank, tensor), byte_offset, src.nbytes, crc)

    def declare_checksum(self, rank: int, tensor: str, crc: int) -> None:
        self._ledger.declare((rank, tensor), crc)

    def complete(self, rank: int, tensor: str) -> None:
        """Upload ``rank``'s file once its last tensor is complete."""
        self._file(rank)
        with self._lock:
            pending = self._pending[rank]
            pending.discard(tensor)
            ready = not pending and rank not in self._uploads
            if ready:
                self._uploads[rank] = self._pool.submit(self._upload, rank)

    def _upload(self, rank: int) -> None:
        buf, entries = self._files[rank]
        t0 = time.perf_counter()
        crcs = {}
        for name, e in entries.items():
            known = self._ledger.known((rank, name), e.nbytes)
            crcs[name] = known if known is not None else crc32(memoryview(buf)[e.start:e.start + e.nbytes])
        t1 = time.perf_counter()
        with _io(f"cannot upload {self._where}/{rank_file_name(rank)}"):
            self.fs.pipe_file(f"{self.root}/{rank_file_name(rank)}", bytes(buf))
        with self._lock:
            self._crcs[rank] = crcs
            self.uploaded += len(buf)
            self._files[rank] = (bytearray(), entries)  # the bytes are in the store now
            self.timings["checksum"] += t1 - t0
            self.timings["sync"] += time.perf_counter() - t1

    def finish(self, ranks=None) -> list:
        """Upload the given ranks' files (default: every rank) and wait for them; returns
        their manifest records, in the order given."""
        ranks = list(range(self.ptc.config.world_size) if ranks is None else ranks)
        for rank in ranks:
            self._file(rank)
            with self._lock:
                if rank not in self._uploads:
                    self._uploads[rank] = self._pool.submit(self._upload, rank)
        for rank in ranks:
            self._uploads[rank].result()
        return [rank_record(self.ptc, r, self._sizes[r], self._crcs[r], self.stores) for r in ranks]

    def commit(self) -> None:
        """Upload what is left, wait for every upload, then write the manifest: the
        checkpoint appears complete at once."""
        if self.committed:
            return
        if self.joined:
            raise RuntimeError("this sink joined a save begun elsewhere; call finish() here and "
                               "ObjectSink.publish() where it began")
        records = tuple(self.finish())
        t0 = time.perf_counter()
        self.publish(self.url, Manifest(self.ptc.full, records, self.state, created_by()), self.fs)
        self.timings["sync"] += time.perf_counter() - t0
        self.committed = True
        self._pool.shutdown()

    def close(self) -> None:
        """Stop the upload threads (after :meth:`finish` of a joined sink)."""
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop uploading and delete the rank files uploaded (best effort: a later sink at
        this URL deletes what is left). A joined sink leaves them to :meth:`discard`."""
        if self.committed:
            return
        for future in self._uploads.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._files.clear()
        if not self.joined:
            self.discard(self.url, self.fs)
