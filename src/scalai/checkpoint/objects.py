"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``az://``, ...): the checkpoint format on
object storage, as one :class:`~scalai.storage.TensorSource` and one
:class:`~scalai.storage.TensorSink` of the plan runner.

The objects are the files of a checkpoint directory, under the URL as a prefix:
``URL/rank-00000.safetensors``, ... and ``URL/manifest.json`` (the same bytes a directory
holds, so a copy either way is a plain object copy).

- :class:`ObjectSource` reads the manifest and, per rank file on first use, its safetensors
  header (one ranged GET). Plans read it in pieces (``streams``, :mod:`scalai.storage.pieces`):
  every window a plan reads from one rank file is handed over at once; byte runs closer
  than ``max_gap_bytes`` share a GET whose body is streamed into the windows in chunks, so a
  file the plan needs most of costs a few large GETs and one it needs little of costs
  ranged GETs of exactly its windows. Every stored tensor whose bytes all pass is checked
  against its CRC-32 on the way. Single reads (``read_into``/``read_many``, for inspection)
  fetch a window's runs in as few ranged GETs as ``max_gap_bytes`` allows.
- :class:`ObjectSink` streams each rank file out in parts as it fills
  (:mod:`scalai.checkpoint.uploads`: an S3 multipart upload, parts in any order; in order
  on other backends); memory is the parts being filled or uploaded, not the file. The
  commit is the manifest, written last, once every rank file is uploaded: object stores
  have no rename, so a save that is interrupted leaves rank files but no manifest, and
  readers (which open the manifest first) do not see it; the previous version at another
  URL stands. :meth:`ObjectSink.abort` deletes what it uploaded and aborts its multipart
  uploads (best effort); a later sink at the same URL deletes the rank files (and aborts
  the multipart uploads) of a save that has no manifest before it writes (never two saves
  to one URL at once: object stores cannot tell a running save from a dead one).

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

from ..dtypes import itemsize
from ..errors import CheckpointError, ScalaiError
from ..layout.ptc import PTC
from ..planner.plan import Window
from ..regions import flat_runs
from ..storage.base import RangeSource, TensorSink
from ..storage.pieces import CrcCheck, Piece, PieceFeed, plan_pieces, window_runs
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, manifest_bytes, parse_manifest, rank_file_name
from . import uploads
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


def _is_rank_file(name: str) -> bool:
    return re.fullmatch(r"rank-\d{5}\.safetensors", name) is not None


