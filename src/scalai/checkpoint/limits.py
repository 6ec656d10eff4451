"""Process limits that many open rank files run into."""

from __future__ import annotations

import os

__all__ = ["reserve_descriptors"]


def reserve_descriptors(files: int) -> None:
    """Raise the soft open-file limit so that ``files`` more files can be open at once
    (each costs two descriptors: the file and its mapping). Best effort."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = len(os.listdir("/proc/self/fd")) + 2 * files + 64
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ImportError, OSError, ValueError):
        pass
