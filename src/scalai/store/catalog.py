"""What a store holds: jobs, versions, tensor files, their sizes, who writes them; commit,
delete and expiry. (Its directories on disk: :mod:`scalai.store.roots`.)

A new tensor file goes to the memory root unless that would pass ``memory_limit`` bytes
(counting uploads in progress), then to the spill root (a disk directory), else the write
is refused (HTTP 507). The index lives in memory, rebuilt from the files at start-up.

Ownership and leases: a version belongs to the writer that created it (its *owner*, an id
the writer chose: every upload, commit, transformation and owner-scoped delete names it;
writers that give none share the owner ``""``). While uncommitted it holds a *lease*:
it expires ``lease_s`` seconds after its owner last created, renewed or wrote it, and
the server deletes expired versions (:meth:`Catalog.expired`). Committed versions are
immutable and hold no lease; an upload's file is renamed into its version only under the
lock, after checking that the version is still the one it was opened for and still
uncommitted, so a late upload can never replace a committed file.

Every method may be called from the event loop or from helper threads: one lock guards
the index.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..checkpoint.manifest import atomic_write
from ..errors import ScalaiError
from .files import NewTensor, TensorMeta, check_adoptable, is_local_name, map_tensor, private_name
from .names import check_name, check_tensor_name
from .roots import MANIFEST, UPLOADS, own_root, read_version, scan_tensors, write_local_key, write_owner

__all__ = ["Catalog", "StoredTensor", "VersionEntry", "Upload", "NotFound", "Conflict", "StorageFull"]

log = logging.getLogger("scalai.store")


class NotFound(ScalaiError):
    """HTTP 404."""


class Conflict(ScalaiError):
    """HTTP 409: the request contradicts the version's state (e.g. writing a committed one,
    or another owner's)."""


class StorageFull(ScalaiError):
    """HTTP 507: no room in memory (and none in the spill directory)."""


@dataclass
class StoredTensor:
    path: str
    meta: TensorMeta
    spilled: bool = False
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of a file linked to another name


@dataclass(eq=False)
class VersionEntry:
    """One version in the index. Compared by identity: a version deleted and created again
    under the same name is another entry."""

    job: str
    version: str
    tensors: dict[tuple[int, str], StoredTensor] = field(default_factory=dict)
    manifest: dict | None = None
    owner: str = ""
    lease_s: float = 60.0
    expires: float = 0.0  # time.monotonic() after which an uncommitted version is deleted
    uploading: int = 0    # uploads in progress

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    @property
    def nbytes(self) -> int:
        return sum(t.meta.nbytes for t in self.tensors.values())

    def summary(self) -> dict:
        m = self.manifest or {}
        out = {"version": self.version, "committed": self.committed, "sequence": m.get("sequence"),
               "layout": (m.get("ptc") or {}).get("config"), "bytes": self.nbytes,
               "tensors": len(self.tensors), "owner": self.owner}
        if self.committed:
            out["hosts"] = _holding_hosts(m)
        else:
            out["expires_in_s"] = round(max(0.0, self.expires - time.monotonic()), 3)
        return out


def _holding_hosts(manifest: dict) -> list[str]:
    """The hosts of a committed manifest's placement that hold at least one rank that is not
    lost (cheap: the layout's degrees, not its PTC)."""
    from ..config import ParallelConfig

    world = ParallelConfig.parse(manifest["ptc"]["config"]).world_size
    place, lost = manifest["placement"], set(manifest.get("lost_ranks", ()))
    g = place["gpus_per_host"]
    return [h for i, h in enumerate(place["hosts"]) if any(r not in lost for r in range(i * g, min(world, (i + 1) * g)))]


@dataclass(eq=False)
class Upload:
    """An upload in progress: the private file it streams into and where it goes."""

    entry: VersionEntry
    rank: int
    tensor: str
    tmp: str
    path: str
    spilled: bool
    nbytes: int
    created: bool = False  # this upload created the version (it was not claimed first)


