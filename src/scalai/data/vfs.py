"""The data mount: a :class:`~scalai.data.vfs_tree.View` served through FUSE.

Uses `mfusepy` (ctypes bindings of libfuse 3's high-level API, multi-threaded loop),
imported only when mounting, so everything else works without FUSE.

Lifetime: :func:`mount` runs in the foreground until SIGINT, SIGTERM or SIGHUP, which
libfuse turns into a clean unmount. The mount uses libfuse's ``auto_unmount`` option:
``fusermount3`` stays beside the process and unmounts as soon as the process dies, even
by SIGKILL, so no hung mount ("Transport endpoint is not connected") is left behind. A
stale mount left by something else (say a killed process group that took
``fusermount3`` with it) is detected and lazily unmounted before mounting again.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..bounded import loads, may_continue
from ..errors import ScalaiError
from .index import SampleIndex
from .reader import SampleReader
from .vfs_tree import MountConfig, View

__all__ = ["mount", "fuse_unavailable_reason", "FuseUnavailable", "is_mounted"]

#: Largest change written to state.json (a handful of keys; anything longer is refused).
MAX_STATE_WRITE = 64 << 10
# Lines libfuse and fusermount3 print in normal operation that would only confuse a user.
_NOISE = (b"Ignoring invalid max threads value", b"not mounted")


class FuseUnavailable(ScalaiError):
    """FUSE cannot be used here (no /dev/fuse, no permission, no fusermount3 or binding)."""


def fuse_unavailable_reason() -> str | None:
    """Why FUSE cannot be used on this machine, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return ("FUSE is not available: /dev/fuse does not exist (load the fuse module, or run the "
                "container with --device /dev/fuse --cap-add SYS_ADMIN); the Python API needs no FUSE")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return ("FUSE is not available: no read/write permission on /dev/fuse (add your user to the "
                "group that owns it); the Python API needs no FUSE")
    if shutil.which("fusermount3") is None:
        return "FUSE is not available: fusermount3 is not installed (apt-get install fuse3)"
    try:
        _import_mfusepy()
    except ImportError:
        return "FUSE support is not installed: pip install 'scalai[fuse]' (installs mfusepy)"
    except (OSError, EnvironmentError) as exc:  # mfusepy raises this when libfuse is missing
        return f"FUSE is not available: libfuse 3 was not found ({exc}); apt-get install fuse3"
    return None


def _import_mfusepy():
    # mfusepy picks libfuse 2 when both are installed; we rely on libfuse 3 and fusermount3.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy

    return mfusepy


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a mount point (a stale FUSE mount counts)."""
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _clear_stale(mountpoint: Path) -> None:
    """Lazily unmount a dead FUSE mount at ``mountpoint`` (stat fails with ENOTCONN)."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        print(f"scalai: {mountpoint} is a stale FUSE mount; unmounting it", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


@contextmanager
def _filtered_stderr() -> Iterator[None]:
    """Route fd 2 through a thread that drops :data:`_NOISE` lines (libfuse and its
    fusermount3 child write to fd 2 directly, below Python).

    fd 2 becomes an unlinked temporary file, not a pipe: fusermount3 outlives this process
    when it is killed, and a write to a pipe without a reader would kill it with SIGPIPE
    before it unmounts.
    """
    sink = tempfile.TemporaryFile()
    reader = open(f"/proc/self/fd/{sink.fileno()}", "rb")
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(sink.fileno(), 2)
    done = threading.Event()

    def forward() -> None:
        pending = b""
        while True:
            finished = done.is_set()
            chunk = reader.read()
            pending += chunk or b""
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not any(noise in line for noise in _NOISE):
                    os.write(saved, line + b"\n")
            if finished:
                if pending and not any(noise in pending for noise in _NOISE):
                    os.write(saved, pending)
                return
            if not chunk:
                time.sleep(0.05)

    thread = threading.Thread(target=forward, name="scalai-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        done.set()
        thread.join(timeout=2)
        os.dup2(saved, 2)
        os.close(saved)
        reader.close()
        sink.close()


@contextmanager
def _default_signals(*signals: int) -> Iterator[None]:
    """Default dispositions while libfuse runs: it installs its own handlers (a clean
    unmount) only for signals left at their default, and the CLI handles SIGTERM itself."""
    try:
        saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in signals}
    except ValueError:  # not the main thread: signals are not ours to change
        yield
        return
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class _Handle:
    """An open file: the view it was opened in, and for state.json the bytes written."""

    __slots__ = ("view", "buffer", "dirty")

    def __init__(self, view: View, buffer: bytearray | None) -> None:
        self.view, self.buffer, self.dirty = view, buffer, False


