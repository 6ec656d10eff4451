"""Where checkpoints live: a directory (a path, or ``file://PATH``) or ``memory://NAME``.

``open_source`` and ``create_sink`` turn a location into the :class:`~scalai.storage.TensorSource`
or :class:`~scalai.storage.TensorSink` of its backend, so that commands and functions that
take a checkpoint take any of them; a new backend is one more scheme here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .checkpoint import Checkpoint, CheckpointWriter
from .layout.ptc import PTC
from .storage.base import TensorSink, TensorSource
from .storage.memory import SCHEME as MEMORY, MemorySink, MemorySource, memory_checkpoints

__all__ = ["open_source", "create_sink", "exists", "is_memory"]

_FILE = "file://"


def is_memory(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(MEMORY)


def _path(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    if text.startswith(_FILE):
        return text[len(_FILE):]
    if "://" in text:
        raise ValueError(f"checkpoint location {text!r} has an unknown scheme; give a directory path, "
                         f"file://PATH or memory://NAME")
    return text


def exists(location: str | os.PathLike) -> bool:
    """Whether something is at ``location`` already (a sink would refuse it)."""
    if is_memory(location):
        return location[len(MEMORY):] in memory_checkpoints()
    return os.path.lexists(_path(location))


def open_source(location: str | os.PathLike) -> TensorSource:
    """The committed checkpoint at ``location``, opened for reading.

    Raises:
        CheckpointError: nothing complete is there.
    """
    if is_memory(location):
        return MemorySource(location)
    return Checkpoint.open(_path(location))


def create_sink(location: str | os.PathLike, ptc: PTC, state: Mapping[str, Any] | None = None,
                sync: bool = True) -> TensorSink:
    """A new checkpoint of ``ptc`` at ``location`` (invisible until committed; each
    replica stored once: plan into ``ptc.stored_replicas()``).

    Raises:
        FileExistsError: something is there already (nothing is touched).
    """
    if is_memory(location):
        return MemorySink(location, ptc, dict(state or {}))
    return CheckpointWriter(_path(location), ptc, state, sync=sync)
