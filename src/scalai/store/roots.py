"""A store's directories on disk: adopting a root, and reading back what it held.

Layout under each root (the memory root, and the optional spill root)::

    <root>/.scalai-store                               marks a directory the store owns
    <root>/.local-key                                  a random key: a client that reads it sees the root
    <root>/uploads/upload-<random>                     uploads in progress (private files)
    <root>/uploads/local-<random>                      files written by clients on this machine
    <root>/jobs/<job>/<version>/owner.json             who created the version, its lease (memory root)
    <root>/jobs/<job>/<version>/manifest.json          present = committed (memory root only)
    <root>/jobs/<job>/<version>/r00003/<tensor>        one file per stored tensor (files.py)

A root must be new, empty or already marked: the store deletes leftovers under ``jobs/``
and ``uploads/`` at start-up and must never do that in a directory it does not own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from typing import Iterator

from ..checkpoint.manifest import atomic_write
from .files import LOCAL_PREFIX, StoreFileError, TensorMeta, read_meta

__all__ = ["own_root", "scan_tensors", "read_version", "write_owner", "listdir", "write_local_key", "sweep_local",
           "MANIFEST", "UPLOADS", "LOCAL_KEY"]

log = logging.getLogger("scalai.store")
MANIFEST = "manifest.json"
OWNER = "owner.json"
MARKER = ".scalai-store"
UPLOADS = "uploads"
LOCAL_KEY = ".local-key"


def own_root(path: str) -> str:
    """Create or adopt ``path`` as a store root, empty its ``uploads`` (uploads that were in
    progress when the store died); returns its ``jobs`` directory.

    Raises:
        ValueError: ``path`` holds files and is not a store root.
    """
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        if os.listdir(path):
            raise ValueError(f"{path} is not empty and is not a store root; give a new or empty "
                             f"directory (e.g. /dev/shm/scalai-store)")
        atomic_write(marker, b'{"format": "scalai-store-root", "version": 1}\n', sync=False)
    uploads = os.path.join(path, UPLOADS)
    shutil.rmtree(uploads, ignore_errors=True)
    os.makedirs(uploads)
    jobs = os.path.join(path, "jobs")
    os.makedirs(jobs, exist_ok=True)
    return jobs


def scan_tensors(jobs: str) -> Iterator[tuple[str, str, int | None, str, str, TensorMeta | None]]:
    """``(job, version, rank, tensor, path, meta)`` of every stored tensor under ``jobs``,
    and ``(job, version, None, "", vdir, None)`` once per version. Removes what an
    interrupted delete or upload left, and files that are not whole tensors."""
    for job in listdir(jobs):
        if job.startswith("."):
            shutil.rmtree(os.path.join(jobs, job), ignore_errors=True)
            continue
        for version in listdir(os.path.join(jobs, job)):
            vdir = os.path.join(jobs, job, version)
            if version.startswith("."):
                shutil.rmtree(vdir, ignore_errors=True)  # an interrupted delete
                continue
            yield job, version, None, "", vdir, None
            for rdir in listdir(vdir):
                if not (rdir.startswith("r") and rdir[1:].isdigit()):
                    continue
                for tensor in listdir(os.path.join(vdir, rdir)):
                    path = os.path.join(vdir, rdir, tensor)
                    if tensor.startswith("."):  # an upload of an earlier scalai that never finished
                        os.unlink(path)
                        continue
                    try:
                        meta = read_meta(path)
                    except StoreFileError as exc:
                        log.warning("dropping %s", exc)
                        os.unlink(path)
                        continue
                    yield job, version, int(rdir[1:]), tensor, path, meta


def write_owner(vdir: str, owner: str, lease_s: float) -> None:
    """Record who created the version in ``vdir`` (read back after a restart)."""
    os.makedirs(vdir, exist_ok=True)
    atomic_write(os.path.join(vdir, OWNER), json.dumps({"owner": owner, "lease_s": lease_s}).encode(),
                 sync=False)


def read_version(vdir: str) -> tuple[str | None, float | None, dict | None]:
    """``(owner, lease_s, manifest)`` of the version in ``vdir`` (the memory root's); None
    for what is not recorded (a version written by an earlier scalai has no owner file)."""
    owner = lease_s = None
    try:
        with open(os.path.join(vdir, OWNER), "rb") as f:
            info = json.loads(f.read(4096))
        owner, lease_s = str(info["owner"]), float(info["lease_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    manifest = None
    mpath = os.path.join(vdir, MANIFEST)
    if os.path.exists(mpath):
        with open(mpath, "rb") as f:
            manifest = json.load(f)
    return owner, lease_s, manifest


def write_local_key(root: str) -> str:
    """Write a new random key into ``root/.local-key`` (0600) and return it. A client that
    reads this key at this path sees the store's root and its upload directory (same machine, same mount
    namespace, or a filesystem they really share) and may write files there for the store
    to adopt; anywhere else it cannot read it, and uploads over HTTP."""
    key = secrets.token_hex(16)
    path = os.path.join(root, LOCAL_KEY)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key.encode())
    finally:
        os.close(fd)
    os.replace(path + ".tmp", path)
    return key


def sweep_local(uploads: str, older_than_s: float, prefix: str = LOCAL_PREFIX) -> int:
    """Delete the files in ``uploads`` named ``prefix...`` that nobody wrote for
    ``older_than_s`` seconds: what clients killed before their file was adopted left.
    Returns how many were deleted."""
    cutoff, n = time.time() - older_than_s, 0
    for name in listdir(uploads):
        if not name.startswith(prefix):
            continue
        path = os.path.join(uploads, name)
        try:
            if os.lstat(path).st_mtime < cutoff:
                os.unlink(path)
                n += 1
        except FileNotFoundError:  # adopted or removed meanwhile
            pass
    return n


def listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