def _sweep(fs, root: str) -> None:
    """Delete the rank files under ``root`` (a save that left no manifest), and abort the
    multipart uploads of rank files it left unfinished (S3)."""
    stale = [n for n in _children(fs, root) if _is_rank_file(n.rstrip("/").rsplit("/", 1)[-1])]
    if stale:
        fs.rm(stale)
    uploads.abort_stale(fs, root, _is_rank_file)


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

    Plans read it in pieces (``streams``): every window a plan reads from one rank file is
    handed over at once, their byte runs closer than ``max_gap_bytes`` share one GET (the
    bytes between are read and dropped), a GET covers at most about ``piece_bytes``, and
    its body is read in chunks of ``chunk_bytes`` as it arrives (S3 through s3fs; other
    backends: one ranged GET per chunk), each chunk copied into the windows it holds. So a
    file a plan needs most of costs a few large GETs, and one it needs little of costs
    ranged GETs of exactly its windows (with ``max_gap_bytes=0``: exactly the windows'
    bytes). Every stored tensor whose bytes all pass is checked against its CRC-32 on the
    way; files given to :meth:`read_whole` are read whole for that.

    Args:
        url: the checkpoint's URL (the prefix of its objects).
        fs: an fsspec filesystem to use instead of the one the URL names (tests).
        max_gap_bytes: runs closer than this are fetched in one GET, and a file a plan
            needs ``whole_fraction`` of is read whole; 0 reads exactly the windows' bytes
            (but of files this reader checks).

    Raises:
        CheckpointError: no manifest (nothing committed there), an invalid one, or the
            store refused (credentials, a missing bucket).
    """

    block_bytes = 8 << 20
    concurrency = 16
    coalesce = True
    streams = True
    #: A GET of a piece is closed at the first window end past this many bytes.
    piece_bytes = 128 << 20
    #: A file a plan needs at least this fraction of is read whole (a few large GETs).
    whole_fraction = 0.5
    #: Bytes of a GET's body handled at once (two per GET in memory: one arriving, one copied).
    chunk_bytes = 4 << 20

    def __init__(self, url: str, fs=None, max_gap_bytes: int = 2 << 20):
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
        self._whole: set[int] = set()
        self._predict = False
        self._headers: dict[int, bytes] = {}  # predicted header bytes still to compare, by file
        self.crcs = CrcCheck(self._expected, lambda key: self.where(key[0]))

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
        against the manifest; or, after ``read_whole(..., others_checked=True)``, the layout
        scalai's writers give the manifest's tensors, whose header bytes the file's checker
        compares as they pass)."""
        found = self._entries.get(rank)
        if found is not None:
            return found
        record = self.manifest.ranks[rank]
        where = self.where(rank)
        if self._predict:  # the layout scalai's writers give these tensors; checked by the file's checker
            names = [(n, t.dtype, t.shape) for n, t in record.tensors.items() if t.stored_in is None]
            meta = {"format": "pt", "scalai.rank": str(rank), "scalai.layout": str(self.ptc.config)}
            header, entries, size = file_layout(names, meta)
            if size == record.nbytes:
                with self._lock:
                    if rank in self._whole:
                        self._headers[rank] = header
                    self._entries[rank] = entries
                return entries

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


    # -- pieces: a plan's windows of one file read in a few streamed GETs, CRCs checked --------
    def _expected(self, key: tuple[int, str]) -> tuple[int | None, int]:
        rank, tensor = key
        return self.manifest.ranks[rank].tensors[tensor].checksum, self.entries(rank)[tensor].nbytes

    def read_whole(self, ranks, others_checked: bool = False) -> None:
        """Read the files of these ranks whole whenever a plan reads from them (and so check
        every tensor in them): what a reader assigned to check them does. ``others_checked``:
        every other file is checked by another reader, headers included (a load with
        verify), so no header is fetched apart: a file's layout is the one scalai's writers
        give the manifest's tensors, and the checker of a file compares its header bytes
        with that layout's as they pass."""
        self._whole.update(ranks)
        self._predict = self._predict or others_checked

    def pieces(self, reads) -> list[Piece]:
        """The GETs that fetch ``reads`` (``(rank, tensor, window)``: the windows a plan
        reads), by file; ``Piece.reads`` index ``reads``. A file the plan needs at least
        ``whole_fraction`` of, or one this reader checks (:meth:`read_whole`), is read whole."""
        by_file: dict[int, list[int]] = {}
        runs: list[list[tuple[int, int]]] = []
        for i, (rank, tensor, window) in enumerate(reads):
            owner = self.stored_in(rank, tensor)
            entry = self.entries(owner)[tensor]
            runs.append(window_runs(entry.start, entry.shape, itemsize(entry.dtype), window))
            by_file.setdefault(owner, []).append(i)
        out = []
        for owner, indices in by_file.items():
            lo, hi = self._data_range(owner)
            needed = sum(b - a for i in indices for a, b in runs[i])
            whole = owner in self._whole or (self.max_gap_bytes > 0 and needed >= self.whole_fraction * (hi - lo))
            cover = [(lo, hi)] if whole else []
            for p in plan_pieces([runs[i] for i in indices], cover, self.max_gap_bytes, self.piece_bytes):
                out.append(Piece(p.start, p.stop, tuple(indices[j] for j in p.reads),
                                 tuple((a, b, indices[j], at) for a, b, j, at in p.runs), owner, p.spans))
        return out

    def _data_range(self, rank: int) -> tuple[int, int]:
        """The bytes a whole read covers: the tensors, and the header if it is to be compared."""
        entries = self.entries(rank).values()
        start = 0 if rank in self._headers else min((e.start for e in entries), default=0)
        return (start, self.manifest.ranks[rank].nbytes)

    def read_piece(self, piece: Piece, out, done) -> None:
        """Fetch ``piece`` (a GET per span, its body streamed) into the outputs of its
        windows: ``out(i)`` gives read ``i``'s bytes (uint8, called at its first byte),
        ``done(i)`` says they are all there. In a file this reader checks (:meth:`read_whole`,
        or :meth:`check`: ``out`` None), tensors whose bytes all passed are checked.

        Raises:
            ChecksumError: a tensor that passed whole differs from its record.
            CheckpointError: the object is shorter than its manifest says, or the store failed.
        """
        tensors = [((piece.file, n), e.start, e.nbytes) for n, e in sorted(
            self.entries(piece.file).items(), key=lambda kv: kv[1].start)]
        checking = out is None or piece.file in self._whole  # a file another reader checks: no CRC here
        feed = PieceFeed(piece, tensors, out, done, self.crcs if checking else None)
        header = self._headers.get(piece.file) if piece.spans and piece.spans[0][0] == 0 else None
        for a, b in piece.spans:
            feed.seek(a)
            take = feed.feed if header is None or a else self._header_check(piece.file, header, feed.feed)
            self._stream(piece.file, a, b, take)
        feed.finish()

    def _header_check(self, rank: int, header: bytes, feed):
        """``feed``, after comparing the first bytes with the predicted ``header``."""
        seen = bytearray()

        def take(chunk) -> None:
            if len(seen) < len(header):
                seen.extend(memoryview(chunk)[:len(header) - len(seen)])
                if len(seen) == len(header) or len(seen) < len(header) and len(chunk) == 0:
                    if bytes(seen) != header:
                        raise CheckpointError(f"{self.where(rank)} is not laid out as its manifest says (its "
                                              f"header differs); the object was replaced: use an earlier "
                                              f"checkpoint")
                    self._headers.pop(rank, None)
            feed(chunk)
        return take

    def check(self, rank: int) -> None:
        """Check every tensor of ``rank``'s file not checked yet (streams what is left).

        Raises:
            ChecksumError: naming the first tensor (file order) whose bytes differ from the record.
        """
        left = [(e.start, e.start + e.nbytes) for n, e in sorted(self.entries(rank).items(),
                                                                  key=lambda kv: kv[1].start)
                if (rank, n) not in self.crcs.checked and e.nbytes
                and self.manifest.ranks[rank].tensors[n].checksum is not None]
        if rank in self._headers:
            left.insert(0, (0, len(self._headers[rank])))
        pieces = [Piece(p.start, p.stop, (), (), rank, p.spans)
                  for p in plan_pieces([], left, self.max_gap_bytes, self.piece_bytes)]
        if len(pieces) > 1:  # a large file: its pieces at once, as a plan's would be
            with ThreadPoolExecutor(min(self.concurrency, len(pieces))) as pool:
                list(pool.map(lambda p: self.read_piece(p, None, None), pieces))
        elif pieces:
            self.read_piece(pieces[0], None, None)
        for n, e in self.entries(rank).items():  # empty tensors pass no byte
            if not e.nbytes:
                self.crcs.add((rank, n), 0, 0, 0)

    def _stream(self, rank: int, start: int, stop: int, feed) -> None:
        """Bytes ``[start, stop)`` of ``rank``'s file handed to ``feed`` in order, in chunks
        of at most ``chunk_bytes``: one streamed GET on S3 (s3fs), a ranged GET per chunk
        elsewhere."""
        if stop <= start:
            return
        if not uploads.is_s3(self.fs):
            for a in range(start, stop, self.chunk_bytes):
                feed(self._get(rank, a, min(a + self.chunk_bytes, stop)))
            return
        with _io(f"cannot read {self.where(rank)}"):
            got = _s3_stream(self.fs, self._path(rank), start, stop, self.chunk_bytes, feed)
        if got != stop - start:
            raise CheckpointError(f"{self.where(rank)} is shorter than its manifest says (bytes {start}-{stop} "
                                  f"gave {got}); the checkpoint is damaged: use an earlier one")
        with self._counter:
            self.fetched += got
            self.requests += 1