def _operations(view_ref: list[View], on_ready: Callable[[], None] | None, log: Callable[[str], None]):
    mfusepy = _import_mfusepy()

    class Operations(mfusepy.Operations):
        use_ns = True

        def __init__(self) -> None:
            self._handles: dict[int, _Handle] = {}
            self._ids = itertools.count(1)
            self._lock = threading.Lock()
            self._mtime = time.time_ns()

        def init_with_config(self, conn, config) -> None:
            if config is not None:
                # Paths change size and content when the view changes: no kernel caching of
                # names or attributes; file pages are dropped on open (kernel_cache is off).
                config.entry_timeout = config.attr_timeout = config.negative_timeout = 0.0
            if on_ready:
                on_ready()

        def _lookup(self, path: str):
            try:
                return view_ref[0].lookup(path)
            except KeyError:
                raise mfusepy.FuseOSError(errno.ENOENT) from None

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            node = self._lookup(path)
            common = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_mtime": self._mtime,
                      "st_ctime": self._mtime, "st_atime": self._mtime}
            if node.is_dir:
                return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            mode = 0o644 if node.writable else 0o444
            return {**common, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": node.size}

        def readdir(self, path: str, fh: int) -> list[str]:
            try:
                return [".", ".."] + view_ref[0].listdir(path)
            except KeyError:
                raise mfusepy.FuseOSError(errno.ENOENT) from None
            except NotADirectoryError:
                raise mfusepy.FuseOSError(errno.ENOTDIR) from None

        def open(self, path: str, flags: int) -> int:
            node = self._lookup(path)
            writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
            if writing and not node.writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            with self._lock:
                fh = next(self._ids)
                # A write to state.json replaces it whole, whatever the open flags.
                self._handles[fh] = _Handle(view_ref[0], bytearray() if writing else None)
            return fh

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            try:
                return self._handles[fh].view.read(path, offset, size)
            except KeyError:
                raise mfusepy.FuseOSError(errno.ENOENT) from None
            except ScalaiError as exc:
                log(f"read of {path} failed: {exc}")
                raise mfusepy.FuseOSError(errno.EIO) from None

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            handle = self._handles[fh]
            if handle.buffer is None:
                raise mfusepy.FuseOSError(errno.EBADF)
            if offset + len(data) > MAX_STATE_WRITE:
                handle.dirty, handle.buffer[:] = False, b""
                log(f"state.json not changed: a change is at most {MAX_STATE_WRITE} bytes of JSON")
                raise mfusepy.FuseOSError(errno.EFBIG)
            handle.buffer[offset: offset + len(data)] = data
            handle.dirty = True
            text = bytes(handle.buffer)
            try:
                changes = loads(text, "what was written")
            except ValueError as exc:
                if may_continue(text):
                    return len(data)  # not a whole JSON document yet: wait for more, or for close()
                handle.dirty, handle.buffer[:] = False, b""
                log(f"state.json not changed: {exc}")
                raise mfusepy.FuseOSError(errno.EINVAL) from None  # garbage fails the write itself
            self._apply(handle, changes)  # complete: apply now, so a bad one fails the write itself
            return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            if not self._lookup(path).writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            handle = self._handles.get(fh) if fh is not None else None
            if handle is not None and handle.buffer is not None:
                del handle.buffer[length:]
            return 0

        def flush(self, path: str, fh: int) -> int:
            # Called on every close() of a descriptor (a shell's dup2 closes one before it
            # writes): only bytes written since the last change count.
            handle = self._handles.get(fh)
            if handle is None or not handle.dirty:
                return 0
            try:
                changes = loads(bytes(handle.buffer), "what was written")
            except ValueError as exc:
                handle.dirty, handle.buffer[:] = False, b""
                log(f"state.json not changed: {exc}")
                raise mfusepy.FuseOSError(errno.EINVAL) from None
            self._apply(handle, changes)
            return 0

        def _apply(self, handle: _Handle, changes: object) -> None:
            handle.dirty, handle.buffer[:] = False, b""
            try:
                new = view_ref[0].apply(changes)
            except ValueError as exc:
                log(f"state.json not changed: {exc}")
                raise mfusepy.FuseOSError(errno.EINVAL) from None
            view_ref[0] = new  # one assignment: readers see the old view or the new one
            c = new.config
            log(f"view regenerated (generation {new.generation}): dp={c.division.dp}, epoch {c.state.epoch}, "
                f"consumed {c.state.consumed}, global batch {c.state.global_batch}, {c.steps} steps")

        def release(self, path: str, fh: int) -> int:
            with self._lock:
                self._handles.pop(fh, None)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    return Operations()


def mount(index: SampleIndex | str | os.PathLike, mountpoint: str | os.PathLike, config: MountConfig, *,
          on_ready: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
          threads: int = 8, debug: bool = False) -> None:
    """Serve the view of ``config`` at ``mountpoint`` until a signal stops it, then unmount.

    Raises :class:`FuseUnavailable` when FUSE cannot be used, ValueError for a bad
    mountpoint. ``on_ready()`` is called once the file system answers.
    """
    reason = fuse_unavailable_reason()
    if reason:
        raise FuseUnavailable(reason)
    mfusepy = _import_mfusepy()

    index = index if isinstance(index, SampleIndex) else SampleIndex.open(index, verify=True)
    mountpoint = Path(mountpoint).absolute()
    _clear_stale(mountpoint)
    if not mountpoint.exists():
        if not mountpoint.parent.is_dir():
            raise ValueError(f"mountpoint {mountpoint} does not exist and neither does its parent; create it")
        mountpoint.mkdir()
    if not mountpoint.is_dir():
        raise NotADirectoryError(f"mountpoint {mountpoint} is not a directory; pass an empty directory")
    if is_mounted(mountpoint):
        raise ValueError(f"{mountpoint} is already a mount point; unmount it (fusermount3 -u {mountpoint})")
    if any(mountpoint.iterdir()):
        raise ValueError(f"mountpoint {mountpoint} is not empty; mounting would hide its files: use an empty directory")
    view_ref = [View(index, SampleReader(index), config)]
    say = log or (lambda message: print(f"scalai: {message}", file=sys.stderr, flush=True))
    operations = _operations(view_ref, on_ready, say)
    with _filtered_stderr(), _default_signals(signal.SIGTERM, signal.SIGHUP):
        try:
            mfusepy.FUSE(operations, str(mountpoint), foreground=True, debug=debug, auto_unmount=True,
                         fsname=f"scalai-data:{index.path.name}", subtype="scalai", max_threads=threads,
                         default_permissions=True)
        except RuntimeError as exc:
            # libfuse returns 8 when its loop ended on a signal, after unmounting: a clean stop.
            if exc.args != (8,):
                raise ScalaiError(f"mounting {mountpoint} failed (libfuse error {exc.args[0]}); "
                                  f"see the message above") from None
