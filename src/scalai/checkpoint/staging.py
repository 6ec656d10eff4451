"""Output directories: checks before writing, hidden staging directories while writing,
and the staging directories that killed runs leave behind.

Before anything is written, :func:`check_output` refuses an output that exists, lies inside
one of the inputs, or does not fit: a read-only filesystem, a pseudo-filesystem such as
``/proc``, or too little free space (the same check for every command that writes).

A writer builds its output ``NAME`` in ``.NAME.partial-PID`` beside it and renames it into
place once complete (:func:`create`, :func:`release`). An error or a signal (SIGINT,
SIGTERM) removes the staging directory on the way out; SIGKILL, a crash of the machine or
a power loss cannot. So every new staging directory first looks for stale ones in the same
parent directory (:func:`sweep`):

- **removed**: a staging directory whose owner record (``.scalai-owner``, written first,
  deleted just before the rename) names a process of *this* machine, since its last boot
  and in this PID namespace, that no longer exists (no process with that PID, or one
  started at another time: the PID was reused);
- **named, with the command to remove it**: everything else that looks like a staging
  directory: a writer on another machine sharing the filesystem (NFS, Lustre), in another
  container, from before a reboot, or a directory without a record (another tool, an
  older scalai, a multi-rank training save). Its writer may be alive, and deleting a live
  save would lose it: only the user can tell.

Why not judge by the PID in the name alone: a PID means nothing on another machine (two
hosts writing into one shared directory both have a PID 4242), and PIDs are reused. The
record's boot id, PID namespace and process start time make "this process is gone" a
fact rather than a guess; where it cannot be a fact, nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
from dataclasses import dataclass

from ..bounded import read_json
from ..units import human_bytes

__all__ = ["OWNER_FILE", "Stale", "check_output", "create", "release", "publish", "find_stale", "sweep",
           "owner_record", "staging_path"]

log = logging.getLogger("scalai.checkpoint")

#: The owner record inside a staging directory (removed before the directory is renamed).
OWNER_FILE = ".scalai-owner"
_PATTERN = re.compile(r"^\..+\.partial-[^/]+$")


def staging_path(out_dir: str) -> str:
    """``PARENT/.NAME.partial-PID`` for the output ``PARENT/NAME`` (absolute)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.partial-{os.getpid()}")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks after boot), or None if there is none."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    try:
        st = os.stat("/proc/self/ns/pid")
        return f"{st.st_dev}:{st.st_ino}"
    except OSError:
        return None


def owner_record() -> dict:
    """This process as a staging directory's owner: PID, start time, boot, PID namespace, host."""
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot": _read("/proc/sys/kernel/random/boot_id"),
            "pidns": _pid_namespace(), "host": socket.gethostname()}


@dataclass(frozen=True)
class Stale:
    """A staging directory left by a writer that is not (provably) running.

    Attributes:
        path: the directory.
        nbytes: bytes its files occupy on disk.
        removable: its writer is provably gone (see the module docstring).
        reason: why it is, or why that cannot be known.
    """

    path: str
    nbytes: int
    removable: bool
    reason: str

    @property
    def command(self) -> str:
        """The shell command that removes it."""
        return f"rm -rf -- {shlex.quote(self.path)}"


