"""Saves into the store of this machine without HTTP: write the tensor file, have it adopted.

A rank and its host's store run on the same machine (the agent starts both), and the
store keeps its files in memory (``/dev/shm``). Streaming a tensor to it over loopback
HTTP copies every byte through two sockets and the store's event loop; instead the
client writes the store's own file format (:func:`~.files.write_tensor_file`: 512-byte
header, raw bytes, CRC-32 computed block by block, several tensors on parallel threads:
zlib releases the GIL) into a private file of the store's upload directory and asks the
store, in one small authenticated request, to adopt it (``POST .../adopt``): the store
checks it as it checks an HTTP upload (owner, fence, uncommitted version, under its lock)
plus that it is a private regular file of the declared dtype and shape, and renames it
into the version. A refused adoption deletes the file.

**Same machine, proven, never assumed.** ``GET /v1/local`` (with the token) names the
store's upload directory and a random key the store wrote beside it (in its root) at
start-up. A client
uses the fast path only when it reads that very key at that path: same machine and same
mount namespace (or a filesystem the two really share). Anywhere else (another machine,
a container or mount namespace of its own, a store too old to answer) it uploads over
HTTP, silently. ``SCALAI_STORE_LOCAL=0`` turns the fast path off (e.g. to measure
against it).

**What a kill leaves.** A client killed before the adoption leaves a ``local-...`` file in
the upload directory; the store deletes such files once nobody wrote them for its lease
(``--lease``, at least ``--idle-timeout``), and empties the directory when it starts.
The memory limit (``--memory-limit``) is checked at the adoption: a file that does not
fit is refused (507) and the client sends it over HTTP (which spills it to disk, when the
store has a spill directory).

**Background saves** (:meth:`StoreWriter.stage_rank`) write the files without their
CRC-32 while the training step waits (one copy of the shards, into the store's memory,
instead of a staging copy in the worker plus the upload), and a thread computes each
CRC-32 from the file, records it in the header and has the file adopted.
"""

from __future__ import annotations

import os
import threading

from .files import TensorMeta

__all__ = ["LOCAL_ENV", "LOCAL_KEY_HEADER", "local_enabled", "discover", "StagedRank", "unlink_quietly"]

#: Set to ``0`` to upload over HTTP even where the store's upload directory is visible.
LOCAL_ENV = "SCALAI_STORE_LOCAL"
#: Header with which a client shows the key it read from the store's key file, to be given
#: the paths of a rank's files to map (``GET .../files``) from an address not loopback.
LOCAL_KEY_HEADER = "X-Scalai-Local-Key"


def local_enabled() -> bool:
    """Whether the environment allows the fast path (``SCALAI_STORE_LOCAL`` is not ``0``)."""
    return os.environ.get(LOCAL_ENV, "1").strip() not in ("0", "false", "no", "off")


def discover(info: dict) -> str | None:
    """The store's upload directory if this process sees it (reads the key the store's
    ``/v1/local`` answer ``info`` names, at that path, with the same value, and may write
    there), else None."""
    try:
        uploads, key, path = str(info["uploads"]), str(info["key"]), str(info["key_file"])
        if not os.path.isabs(uploads) or os.path.dirname(path) != os.path.dirname(uploads):
            return None  # the key must sit beside the upload directory, in the store's root
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            seen = os.read(fd, 256).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if not key or seen != key or not os.access(uploads, os.W_OK | os.X_OK):
        return None
    return uploads


class StagedRank:
    """A rank's tensors written into its store's upload directory, CRC-32 not yet recorded:
    ``{tensor: (path, meta)}`` (a background save's staging copy). :meth:`clear` deletes
    the files not adopted (yet); adopted ones are popped by their writer."""

    def __init__(self, files: dict[str, tuple[str, TensorMeta]] | None = None):
        self.files = dict(files or {})
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(meta.nbytes for _, meta in self.files.values())

    def add(self, name: str, path: str, meta: TensorMeta) -> None:
        with self._lock:
            self.files[name] = (path, meta)

    def take(self, name: str) -> tuple[str, TensorMeta]:
        """The staged file of ``name``; from now on its writer deletes it if not adopted."""
        with self._lock:
            return self.files.pop(name)

    def clear(self) -> None:
        with self._lock:
            files, self.files = self.files, {}
        for path, _ in files.values():
            unlink_quietly(path)


def unlink_quietly(path: str) -> None:
    """Delete ``path`` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
