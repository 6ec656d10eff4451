"""What a store holds: jobs, versions, tensor files, their sizes; commit and delete.

Directory layout under each root (the memory root, and the optional spill root)::

    <root>/.scalai-store                               marks a directory the store owns
    <root>/jobs/<job>/<version>/manifest.json          present = committed (memory root only)
    <root>/jobs/<job>/<version>/r00003/<tensor>        one file per stored tensor (files.py)

A root must be new, empty or already marked: the store deletes leftovers under
``jobs/`` at start-up and must never do that in a directory it does not own.

A new tensor file goes to the memory root unless that would pass ``memory_limit`` bytes,
then to the spill root (a disk directory), else the write is refused (HTTP 507). The
index lives in memory, rebuilt from the headers at start-up. Committed versions are
immutable; deleting a version renames it away first, so it disappears at once.

All methods are called from the server's event loop thread; the lock only guards against
helper threads that :meth:`add` after writing a file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..checkpoint.manifest import atomic_write
from ..errors import ScalaiError
from .files import StoreFileError, TensorMeta, map_tensor, read_meta
from .manifest import VersionManifest
from .names import check_name, check_tensor_name

__all__ = ["Catalog", "StoredTensor", "VersionEntry", "NotFound", "Conflict", "StorageFull", "remove_trees"]

log = logging.getLogger("scalai.store")
MANIFEST = "manifest.json"
MARKER = ".scalai-store"


def _own_root(path: str) -> str:
    """Create or adopt ``path`` as a store root; returns its ``jobs`` directory."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        if os.listdir(path):
            raise ValueError(f"{path} is not empty and is not a store root; give a new or empty "
                             f"directory (e.g. /dev/shm/scalai-store)")
        atomic_write(marker, b'{"format": "scalai-store-root", "version": 1}\n', sync=False)
    jobs = os.path.join(path, "jobs")
    os.makedirs(jobs, exist_ok=True)
    return jobs


class NotFound(ScalaiError):
    """HTTP 404."""


class Conflict(ScalaiError):
    """HTTP 409: the request contradicts the version's state (e.g. writing a committed one)."""


class StorageFull(ScalaiError):
    """HTTP 507: no room in memory (and none in the spill directory)."""


@dataclass
class StoredTensor:
    path: str
    meta: TensorMeta
    spilled: bool = False


@dataclass
class VersionEntry:
    job: str
    version: str
    tensors: dict[tuple[int, str], StoredTensor] = field(default_factory=dict)
    manifest: dict | None = None

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    @property
    def nbytes(self) -> int:
        return sum(t.meta.nbytes for t in self.tensors.values())

    def summary(self) -> dict:
        m = self.manifest or {}
        return {"version": self.version, "committed": self.committed, "sequence": m.get("sequence"),
                "layout": (m.get("ptc") or {}).get("config"), "bytes": self.nbytes,
                "tensors": len(self.tensors)}


