"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``az://``, ...): the checkpoint format on
object storage, as one :class:`~scalai.storage.TensorSource` and one
:class:`~scalai.storage.TensorSink` of the plan runner.

The objects are the files of a checkpoint directory, under the URL as a prefix:
``URL/rank-00000.safetensors``, ... and ``URL/manifest.json`` (the same bytes a directory
holds, so a copy either way is a plain object copy).

- :class:`~scalai.checkpoint.object_source.ObjectSource` (its own module) reads them: the
  manifest first, then the rank files in pieces with checks on the way.
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

from ..errors import CheckpointError, ScalaiError
from ..layout.ptc import PTC
from ..storage.base import TensorSink
from . import uploads
from .manifest import MANIFEST_NAME, Manifest, manifest_bytes, rank_file_name
from .safetensors_io import file_layout
from .writer import checked_state, created_by, rank_record

__all__ = ["ObjectSink", "is_object_url", "object_exists", "object_children", "delete_objects",
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
        single_put_bytes: rank files below this size go up whole, in one request, once
            complete (default :data:`~scalai.checkpoint.uploads.SINGLE_PUT_BYTES`; 0: every
            file in parts).

    Memory: the parts being filled (the runner fills this sink in file order, so about one
    per worker; a file below ``single_put_bytes`` is one part) and those waiting or being
    uploaded, at most ``3 x upload_workers``; the high-water mark of both is
    ``peak_buffered`` (bytes).

    Raises:
        FileExistsError: a committed checkpoint is at ``url`` (nothing is touched).
        CheckpointError: the store refused (credentials, a missing bucket).
        ValueError: ``part_bytes`` below 1.
    """

    zero_filled = True
    records_checksums = False  # it computes each tensor's CRC-32 from the parts it sends
    in_order = True

    def __init__(self, url: str, ptc: PTC, state: Mapping[str, Any] | None = None, fs=None,
                 upload_workers: int = 8, joined: bool = False, part_bytes: int | None = None,
                 single_put_bytes: int | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = (fs, self.url.split("://", 1)[-1]) if fs is not None else _filesystem(self.url)
        self.ptc = ptc
        self.state = checked_state(state)
        self._where = redact(self.url)
        self.part_bytes = uploads.PART_BYTES if part_bytes is None else int(part_bytes)
        self.single_bytes = uploads.SINGLE_PUT_BYTES if single_put_bytes is None else int(single_put_bytes)
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
                                      self._buffer, self.single_bytes)
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