def _usage(path: str) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _judge(path: str) -> tuple[bool, bool, str]:
    """``(alive, removable, reason)`` for the staging directory ``path``."""
    try:
        owner = read_json(os.path.join(path, OWNER_FILE), 4096, "owner record")
        pid, start = int(owner["pid"]), owner["start"]
        boot, pidns, host = owner["boot"], owner["pidns"], str(owner["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return False, False, "it has no owner record (written by another tool, an older scalai or a training save)"
    mine = owner_record()
    if boot is None or boot != mine["boot"] or pidns is None or pidns != mine["pidns"]:
        return False, False, (f"its writer, pid {pid} on {host}, ran on another machine, in another "
                              f"container or before a reboot")
    if start is not None and _start_time(pid) == start:
        return True, False, f"its writer, pid {pid}, is running"
    return False, True, f"its writer, pid {pid}, is gone"


def find_stale(parent: str) -> list[Stale]:
    """Staging directories in ``parent`` whose writers are not known to be running."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        path = os.path.join(parent, name)
        if not _PATTERN.match(name) or not os.path.isdir(path) or os.path.islink(path):
            continue
        alive, removable, reason = _judge(path)
        if not alive:
            found.append(Stale(path, _usage(path), removable, reason))
    return found


def _remove(stale: Stale) -> bool:
    """Remove a provably dead staging directory; False if it changed under us."""
    try:
        fd = os.open(stale.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        before = os.fstat(fd)
        # Judge again through the open directory: the name may have been reused meanwhile.
        if _judge(f"/proc/self/fd/{fd}")[1] is not True:
            return False
        trash = f"{stale.path}-removing-{os.getpid()}"
        os.rename(stale.path, trash)
        after = os.lstat(trash)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            if not os.path.lexists(stale.path):
                os.rename(trash, stale.path)  # someone else's directory: put it back
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep(parent: str) -> list[Stale]:
    """Remove the provably dead staging directories in ``parent``; log every stale one.

    Returns all that were found (removed or not). Removals are logged at INFO, the ones
    left in place at WARNING with the command that removes them (logger
    ``scalai.checkpoint``; the CLI prints both).
    """
    found = find_stale(parent)
    for stale in found:
        if stale.removable and _remove(stale):
            log.info(f"removed {stale.path} ({human_bytes(stale.nbytes)}), the partial output of a "
                     f"killed run ({stale.reason})")
        elif stale.removable:
            continue  # changed while we looked: leave it to the next run
        else:
            log.warning(f"{stale.path} ({human_bytes(stale.nbytes)}) looks like the partial output of a "
                        f"killed run, but {stale.reason}; if no save into it is running, remove it: "
                        f"{stale.command}")
    return found


def create(out_dir: str) -> str:
    """Sweep ``out_dir``'s parent, then create its staging directory with an owner record.

    Returns the staging directory (absolute).

    Raises:
        FileExistsError: the staging directory exists (a save of ``out_dir`` in progress
            in this very process).
    """
    staging = staging_path(out_dir)
    parent = os.path.dirname(staging)
    os.makedirs(parent, exist_ok=True)
    sweep(parent)
    try:
        os.mkdir(staging)
    except FileExistsError:
        raise FileExistsError(f"{staging} exists: another save of {out_dir} is under way in this "
                              f"process; wait for it or choose another output") from None
    try:
        with open(os.path.join(staging, OWNER_FILE), "w") as f:
            json.dump(owner_record(), f)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def release(staging: str) -> None:
    """Remove the owner record: the directory is about to be renamed into place."""
    try:
        os.unlink(os.path.join(staging, OWNER_FILE))
    except FileNotFoundError:
        pass


def publish(staging: str, out_dir: str, sync: bool = True) -> None:
    """Rename the finished staging directory to ``out_dir`` (after :func:`release`), and
    fsync the parent directory when ``sync``: a directory that appears is complete.

    Raises:
        FileExistsError: ``out_dir`` appeared while writing (the staging directory is left).
    """
    if os.path.lexists(out_dir):
        raise FileExistsError(f"output {out_dir} appeared while writing; the result is left in {staging}")
    release(staging)
    os.rename(staging, out_dir)
    if sync:
        fd = os.open(os.path.dirname(os.path.abspath(out_dir)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- before writing ------------------------------------------------------------------------
def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output(out_dir: str | os.PathLike, need: int, what: str, inputs=()) -> None:
    """Refuse to write ``need`` bytes of ``what`` into the new directory ``out_dir`` unless
    it can work: it does not exist, lies outside every input directory, and its filesystem
    is writable, a real disk (not ``/proc``) and has room (10 % kept free).

    Raises:
        FileExistsError: ``out_dir`` exists.
        ValueError: it lies inside an input, or the filesystem cannot take it (one line
            saying which and what to do).
    """
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out):
        raise FileExistsError(f"output {out_dir} already exists; choose another output directory "
                              f"or remove it first")
    real = os.path.realpath(out)
    for source in inputs:
        src = os.path.realpath(os.fspath(source))
        if real == src or real.startswith(src.rstrip(os.sep) + os.sep):
            raise ValueError(f"output {out_dir} lies inside the input {source}; writing there would "
                             f"change the input: choose a directory outside it")
    parent = _existing_ancestor(os.path.dirname(out))
    try:
        fs = os.statvfs(parent)
    except OSError as exc:
        raise ValueError(f"cannot write into {parent}: {exc.strerror}; choose another output directory") from None
    if fs.f_flag & os.ST_RDONLY:
        raise ValueError(f"{parent} is on a read-only filesystem; choose another output directory")
    if fs.f_blocks == 0:
        raise ValueError(f"{parent} is not on a disk: its filesystem reports no capacity (a pseudo-filesystem "
                         f"such as /proc or /sys); "
                         f"choose another output directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {parent}: permission denied; choose another output directory")
    free = fs.f_bavail * fs.f_frsize
    if need > 0.9 * free:
        raise ValueError(f"{what} needs {human_bytes(need)} but only {human_bytes(free)} are free under "
                         f"{parent}; free some space or choose another output directory")
