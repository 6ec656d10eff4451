"""Where checkpoints live: a directory (a path, or ``file://PATH``), ``memory://NAME`` (this
process's memory) or any other fsspec URL (``s3://BUCKET/PREFIX``, ``gs://``, ``az://``, ...:
objects under a prefix, :mod:`scalai.checkpoint.objects`).

``open_source`` and ``create_sink`` turn a location into the :class:`~scalai.storage.TensorSource`
or :class:`~scalai.storage.TensorSink` of its backend, so that commands and functions that
take a checkpoint take any of them; a new backend is one more scheme here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .checkpoint import Checkpoint, CheckpointWriter
from .checkpoint.object_source import ObjectSource
from .checkpoint.objects import ObjectSink, is_object_url, object_exists
from .layout.ptc import PTC
from .storage.base import TensorSink, TensorSource
from .storage.memory import SCHEME as MEMORY, MemorySink, MemorySource, memory_checkpoints

__all__ = ["open_source", "create_sink", "exists", "delete", "is_memory", "is_object_url", "is_directory", "shown"]

_FILE = "file://"


def is_memory(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(MEMORY)


def is_directory(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a directory of this machine (a path or ``file://PATH``)."""
    return not is_memory(location) and not is_object_url(location)


def shown(location: str | os.PathLike) -> str:
    """A location as messages show it: a directory made absolute, a URL without credentials."""
    from .checkpoint.objects import redact

    return os.path.abspath(location) if is_directory(location) else redact(os.fspath(location))


def _path(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    if text.startswith(_FILE):
        return text[len(_FILE):]
    if "://" in text:
        raise ValueError(f"checkpoint location {text!r} has an unknown scheme; give a directory path, "
                         f"file://PATH, memory://NAME or an fsspec URL (s3://BUCKET/PREFIX)")
    return text


def exists(location: str | os.PathLike) -> bool:
    """Whether something is at ``location`` already (a sink would refuse it)."""
    if is_memory(location):
        return location[len(MEMORY):] in memory_checkpoints()
    if is_object_url(location):
        return object_exists(location)
    return os.path.lexists(_path(location))


def delete(location: str | os.PathLike) -> None:
    """Remove the checkpoint at ``location`` and everything under it (nothing if absent)."""
    import shutil

    from .checkpoint.objects import delete_objects
    from .storage.memory import delete_memory_checkpoint

    if is_memory(location):
        delete_memory_checkpoint(location)
    elif is_object_url(location):
        delete_objects(location)
    else:
        shutil.rmtree(_path(location), ignore_errors=True)


def open_source(location: str | os.PathLike) -> TensorSource:
    """The committed checkpoint at ``location``, opened for reading.

    Raises:
        CheckpointError: nothing complete is there.
    """
    if is_memory(location):
        return MemorySource(location)
    if is_object_url(location):
        return ObjectSource(location)
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
    if is_object_url(location):
        return ObjectSink(location, ptc, state)  # durable once uploaded: ``sync`` has no object here
    return CheckpointWriter(_path(location), ptc, state, sync=sync)
