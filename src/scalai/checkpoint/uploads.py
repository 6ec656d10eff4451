"""One rank file uploaded to an object store in fixed-size parts, with bounded memory.

A file smaller than ``single_bytes`` (:data:`SINGLE_PUT_BYTES` by default: what s3fs's own
``pipe_file`` does) is one part: held whole, one plain upload once complete. A larger file
(its safetensors header, then its tensors) is cut into parts of ``part_bytes`` (more where
the file would need more than :data:`MAX_PARTS`). A part's buffer is allocated
(zeros: padding nobody writes stays zero) at its first write and handed to the upload as
soon as it is full, or as soon as every tensor it overlaps is complete (padding never gets
written); so only parts still being filled, and parts being uploaded, are in memory, never
the whole file. The CRC-32 of each tensor is computed from the parts as they go out.

Backends (:func:`_backend`): on S3 (s3fs) a multipart upload whose parts go out in any
order (part numbers fix the order), several at once on the sink's upload pool; elsewhere
(any fsspec filesystem) the parts are written in order to a file opened for writing
(a part that is ready before the ones ahead of it waits for them); a file of one part is
one plain upload. Nothing is visible at the URL until :meth:`RankUpload.finish`; an abort
removes the multipart upload (S3) or drops the open file.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Mapping

from ..errors import CheckpointError
from ..storage.checksum import ChecksumLedger, crc32

__all__ = ["RankUpload", "PART_BYTES", "SINGLE_PUT_BYTES", "MIN_PART_BYTES", "MAX_PARTS", "part_size", "is_s3",
           "abort_stale"]

#: Default part size (what AWS's own transfer manager uses).
PART_BYTES = 8 << 20
#: Files below this size go up in one request (s3fs's ``pipe_file`` rule: below twice its
#: 50 MiB chunk). A multipart upload costs the store more per byte (on moto, a 73 MiB file
#: took 0.47 s in one PUT and 0.72 s in 8 MiB parts).
SINGLE_PUT_BYTES = 100 << 20
#: S3's smallest part (except the last).
MIN_PART_BYTES = 5 << 20
#: S3's most parts per upload.
MAX_PARTS = 10_000


def part_size(size: int, part_bytes: int, single_bytes: int = 0) -> int:
    """Bytes per part of a ``size``-byte file: all of it below ``single_bytes``, else
    ``part_bytes``, or more where the file would need more than :data:`MAX_PARTS` parts."""
    if size < single_bytes:
        return max(size, 1)
    return max(part_bytes, -(-size // MAX_PARTS), 1)


class RankUpload:
    """A rank file being uploaded part by part (see the module docstring).

    Args:
        fs, path: where (an fsspec filesystem and the object's path).
        header: the file's first bytes (its safetensors header).
        entries: tensor name -> entry with ``start`` and ``nbytes`` (file offsets).
        size: the file's bytes.
        part_bytes, single_bytes: bytes per part, and the size below which the file is one
            part (see :func:`part_size`).
        submit: runs an upload on the sink's pool (blocking while too many are in flight).
        where: the object's name for messages (credentials masked).
        on_buffer: called with the change in bytes held (part buffers and uploads in flight).
    """

    def __init__(self, fs, path: str, header: bytes, entries: Mapping, size: int, part_bytes: int,
                 submit: Callable[..., Future], where: str, on_buffer: Callable[[int], None], single_bytes: int = 0):
        self.size, self.where, self.entries = size, where, entries
        self.part = part_size(size, part_bytes, single_bytes)
        self.count = max(1, -(-size // self.part))
        self._on_buffer = on_buffer
        self._bufs: dict[int, bytearray] = {}
        self._filled = [0] * self.count
        self._pending = [0] * self.count
        self._sent: set[int] = set()
        self._tensors = sorted(((e.start, e.nbytes, n) for n, e in entries.items() if e.nbytes),
                               key=lambda t: t[0])
        self._spans = {}
        for start, nbytes, name in self._tensors:
            first, last = start // self.part, (start + nbytes - 1) // self.part
            self._spans[name] = (first, last)
            for p in range(first, last + 1):
                self._pending[p] += 1
        self._crcs = ChecksumLedger()
        self._lock = threading.Lock()
        self._backend = _backend(fs, path, self.count, submit, where, self._released)
        self.write(0, memoryview(header))
        for p in range(self.count):  # parts no tensor touches (only header, or nothing)
            self._ready_if_done(p)

    def _len(self, p: int) -> int:
        return min(self.part, self.size - p * self.part)

    def _released(self, nbytes: int) -> None:
        self._on_buffer(-nbytes)

    def write(self, offset: int, src: memoryview) -> None:
        """Copy ``src`` (bytes) to file byte ``offset``; a part that becomes full goes out."""
        pos, end = offset, offset + src.nbytes
        while pos < end:
            p = pos // self.part
            lo = p * self.part
            n = min(end, lo + self._len(p)) - pos
            with self._lock:
                if p in self._sent:
                    raise ValueError(f"write into part {p + 1} of {self.where}, which is uploaded already")
                buf = self._bufs.get(p)
                if buf is None:
                    buf = self._bufs[p] = bytearray(self._len(p))
                    self._on_buffer(len(buf))
            buf[pos - lo:pos - lo + n] = src[pos - offset:pos - offset + n]
            with self._lock:
                self._filled[p] += n
                full = self._filled[p] >= self._len(p)
            if full:
                self._send(p)
            pos += n

    def complete(self, tensor: str) -> None:
        """Every write into ``tensor`` is done: parts it overlaps may go out."""
        span = self._spans.get(tensor)
        if span is None:
            return
        for p in range(span[0], span[1] + 1):
            with self._lock:
                self._pending[p] -= 1
            self._ready_if_done(p)

    def _ready_if_done(self, p: int) -> None:
        with self._lock:
            ready = self._pending[p] <= 0 and p not in self._sent
        if ready:
            self._send(p)

    def _send(self, p: int) -> None:
        """Part ``p`` is final: its tensors' CRC pieces, then the backend takes it."""
        with self._lock:
            if p in self._sent:
                return
            self._sent.add(p)
            buf = self._bufs.pop(p, None)
        if buf is None:  # nobody wrote into it: zeros (padding)
            buf = bytearray(self._len(p))
            self._on_buffer(len(buf))
        lo, hi = p * self.part, p * self.part + len(buf)
        view = memoryview(buf)
        for start, nbytes, name in self._tensors:
            if start >= hi:
                break
            a, b = max(start, lo), min(start + nbytes, hi)
            if a < b:
                self._crcs.piece(name, a - start, b - a, crc32(view[a - lo:b - lo]))
        self._backend.put(p, buf)

    def finish(self) -> dict[str, int]:
        """Send what is left (parts of tensors never completed), wait for every part, make
        the object visible; returns each tensor's CRC-32."""
        for p in range(self.count):
            self._send(p)
        self._backend.complete()
        return {name: self._crcs.known(name, e.nbytes) for name, e in self.entries.items()}

    def abort(self) -> None:
        """Drop what is buffered and stop the upload (best effort)."""
        with self._lock:
            held = sum(len(b) for b in self._bufs.values())
            self._bufs.clear()
            self._sent.update(range(self.count))
        self._on_buffer(-held)
        self._backend.abort()


def is_s3(fs) -> bool:
    """Whether ``fs`` is s3fs (multipart uploads, streamed GET bodies)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not {"s3", "s3a"} & set(protocols):
        return False
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    return isinstance(fs, S3FileSystem)


def abort_stale(fs, root: str, name: Callable[[str], bool]) -> int:
    """Abort the multipart uploads left under ``root`` (S3 only) whose object name passes
    ``name`` (a save killed mid-upload leaves them, invisible but stored); returns how many."""
    if not is_s3(fs):
        return 0
    from fsspec.asyn import sync

    bucket, prefix, _ = fs.split_path(root)
    prefix = prefix.rstrip("/") + "/"
    found, kw = 0, {}
    while True:
        resp = sync(fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **kw)
        for upload in resp.get("Uploads", []):
            key = upload["Key"]
            if "/" not in key[len(prefix):] and name(key.rsplit("/", 1)[-1]):
                sync(fs.loop, fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=key,
                     UploadId=upload["UploadId"])
                found += 1
        if not resp.get("IsTruncated"):
            return found
        kw = {"KeyMarker": resp["NextKeyMarker"], "UploadIdMarker": resp["NextUploadIdMarker"]}


def _backend(fs, path: str, count: int, submit, where: str, released: Callable[[int], None]):
    if count == 1:
        return _Single(fs, path, where, released)
    if is_s3(fs):
        return _Multipart(fs, path, count, submit, where, released)
    return _Sequential(fs, path, count, where, released)


class _Single:
    """A one-part file: one plain upload at the end."""

    def __init__(self, fs, path, where, released):
        self.fs, self.path, self.where, self.released = fs, path, where, released
        self.data: bytearray | None = None

    def put(self, p: int, buf: bytearray) -> None:
        self.data = buf

    def complete(self) -> None:
        data, self.data = self.data, None
        self.fs.pipe_file(self.path, bytes(data))
        self.released(len(data))

    def abort(self) -> None:
        if self.data is not None:
            self.released(len(self.data))
            self.data = None


class _Sequential:
    """Parts written in order into ``fs.open(path, "wb")`` (any fsspec filesystem)."""

    def __init__(self, fs, path, count, where, released):
        self.fs, self.path, self.count, self.where, self.released = fs, path, count, where, released
        self.waiting: dict[int, bytearray] = {}
        self.next = 0
        self.file = None
        self.lock = threading.Lock()

    def put(self, p: int, buf: bytearray) -> None:
        with self.lock:
            self.waiting[p] = buf
            while self.next in self.waiting:
                part = self.waiting.pop(self.next)
                if self.file is None:
                    self.file = self.fs.open(self.path, "wb")
                self.file.write(part)
                self.next += 1
                self.released(len(part))

    def complete(self) -> None:
        with self.lock:
            if self.next != self.count:
                raise CheckpointError(f"{self.where}: parts {self.next + 1}.. of {self.count} never came")
            self.file.close()
            self.file = None

    def abort(self) -> None:
        with self.lock:
            self.released(sum(len(b) for b in self.waiting.values()))
            self.waiting.clear()
            f, self.file = self.file, None
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()


class _Multipart:
    """An S3 multipart upload through s3fs: parts uploaded in any order, on the sink's pool."""

    def __init__(self, fs, path, count, submit, where, released):
        self.fs, self.count, self.submit, self.where, self.released = fs, count, submit, where, released
        self.bucket, self.key, _ = fs.split_path(path)
        self.upload_id: str | None = None
        self.futures: list[Future] = []
        self.etags: dict[int, str] = {}
        self.lock = threading.Lock()

    def _call(self, op: str, **kw):
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, op, Bucket=self.bucket, Key=self.key, **kw)

    def put(self, p: int, buf: bytearray) -> None:
        with self.lock:
            if self.upload_id is None:
                self.upload_id = self._call("create_multipart_upload")["UploadId"]
        future = self.submit(self._upload, p, buf)  # may wait for a slot: not under the lock
        with self.lock:
            self.futures.append(future)

    def _upload(self, p: int, buf: bytearray) -> None:
        try:
            data = bytes(buf)
            n = len(buf)
            del buf
            resp = self._call("upload_part", UploadId=self.upload_id, PartNumber=p + 1, Body=data)
            with self.lock:
                self.etags[p] = resp["ETag"]
        finally:
            self.released(n)

    def complete(self) -> None:
        for f in list(self.futures):
            f.result()
        parts = [{"PartNumber": p + 1, "ETag": self.etags[p]} for p in sorted(self.etags)]
        if len(parts) != self.count:
            raise CheckpointError(f"{self.where}: {len(parts)} of {self.count} parts uploaded")
        self._call("complete_multipart_upload", UploadId=self.upload_id, MultipartUpload={"Parts": parts})

    def abort(self) -> None:
        for f in self.futures:
            f.cancel()
        for f in self.futures:
            if not f.cancelled():
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - aborting anyway
                    pass
        if self.upload_id is not None:
            try:
                self._call("abort_multipart_upload", UploadId=self.upload_id)
            except Exception:  # noqa: BLE001 - best effort; S3 lifecycle rules remove the rest
                pass
