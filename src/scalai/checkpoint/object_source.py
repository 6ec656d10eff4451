"""Reading a checkpoint at an fsspec URL (``s3://``, ``gs://``, ...): :class:`ObjectSource`,
the plan runner's :class:`~scalai.storage.StreamingSource` of object storage (the format, the
URLs and the credentials: :mod:`scalai.checkpoint.objects`, which writes them).

It reads the manifest and, per rank file on first use, its safetensors header (one ranged
GET). Plans read it in pieces (:mod:`scalai.storage.pieces`): every window a
plan reads from one rank file is handed over at once; byte runs closer than
``max_gap_bytes`` share a GET whose body is streamed into the windows in chunks, so a file
the plan needs most of costs a few large GETs and one it needs little of costs ranged GETs
of exactly its windows. Every stored tensor whose bytes all pass is checked against its
CRC-32 on the way. Single reads (``read_into``/``read_many``, for inspection) fetch a
window's runs in as few ranged GETs as ``max_gap_bytes`` allows.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..dtypes import itemsize
from ..errors import CheckpointError
from ..layout.ptc import PTC
from ..planner.plan import Window
from ..regions import flat_runs
from ..storage.base import StreamingSource
from ..storage.pieces import CrcCheck, Piece, PieceFeed, plan_pieces, window_runs
from . import uploads
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from .objects import _HEADER_PROBE, _check_bucket, _filesystem, _io, redact
from .safetensors_io import file_layout, header_length, parse_header

__all__ = ["ObjectSource"]


class ObjectSource(StreamingSource):
    """The committed checkpoint at an fsspec URL, read with ranged GETs.

    Plans read it in pieces: every window a plan reads from one rank file is
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