class Catalog:
    """The index of one store's roots (see the module docstring)."""

    def __init__(self, root: str, spill: str | None = None, memory_limit: int | None = None,
                 name: str = "store"):
        self.root_dir = os.path.abspath(root)
        self.spill_dir = os.path.abspath(spill) if spill else None
        if self.spill_dir == self.root_dir:
            raise ValueError("the spill directory must differ from the root")
        self.root = _own_root(self.root_dir)
        self.spill = _own_root(self.spill_dir) if self.spill_dir else None
        self.memory_limit = memory_limit
        self.name = name
        self.jobs: dict[str, dict[str, VersionEntry]] = {}
        self.used = {"memory": 0, "spill": 0}
        self._lock = threading.Lock()
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._scan()

    # -- start-up ---------------------------------------------------------------------
    def _scan(self) -> None:
        for root, spilled in ((self.root, False), (self.spill, True)):
            if root is None:
                continue
            for job in _listdir(root):
                if job.startswith("."):
                    shutil.rmtree(os.path.join(root, job), ignore_errors=True)
                    continue
                for version in _listdir(os.path.join(root, job)):
                    vdir = os.path.join(root, job, version)
                    if version.startswith("."):
                        shutil.rmtree(vdir, ignore_errors=True)  # an interrupted delete
                        continue
                    entry = self._entry(job, version, create=True)
                    self._scan_version(entry, vdir, spilled)
                    mpath = os.path.join(vdir, MANIFEST)
                    if not spilled and os.path.exists(mpath):
                        with open(mpath, "rb") as f:
                            entry.manifest = json.load(f)
        log.info("%s: %d jobs, %d bytes in memory, %d spilled", self.name, len(self.jobs),
                 self.used["memory"], self.used["spill"])

    def _scan_version(self, entry: VersionEntry, vdir: str, spilled: bool) -> None:
        for rdir in _listdir(vdir):
            if not (rdir.startswith("r") and rdir[1:].isdigit()):
                continue
            for tensor in _listdir(os.path.join(vdir, rdir)):
                path = os.path.join(vdir, rdir, tensor)
                if tensor.startswith("."):  # an upload that never finished
                    os.unlink(path)
                    continue
                try:
                    meta = read_meta(path)
                except StoreFileError as exc:
                    log.warning("dropping %s", exc)
                    os.unlink(path)
                    continue
                entry.tensors[(int(rdir[1:]), tensor)] = StoredTensor(path, meta, spilled)
                self.used["spill" if spilled else "memory"] += meta.nbytes

    # -- lookup -----------------------------------------------------------------------
    def _entry(self, job: str, version: str, create: bool = False) -> VersionEntry:
        versions = self.jobs.get(job)
        if versions is None:
            if not create:
                raise NotFound(f"job {job!r} is not in store {self.name}")
            versions = self.jobs[job] = {}
        entry = versions.get(version)
        if entry is None:
            if not create:
                raise NotFound(f"version {version!r} of job {job!r} is not in store {self.name}")
            entry = versions[version] = VersionEntry(job, version)
        return entry

    def version(self, job: str, version: str) -> VersionEntry:
        return self._entry(job, version)

    def committed(self, job: str, version: str) -> VersionEntry:
        entry = self._entry(job, version)
        if not entry.committed:
            raise Conflict(f"version {version!r} of job {job!r} is not committed in store "
                           f"{self.name}; it cannot be read until it is")
        return entry

    def tensor(self, job: str, version: str, rank: int, tensor: str) -> StoredTensor:
        stored = self.committed(job, version).tensors.get((rank, tensor))
        if stored is None:
            raise NotFound(f"tensor {tensor!r} of rank {rank} is not in version {version!r} of "
                           f"job {job!r} in store {self.name}")
        return stored

    def array(self, stored: StoredTensor) -> np.ndarray:
        """The read-only mapped array of a committed tensor (mappings cached, LRU of 512)."""
        with self._lock:
            arr = self._maps.get(stored.path)
            if arr is not None:
                self._maps.move_to_end(stored.path)
                return arr
        arr = map_tensor(stored.path, stored.meta)
        with self._lock:
            self._maps[stored.path] = arr
            while len(self._maps) > 512:
                self._maps.popitem(last=False)
        return arr

    # -- writing ----------------------------------------------------------------------
    def place(self, job: str, version: str, rank: int, tensor: str, nbytes: int) -> tuple[str, bool]:
        """Path for a new tensor file of ``nbytes`` and whether it is spilled to disk.

        Raises:
            Conflict: the version is committed (immutable).
            StorageFull: no room in memory and no spill directory.
        """
        check_name(job, "job"), check_name(version, "version"), check_tensor_name(tensor)
        versions = self.jobs.get(job, {})
        if version in versions and versions[version].committed:
            raise Conflict(f"version {version!r} of job {job!r} is committed in store {self.name} "
                           f"and cannot change; write a new version")
        spilled = False
        with self._lock:
            old = versions.get(version).tensors.get((rank, tensor)) if version in versions else None
            freed = old.meta.nbytes if old is not None and not old.spilled else 0
            if self.memory_limit is not None and self.used["memory"] - freed + nbytes > self.memory_limit:
                if self.spill is None:
                    raise StorageFull(
                        f"store {self.name} holds {self.used['memory']} bytes in memory and "
                        f"{nbytes} more would pass its limit of {self.memory_limit}; delete old "
                        f"versions, raise --memory-limit or give --spill DIR")
                spilled = True
        root = self.spill if spilled else self.root
        return os.path.join(root, job, version, f"r{rank:05d}", tensor), spilled

    def begin(self, job: str, version: str) -> VersionEntry:
        """Create an empty, uncommitted version (for a transformation to fill).

        Raises:
            Conflict: the version exists already.
        """
        check_name(job, "job"), check_name(version, "version")
        with self._lock:
            if version in self.jobs.get(job, {}):
                raise Conflict(f"version {version!r} of job {job!r} already exists in store {self.name}; "
                               f"delete it or choose another name")
            return self._entry(job, version, create=True)

    def add(self, job: str, version: str, rank: int, tensor: str, path: str, meta: TensorMeta,
            spilled: bool, create: bool = True) -> None:
        """Record a tensor file written at ``path`` (replacing an earlier one).

        ``create=False``: the version must still exist (it may have been deleted while the
        file was written; then the file is removed and NotFound raised)."""
        with self._lock:
            try:
                entry = self._entry(job, version, create=create)
            except NotFound:
                _unlink(path)
                raise
            if entry.committed:
                raise Conflict(f"version {version!r} of job {job!r} was committed meanwhile")
            old = entry.tensors.get((rank, tensor))
            if old is not None:
                self.used["spill" if old.spilled else "memory"] -= old.meta.nbytes
                if old.path != path:
                    _unlink(old.path)
            entry.tensors[(rank, tensor)] = StoredTensor(path, meta, spilled)
            self.used["spill" if spilled else "memory"] += meta.nbytes

    def commit(self, job: str, version: str, manifest: VersionManifest, raw: dict) -> VersionEntry:
        """Check that this store holds exactly its ranks' tensors, then write the manifest.

        Committing again with the same manifest succeeds (retries are safe).

        Raises:
            ValueError: the manifest names another job or version.
            Conflict: tensors missing, extra or of the wrong dtype/shape; or already
                committed with another manifest.
        """
        if (manifest.job, manifest.version) != (job, version):
            raise ValueError(f"manifest is for {manifest.job}/{manifest.version}, not {job}/{version}")
        entry = self._entry(job, version, create=True)
        if entry.committed:
            if entry.manifest == raw:
                return entry
            raise Conflict(f"version {version!r} of job {job!r} is already committed in store "
                           f"{self.name} with another manifest")
        expected = manifest.expected(self.name)
        missing = [k for k in expected if k not in entry.tensors]
        extra = [k for k in entry.tensors if k not in expected]
        wrong = [k for k, (dtype, shape) in expected.items() if k in entry.tensors
                 and (entry.tensors[k].meta.dtype, entry.tensors[k].meta.shape) != (dtype, shape)]
        for what, keys in (("missing", missing), ("not in the layout", extra), ("of the wrong dtype or shape", wrong)):
            if keys:
                shown = ", ".join(f"rank {r} {t}" for r, t in sorted(keys)[:3])
                raise Conflict(f"cannot commit {job}/{version} in store {self.name}: {len(keys)} "
                               f"tensors {what} (e.g. {shown}); upload exactly what ptc.rank_shards "
                               f"gives the ranks placed on host {self.name}")
        vdir = os.path.join(self.root, job, version)
        os.makedirs(vdir, exist_ok=True)
        atomic_write(os.path.join(vdir, MANIFEST), json.dumps(raw).encode(), sync=False)
        entry.manifest = raw
        return entry

    def delete(self, job: str, version: str | None = None) -> tuple[list[str], list[str]]:
        """Remove one version (or the whole job) from the index and rename its directories
        away (at once); returns the versions removed and the renamed directories, which
        the caller deletes with :func:`remove_trees` (slow for many files; off the loop)."""
        versions = self.jobs.get(job)
        if versions is None or (version is not None and version not in versions):
            raise NotFound(f"{job}/{version or ''} is not in store {self.name}".rstrip("/"))
        names = [version] if version is not None else list(versions)
        trash = []
        for v in names:
            entry = versions.pop(v)
            with self._lock:
                for t in entry.tensors.values():
                    self.used["spill" if t.spilled else "memory"] -= t.meta.nbytes
                    self._maps.pop(t.path, None)
            for root in filter(None, (self.root, self.spill)):
                vdir = os.path.join(root, job, v)
                if os.path.isdir(vdir):
                    trash.append(os.path.join(root, job, f".trash-{v}-{secrets.token_hex(4)}"))
                    os.rename(vdir, trash[-1])
        if not versions:
            del self.jobs[job]
        return names, trash

    def usage(self) -> dict:
        return {"memory_bytes": self.used["memory"], "spill_bytes": self.used["spill"],
                "memory_limit_bytes": self.memory_limit, "root": self.root_dir, "spill": self.spill_dir,
                "jobs": {j: {v: e.nbytes for v, e in vs.items()} for j, vs in self.jobs.items()}}


def remove_trees(paths: list[str]) -> None:
    """Delete directories that :meth:`Catalog.delete` renamed away, then empty job dirs."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(path))  # the job directory, if now empty
        except OSError:
            pass


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
