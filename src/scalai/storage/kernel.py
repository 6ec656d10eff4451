"""File-to-file copies inside the kernel (``copy_file_range``): no page of either file is
mapped in this process, no byte passes through user space (on tmpfs: one page copy, as
``sendfile`` does; on filesystems with shared extents possibly none)."""

from __future__ import annotations

import errno
import os

__all__ = ["kernel_copy"]

# refusals that mean "not between these files": across filesystems, unsupported here,
# or not regular files
_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def kernel_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> bool:
    """Copy ``nbytes`` bytes from ``src_fd`` at ``src_offset`` to ``dst_fd`` at
    ``dst_offset``. Returns ``False``, having written nothing, where the kernel refuses
    (another filesystem, an old kernel, no such call on this platform).

    Raises:
        OSError: the copy failed part way (e.g. no space left), or the source ended early.
    """
    if not hasattr(os, "copy_file_range"):
        return False
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if done == 0 and exc.errno in _REFUSED:
                return False
            raise
        if n == 0:
            raise OSError(errno.EIO, f"the source file ended {nbytes - done} bytes early")
        done += n
    return True