def _s3_stream(fs, path: str, start: int, stop: int, chunk: int, feed) -> int:
    """One GET of bytes ``[start, stop)`` through s3fs, its body handed to ``feed`` in
    chunks of ``chunk`` bytes as it arrives (the next chunk is received while ``feed``
    runs); returns the bytes received."""
    import asyncio

    from fsspec.asyn import sync

    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}

    async def open_body():
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}", **extra)
        return resp["Body"]

    async def next_chunk(n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = await body.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    body = sync(fs.loop, open_body)
    total = 0
    try:
        pending = asyncio.run_coroutine_threadsafe(next_chunk(min(chunk, stop - start)), fs.loop)
        while True:
            data = pending.result()
            total += len(data)
            if not data or total >= stop - start:
                pending = None
            else:
                pending = asyncio.run_coroutine_threadsafe(next_chunk(min(chunk, stop - start - total)), fs.loop)
            if data:
                feed(data)
            if pending is None:
                return total
    finally:
        if pending is not None:
            pending.cancel()
        body.close()


class ObjectSink(TensorSink):
    """A new checkpoint of ``ptc`` at an fsspec URL (see the module docstring): each rank
    file streamed out in parts as it fills, the manifest last.

    Args:
        url: where to write; must not hold a committed checkpoint.
        ptc: the layout; plans write into ``ptc.stored_replicas()`` (each replica once).
        state: JSON-serializable non-tensor state.
        fs: an fsspec filesystem to use instead of the one the URL names (tests).
        upload_workers: parts uploaded at once (S3); twice as many may wait, full, for a
            turn before writers wait.
        part_bytes: bytes per part (S3 needs at least 5 MiB but for a file's last part;
            default :data:`~scalai.checkpoint.uploads.PART_BYTES`).

    Memory: the parts being filled (the runner fills this sink in file order, so about one
    per worker) and those waiting or being uploaded, at most ``3 x upload_workers``; the
    high-water mark of both is ``peak_buffered`` (bytes).

    Raises:
        FileExistsError: a committed checkpoint is at ``url`` (nothing is touched).
        CheckpointError: the store refused (credentials, a missing bucket).
        ValueError: ``part_bytes`` below 1.
    """

    zero_filled = True
    records_checksums = False  # it computes each tensor's CRC-32 from the parts it sends
    in_order = True

    def __init__(self, url: str, ptc: PTC, state: Mapping[str, Any] | None = None, fs=None,
                 upload_workers: int = 8, joined: bool = False, part_bytes: int | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = (fs, self.url.split("://", 1)[-1]) if fs is not None else _filesystem(self.url)
        self.ptc = ptc
        self.state = checked_state(state)
        self._where = redact(self.url)
        self.part_bytes = uploads.PART_BYTES if part_bytes is None else int(part_bytes)
        if self.part_bytes < 1:
            raise ValueError(f"part_bytes={part_bytes} must be at least 1 (S3 wants at least "
                             f"{uploads.MIN_PART_BYTES} but for the last part)")
        self.joined = joined
        if not joined:
            self.begin(self.url, self.fs)
        self._files: dict[int, uploads.RankUpload] = {}
        self._sizes: dict[int, int] = {}
        self._crcs: dict[int, dict[str, int]] = {}
        self._finished: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(upload_workers, thread_name_prefix="scalai-upload")
        self._slots = threading.BoundedSemaphore(3 * upload_workers)
        self.committed = False
        self.uploaded = 0   # bytes
        self.buffered = self.peak_buffered = 0
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

    def _buffer(self, delta: int) -> None:
        with self._lock:
            self.buffered += delta
            self.peak_buffered = max(self.peak_buffered, self.buffered)

    def _submit(self, fn, *args) -> Future:
        """Run an upload on the pool; waits while ``3 x upload_workers`` are queued or running
        (uploads end on their own, so a writer waiting here never blocks them)."""
        self._slots.acquire()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _file(self, rank: int) -> uploads.RankUpload:
        found = self._files.get(rank)
        if found is not None:
            return found
        with self._lock:
            found = self._files.get(rank)
            if found is None:
                if rank in self._finished:
                    raise ValueError(f"rank {rank}'s file of {self._where} is uploaded already")
                names = [(n, self.ptc.spec(n).dtype, s.shape) for n, s in self.ptc.rank_shards(rank)
                         if self.stores(rank, n)]
                meta = {"format": "pt", "scalai.rank": str(rank), "scalai.layout": str(self.ptc.config)}
                header, entries, size = file_layout(names, meta)
                self._sizes[rank] = size
                found = None
        if found is None:
            made = uploads.RankUpload(self.fs, f"{self.root}/{rank_file_name(rank)}", header, entries, size,
                                      self.part_bytes, self._submit, f"{self._where}/{rank_file_name(rank)}",
                                      self._buffer)
            with self._lock:
                found = self._files.setdefault(rank, made)
        return found

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        upload = self._file(rank)
        entry = upload.entries[tensor]
        src = memoryview(data).cast("B")
        if byte_offset < 0 or byte_offset + src.nbytes > entry.nbytes:
            raise ValueError(f"write of {src.nbytes} bytes at {byte_offset} falls outside {tensor} of rank "
                             f"{rank} ({entry.nbytes} bytes)")
        with _io(f"cannot upload {self._where}/{rank_file_name(rank)}"):
            upload.write(entry.start + byte_offset, src)

    def complete(self, rank: int, tensor: str) -> None:
        """Parts of ``rank``'s file that ``tensor`` completes go out."""
        with _io(f"cannot upload {self._where}/{rank_file_name(rank)}"):
            self._file(rank).complete(tensor)

    def finish(self, ranks=None) -> list:
        """Upload what is left of the given ranks' files (default: every rank) and wait for
        them; returns their manifest records, in the order given."""
        ranks = list(range(self.ptc.config.world_size) if ranks is None else ranks)
        for rank in ranks:
            if rank in self._finished:
                continue
            t0 = time.perf_counter()
            with _io(f"cannot upload {self._where}/{rank_file_name(rank)}"):
                self._crcs[rank] = self._file(rank).finish()
            with self._lock:
                self._finished.add(rank)
                self.uploaded += self._sizes[rank]
                self.timings["sync"] += time.perf_counter() - t0
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
        for upload in list(self._files.values()):
            upload.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._files.clear()
        if not self.joined:
            self.discard(self.url, self.fs)
