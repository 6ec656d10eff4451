"""The process's open-file limit, which checkpoints of many ranks run into.

A checkpoint keeps every rank file open while it is read or written (each costs two
descriptors: the file and its mapping). scalai's own size limits are in
:mod:`scalai.limits`; this is the operating system's.
"""

from __future__ import annotations

import os

from ..limits import LimitError

__all__ = ["reserve_descriptors"]


def reserve_descriptors(files: int, what: str = "a checkpoint") -> None:
    """Raise the soft open-file limit so that ``files`` more files can be open at once.

    Raises:
        LimitError: the hard limit does not allow it (checked before any file is opened,
            so a checkpoint of 65,536 ranks is refused at once instead of failing half-way
            with "Too many open files").
    """
    try:
        import resource
    except ImportError:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = len(os.listdir("/proc/self/fd")) + 2 * files + 64
    except OSError:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise LimitError(f"{what} of {files:,} ranks keeps {2 * files:,} files open at once, but this process "
                         f"may open at most {hard:,} (ulimit -Hn); use a layout of fewer ranks, or raise the "
                         f"hard limit of open files (e.g. in /etc/security/limits.conf)")
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            pass