class Catalog:
    """The index of one store's roots (see the module docstring).

    Args:
        lease_s: the lease of versions whose writer asks for none (seconds).
    """

    def __init__(self, root: str, spill: str | None = None, memory_limit: int | None = None,
                 name: str = "store", lease_s: float = 60.0):
        self.root_dir = os.path.abspath(root)
        self.spill_dir = os.path.abspath(spill) if spill else None
        if self.spill_dir == self.root_dir:
            raise ValueError("the spill directory must differ from the root")
        self.root = own_root(self.root_dir)
        self.uploads = os.path.join(self.root_dir, UPLOADS)
        self.local_key = write_local_key(self.root_dir)  # see adopt
        self.spill = own_root(self.spill_dir) if self.spill_dir else None
        self.memory_limit = memory_limit
        self.name = name
        self.lease_s = lease_s
        self.jobs: dict[str, dict[str, VersionEntry]] = {}
        self.fences: dict[str, int] = {}  # job -> the lowest generation that may write (fence)
        self.used = {"memory": 0, "spill": 0}  # bytes of the files, each file once (see _uncount)
        self.reserved = 0  # memory bytes of uploads in progress
        self._names: dict[tuple[int, int], int] = {}  # a file with several names here -> how many
        self._lock = threading.RLock()
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._scan()

    # -- start-up ---------------------------------------------------------------------
    def _scan(self) -> None:
        for root, spilled in ((self.root, False), (self.spill, True)):
            for job, version, rank, tensor, path, meta in scan_tensors(root) if root else ():
                entry = self._entry(job, version, create=True)
                if meta is not None:
                    t = entry.tensors[(rank, tensor)] = StoredTensor(path, meta, spilled)
                    if self._another_name(t):
                        continue
                    self.used["spill" if spilled else "memory"] += meta.nbytes
        self._names = {ident: n for ident, n in self._names.items() if n > 1}
        for job, versions in self.jobs.items():
            for version, entry in versions.items():
                # an uncommitted version gets a fresh lease: its writer may come back
                owner, lease_s, entry.manifest = read_version(os.path.join(self.root, job, version))
                entry.owner, entry.lease_s = owner or "", lease_s or self.lease_s
                entry.expires = time.monotonic() + entry.lease_s
        log.info("%s: %d jobs, %d bytes in memory, %d spilled", self.name, len(self.jobs),
                 self.used["memory"], self.used["spill"])

    def _another_name(self, t: StoredTensor) -> bool:
        """At start-up: whether ``t``'s file has a name already counted (hard links)."""
        try:
            st = os.stat(t.path)
        except OSError:
            return False
        if st.st_nlink < 2:
            return False
        t.ident = (st.st_dev, st.st_ino)
        self._names[t.ident] = self._names.get(t.ident, 0) + 1
        return self._names[t.ident] > 1

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
        with self._lock:
            return self._entry(job, version)

    def committed(self, job: str, version: str) -> VersionEntry:
        entry = self.version(job, version)
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

    def job_names(self) -> list[str]:
        with self._lock:
            return sorted(self.jobs)

    def summaries(self, job: str) -> list[dict]:
        """Every version of ``job`` (:meth:`VersionEntry.summary`), by name."""
        with self._lock:
            versions = self.jobs.get(job)
            if versions is None:
                raise NotFound(f"job {job!r} is not in store {self.name}")
            return [e.summary() for _, e in sorted(versions.items())]

    def listing(self, entry: VersionEntry) -> list[tuple[tuple[int, str], StoredTensor]]:
        """The tensors of ``entry``, sorted by (rank, name)."""
        with self._lock:
            return sorted(entry.tensors.items())

    def is_current(self, entry: VersionEntry) -> bool:
        """Whether ``entry`` is still in the index (not deleted, not replaced)."""
        with self._lock:
            return self.jobs.get(entry.job, {}).get(entry.version) is entry

    # -- ownership and leases ---------------------------------------------------------
    def fence(self, job: str, generation: int) -> int:
        """From now on refuse writers of ``job`` whose owner id names a generation below
        ``generation`` (:func:`~.lease.owner_generation`): an elastic run's coordinator
        fences off generations it gave up on, so that a worker of one (on a machine cut
        off, or frozen, and back) cannot create, write, renew or commit a version. Fences
        only rise. Returns the job's fence."""
        check_name(job, "job")
        with self._lock:
            self.fences[job] = max(self.fences.get(job, 0), int(generation))
            return self.fences[job]

    def _fenced(self, job: str, owner: str) -> None:
        from .lease import owner_generation

        generation, fence = owner_generation(owner), self.fences.get(job, 0)
        if generation is not None and generation < fence:
            raise Conflict(f"writer {owner} belongs to generation {generation} of job {job!r}, which its "
                           f"coordinator fenced off in store {self.name} (generations below {fence} may not "
                           f"write); it must stop")

    def _writable(self, entry: VersionEntry, owner: str) -> None:
        if entry.committed:
            raise Conflict(f"version {entry.version!r} of job {entry.job!r} is committed in store "
                           f"{self.name} and cannot change; write a new version")
        if entry.owner != owner:
            raise Conflict(f"version {entry.version!r} of job {entry.job!r} in store {self.name} belongs to "
                           f"another writer ({_who(entry.owner)}), not {_who(owner)}; choose another version "
                           f"name, or wait until its writer commits it or its lease expires")

    def _open(self, job: str, version: str, owner: str, lease_s: float | None, create: bool) -> VersionEntry:
        """The uncommitted version ``owner`` may write, created if absent (``create``);
        its lease renewed. Call with the lock held."""
        check_name(job, "job"), check_name(version, "version")
        self._fenced(job, owner)
        versions = self.jobs.get(job, {})
        entry = versions.get(version)
        if entry is None:
            if not create:
                raise NotFound(f"version {version!r} of job {job!r} is not in store {self.name}")
            entry = self._entry(job, version, create=True)
            entry.owner, entry.lease_s = owner, lease_s or self.lease_s
            write_owner(os.path.join(self.root, job, version), owner, entry.lease_s)
        else:
            self._writable(entry, owner)
            if lease_s:
                entry.lease_s = lease_s
        entry.expires = time.monotonic() + entry.lease_s
        return entry

    def lease(self, job: str, version: str, owner: str, lease_s: float | None = None,
              create: bool = False) -> tuple[VersionEntry, bool]:
        """Renew ``owner``'s lease of an uncommitted version, or claim it (``create``: make
        an empty version if there is none). Returns ``(entry, created)``; a committed
        version needs no lease (returned as is, if the owner is the caller).

        Raises:
            NotFound: no such version and not ``create``.
            Conflict: the version belongs to another owner.
        """
        with self._lock:
            existed = version in self.jobs.get(job, {})
            if existed and self.jobs[job][version].committed and self.jobs[job][version].owner == owner:
                return self.jobs[job][version], False
            return self._open(job, version, owner, lease_s, create), not existed

    def expired(self, now: float | None = None) -> list[VersionEntry]:
        """Uncommitted versions whose lease has run out (delete each with :meth:`expire`).
        An upload in progress keeps its version alive: its writer is there, streaming (a
        stalled one is cut off by the server's idle timeout)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [e for vs in self.jobs.values() for e in vs.values()
                    if not e.committed and not e.uploading and e.expires < now]

    def expire(self, entry: VersionEntry) -> list[str] | None:
        """Delete ``entry`` if its lease has still run out (not renewed, written, committed or
        deleted meanwhile): checked and done under the lock. Returns the directories to
        :meth:`purge`, or None when it was spared."""
        with self._lock:
            if (not self.is_current(entry) or entry.committed or entry.uploading
                    or entry.expires >= time.monotonic()):
                return None
            return self.delete(entry.job, entry.version, entry=entry)[1]

    # -- writing ----------------------------------------------------------------------
    def _room(self, nbytes: int, freed: int) -> bool:
        """Whether ``nbytes`` more fit in memory (``freed``: bytes they replace). Lock held."""
        if self.memory_limit is None:
            return True
        if self.used["memory"] + self.reserved - freed + nbytes <= self.memory_limit:
            return True
        if self.spill is None:
            raise StorageFull(
                f"store {self.name} holds {self.used['memory'] + self.reserved} bytes in memory and "
                f"{nbytes} more would pass its limit of {self.memory_limit}; delete old "
                f"versions, raise --memory-limit or give --spill DIR")
        return False

    def open_upload(self, job: str, version: str, rank: int, tensor: str, nbytes: int, owner: str = "",
                    lease_s: float | None = None) -> Upload:
        """Start an upload of ``nbytes``: the version is created if absent (owned by
        ``owner``) or must be ``owner``'s and uncommitted; its lease is renewed; memory is
        reserved. Write the bytes to ``Upload.tmp``, then :meth:`finish_upload` (or
        :meth:`abort_upload`).

        Raises:
            Conflict: committed, or another owner's. StorageFull: no room.
        """
        check_tensor_name(tensor)
        with self._lock:
            created = version not in self.jobs.get(job, {})
            entry = self._open(job, version, owner, lease_s, create=True)
            old = entry.tensors.get((rank, tensor))
            try:
                spilled = not self._room(nbytes, old.meta.nbytes if old is not None and not old.spilled else 0)
            except StorageFull:
                if created:
                    self._forget(job, version)
                raise
            if not spilled:
                self.reserved += nbytes
            entry.uploading += 1
        root = self.spill if spilled else self.root
        path = os.path.join(root, job, version, f"r{rank:05d}", tensor)
        return Upload(entry, rank, tensor, private_name(os.path.join(os.path.dirname(root), UPLOADS)), path,
                      spilled, nbytes, created)

    def finish_upload(self, up: Upload, meta: TensorMeta) -> None:
        """Move a complete upload into its version, if that version is still the one it was
        opened for and still uncommitted (checked under the lock, with the rename).

        Raises:
            NotFound: the version was deleted meanwhile (the upload is discarded).
            Conflict: it was committed meanwhile (the committed files are untouched).
        """
        with self._lock:
            self._release(up)
            entry = up.entry
            if self.jobs.get(entry.job, {}).get(entry.version) is not entry:
                _unlink(up.tmp)
                raise NotFound(f"version {entry.version!r} of job {entry.job!r} was deleted from store "
                               f"{self.name} while {up.tensor} of rank {up.rank} was uploaded; nothing was kept")
            if entry.committed:
                _unlink(up.tmp)
                raise Conflict(f"version {entry.version!r} of job {entry.job!r} was committed in store "
                               f"{self.name} while {up.tensor} of rank {up.rank} was uploaded; the "
                               f"committed tensor is unchanged")
            os.makedirs(os.path.dirname(up.path), exist_ok=True)
            os.rename(up.tmp, up.path)
            self._record(entry, up.rank, up.tensor, up.path, meta, up.spilled)
            entry.expires = time.monotonic() + entry.lease_s

    def adopt(self, job: str, version: str, rank: int, tensor: str, name: str, dtype: str,
              shape: tuple[int, ...], owner: str = "", lease_s: float | None = None) -> TensorMeta:
        """Move the tensor file ``name`` that a client on this machine wrote into
        :attr:`uploads` into the version, as :meth:`open_upload` + :meth:`finish_upload` do
        for an HTTP upload: the file is checked (:func:`~.files.check_adoptable`: a private
        name, a regular file, the size and header of ``dtype`` x ``shape``), the version is
        created for ``owner`` or must be its own, uncommitted and not fenced off, and the
        rename happens under the lock. Whatever fails, the file is deleted.

        Raises:
            ValueError: not an adoptable file. Conflict: committed, another owner's, fenced.
            StorageFull: it does not fit under the memory limit (upload it over HTTP: that
                spills to disk when a spill directory is set).
        """
        check_tensor_name(tensor)
        meta, ident = check_adoptable(self.uploads, name, dtype, shape)  # a bad name: nothing deleted
        src = os.path.join(self.uploads, name)
        try:
            with self._lock:
                created = version not in self.jobs.get(job, {})
                entry = self._open(job, version, owner, lease_s, create=True)
                old = entry.tensors.get((rank, tensor))
                try:
                    fits = self._room(meta.nbytes, old.meta.nbytes if old is not None and not old.spilled else 0)
                    if not fits:
                        raise StorageFull(f"store {self.name} has no room in memory for {tensor} of rank {rank} "
                                          f"({meta.nbytes} bytes); upload it over HTTP to spill it to disk")
                except StorageFull:
                    if created:
                        self._forget(job, version)
                    raise
                path = os.path.join(self.root, job, version, f"r{rank:05d}", tensor)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rename(src, path)
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) != ident:  # replaced between the check and the rename
                    _unlink(path)
                    if created:
                        self.purge(self.delete(job, version, entry=entry)[1])
                    raise ValueError(f"upload file {name} was replaced while it was adopted; nothing was kept")
                self._record(entry, rank, tensor, path, meta, False)
                entry.expires = time.monotonic() + entry.lease_s
        except BaseException:
            _unlink(src)
            raise
        return meta

    def discard_local(self, name: str) -> None:
        """Delete a client's local upload file after a refused adoption (names that are not
        private upload names are never touched)."""
        if is_local_name(name):
            _unlink(os.path.join(self.uploads, name))

    def abort_upload(self, up: Upload) -> None:
        """Discard a failed upload; a version it created that holds nothing goes with it."""
        trash: list[str] = []
        with self._lock:
            self._release(up)
            entry = up.entry
            if (up.created and self.is_current(entry) and not entry.committed and not entry.tensors
                    and not entry.uploading):
                trash = self.delete(entry.job, entry.version, entry=entry)[1]
        _unlink(up.tmp)
        self.purge(trash)

    def _release(self, up: Upload) -> None:
        if up.nbytes >= 0:
            if not up.spilled:
                self.reserved -= up.nbytes
            up.entry.uploading -= 1
            up.nbytes = -1  # released once

    def _record(self, entry: VersionEntry, rank: int, tensor: str, path: str, meta: TensorMeta,
                spilled: bool) -> None:
        old = entry.tensors.get((rank, tensor))
        if old is not None:
            self._uncount(old)
            if old.path != path:
                _unlink(old.path)
        entry.tensors[(rank, tensor)] = StoredTensor(path, meta, spilled)
        self.used["spill" if spilled else "memory"] += meta.nbytes

    def _uncount(self, t: StoredTensor) -> None:
        """Stop counting ``t``'s bytes, unless another name of this store still holds its file
        (a transformation links unchanged tensors: one file, several versions). Lock held."""
        ident = t.ident
        if ident is None and self._names:
            try:
                st = os.stat(t.path)
                ident = (st.st_dev, st.st_ino)
            except OSError:
                pass
        names = self._names.get(ident, 0)
        if names > 1:
            if names == 2:
                del self._names[ident]
            else:
                self._names[ident] = names - 1
            return
        self.used["spill" if t.spilled else "memory"] -= t.meta.nbytes

    def begin(self, job: str, version: str, owner: str = "", lease_s: float | None = None,
              claimed: bool = False) -> VersionEntry:
        """The empty, uncommitted version a transformation fills: new, or the caller's own
        claim of it (:meth:`lease` with ``create``) that holds nothing yet; ``claimed``: only
        that claim (NotFound if it is gone: expired, or deleted by someone else).

        Raises:
            Conflict: the version exists otherwise.
        """
        check_name(job, "job"), check_name(version, "version")
        with self._lock:
            entry = self.jobs.get(job, {}).get(version)
            if entry is None and claimed:
                raise NotFound(f"version {version!r} of job {job!r} is no longer in store {self.name}: the claim "
                               f"of {_who(owner)} ran out or the version was deleted")
            if entry is not None and (entry.committed or entry.owner != owner or entry.tensors):
                raise Conflict(f"version {version!r} of job {job!r} already exists in store {self.name} "
                               f"({'committed' if entry.committed else 'being written by ' + _who(entry.owner)}); "
                               f"delete it or choose another name")
            return self._open(job, version, owner, lease_s, create=True)

    def new_tensor(self, entry: VersionEntry, rank: int, tensor: str, meta: TensorMeta) -> NewTensor:
        """Allocate a tensor file of a transformation's version ``entry`` and record it,
        if ``entry`` is still current and uncommitted (else NotFound/Conflict: the
        transformation was cancelled, its version deleted).

        Raises:
            StorageFull: no room.
        """
        check_tensor_name(tensor)
        with self._lock:
            if not self.is_current(entry):
                raise NotFound(f"version {entry.version!r} of job {entry.job!r} was deleted from store "
                               f"{self.name} while it was being written")
            self._writable(entry, entry.owner)
            spilled = not self._room(meta.nbytes, 0)
            root = self.spill if spilled else self.root
            path = os.path.join(root, entry.job, entry.version, f"r{rank:05d}", tensor)
            out = NewTensor(path, meta)
            self._record(entry, rank, tensor, path, meta, spilled)
            return out

    def set_meta(self, entry: VersionEntry, key: tuple[int, str], meta: TensorMeta,
                 linked: tuple[int, int] | None = None) -> None:
        """Record a transformation's final meta (CRC-32) of a tensor it wrote; ``linked``:
        the ``(st_dev, st_ino)`` of the file of this store it became a name of (its bytes,
        counted at :meth:`new_tensor`, are then counted once, with that file's)."""
        with self._lock:
            t = entry.tensors.get(key)
            if t is None:
                return
            t.meta = meta
            if linked is not None and t.ident is None:
                t.ident = linked
                self._names[linked] = self._names.get(linked, 1) + 1
                self.used["spill" if t.spilled else "memory"] -= meta.nbytes

    def commit(self, job: str, version: str, raw: dict,
               expected: dict[tuple[int, str], tuple[str, tuple[int, ...]]], owner: str = "") -> VersionEntry:
        """Check that this store holds exactly the tensors ``expected`` (``{(rank, tensor):
        (dtype, shape)}``, from :meth:`VersionManifest.expected`), then write the manifest
        ``raw``. Committing again with the same manifest succeeds (retries are safe).

        Raises:
            Conflict: tensors missing, extra or of the wrong dtype/shape; another owner's
                version; or already committed with another manifest.
        """
        with self._lock:
            self._fenced(job, owner)
            existed = version in self.jobs.get(job, {})
            entry = self._entry(job, version, create=True)
            if not existed:  # a store that holds no rank of the version: an empty commit
                entry.owner, entry.lease_s = owner, self.lease_s
            if entry.committed:
                if entry.manifest == raw:
                    return entry
                raise Conflict(f"version {version!r} of job {job!r} is already committed in store "
                               f"{self.name} with another manifest")
            try:
                self._writable(entry, owner)
                missing = [k for k in expected if k not in entry.tensors]
                extra = [k for k in entry.tensors if k not in expected]
                wrong = [k for k, (dtype, shape) in expected.items() if k in entry.tensors
                         and (entry.tensors[k].meta.dtype, entry.tensors[k].meta.shape) != (dtype, shape)]
                for what, keys in (("missing", missing), ("not in the layout", extra),
                                   ("of the wrong dtype or shape", wrong)):
                    if keys:
                        shown = ", ".join(f"rank {r} {t}" for r, t in sorted(keys)[:3])
                        raise Conflict(f"cannot commit {job}/{version} in store {self.name}: {len(keys)} "
                                       f"tensors {what} (e.g. {shown}); upload exactly what ptc.rank_shards "
                                       f"gives the ranks placed on host {self.name}")
            except Conflict:
                if not existed:
                    self._forget(job, version)
                raise
            vdir = os.path.join(self.root, job, version)
            if not existed:
                write_owner(vdir, owner, entry.lease_s)
            os.makedirs(vdir, exist_ok=True)
            atomic_write(os.path.join(vdir, MANIFEST), json.dumps(raw).encode(), sync=False)
            entry.manifest = raw
            return entry

    def _forget(self, job: str, version: str) -> None:
        versions = self.jobs.get(job, {})
        versions.pop(version, None)
        if not versions:
            self.jobs.pop(job, None)

    def delete(self, job: str, version: str | None = None, owner: str | None = None,
               entry: VersionEntry | None = None) -> tuple[list[str], list[str]]:
        """Remove one version (or the whole job) from the index and rename its directories
        away (at once); returns the versions removed and the renamed directories, which
        the caller deletes with :meth:`purge` (slow for many files; off the loop).

        ``owner``: delete only a version that owner created (Conflict otherwise), the way
        a writer cleans up after itself; ``None``: any version (an operator's delete).
        ``entry``: delete only if the version is still that entry (NotFound otherwise).
        """
        with self._lock:
            if version is None and owner is None:  # the job is forgotten, its fence included
                self.fences.pop(job, None)
            versions = self.jobs.get(job)
            if versions is None or (version is not None and version not in versions):
                raise NotFound(f"{job}/{version or ''} is not in store {self.name}".rstrip("/"))
            names = [version] if version is not None else list(versions)
            if entry is not None and versions.get(version) is not entry:
                raise NotFound(f"{job}/{version} was replaced in store {self.name}")
            if owner is not None:
                if version is None:
                    raise ValueError("a whole job is deleted without an owner; give a version to delete "
                                     "one that an owner created")
                if versions[version].owner != owner:
                    raise Conflict(f"version {version!r} of job {job!r} in store {self.name} belongs to "
                                   f"another writer ({_who(versions[version].owner)}); it was not deleted")
            trash = []
            for v in names:
                removed = versions.pop(v)
                for t in removed.tensors.values():
                    self._uncount(t)
                    self._maps.pop(t.path, None)
                for root in filter(None, (self.root, self.spill)):
                    vdir = os.path.join(root, job, v)
                    if os.path.isdir(vdir):
                        trash.append(os.path.join(root, job, f".trash-{v}-{secrets.token_hex(4)}"))
                        os.rename(vdir, trash[-1])
            if not versions:
                del self.jobs[job]
            return names, trash

    def purge(self, trash: list[str]) -> None:
        """Delete directories that :meth:`delete` renamed away (slow for many files: call it
        off the event loop), then the job directories left empty."""
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
        with self._lock:  # versions are created under the lock: no job directory vanishes under one
            for path in trash:
                job = os.path.basename(os.path.dirname(path))
                if job not in self.jobs:
                    try:
                        os.rmdir(os.path.dirname(path))
                    except OSError:
                        pass

    def usage(self) -> dict:
        with self._lock:
            return {"memory_bytes": self.used["memory"], "spill_bytes": self.used["spill"],
                    "uploading_bytes": self.reserved,
                    "memory_limit_bytes": self.memory_limit, "root": self.root_dir, "spill": self.spill_dir,
                    "jobs": {j: {v: e.nbytes for v, e in vs.items()} for j, vs in self.jobs.items()}}


def _who(owner: str) -> str:
    return f"owner {owner!r}" if owner else "a writer that gave no owner"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
