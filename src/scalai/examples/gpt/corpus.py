"""The bundled offline corpus: this Python's standard library sources, at byte level.

Every installation of Python carries a few megabytes of real, varied text: the ``.py``
files of its standard library. The corpus is the top-level ``*.py`` files of
``sysconfig.get_paths()["stdlib"]`` in sorted order, tokenized at byte level (vocabulary
256), indexed once with :func:`scalai.data.build_index` into a cache directory and read in
place from then on.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from ...data import SampleIndex, build_index
from ...errors import ScalaiError

__all__ = ["stdlib_sources", "default_index_path", "ensure_index"]


def stdlib_sources() -> list[Path]:
    """The corpus files: top-level ``*.py`` of the standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files under {root}; pass --data with an index built by "
                                f"'scalai data index FILES... OUT --seq-len N'")
    return files


def default_index_path(seq_len: int) -> Path:
    """``$SCALAI_CACHE`` (default ``~/.cache/scalai``)``/corpus/stdlib-py3.X-seqN``."""
    cache = Path(os.environ.get("SCALAI_CACHE") or Path.home() / ".cache" / "scalai")
    tag = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-seq{seq_len}"
    return cache / "corpus" / tag


def ensure_index(seq_len: int, path: str | os.PathLike | None = None) -> SampleIndex:
    """Open the stdlib index for ``seq_len`` at ``path`` (default: the cache), building it
    first if it is missing or does not fit (another ``seq_len``, changed sources)."""
    path = Path(path) if path is not None else default_index_path(seq_len)
    try:
        index = SampleIndex.open(path)
        if index.seq_len == seq_len:
            return index
    except (OSError, ValueError, ScalaiError):
        pass  # missing, or stale (sources changed): build it again
    return build_index([str(p) for p in stdlib_sources()], path, seq_len, force=True)
