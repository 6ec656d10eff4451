"""A DCP directory's ``.metadata``: read safely into plain data, and written in DCP's format.

``torch.distributed.checkpoint`` (DCP) saves a state dict as one ``.metadata`` file (a pickle
of its ``Metadata`` dataclass) and data files ``__<rank>_<n>.distcp``. For every tensor the
metadata lists its global size, dtype and *chunks* (each a box: ``offsets`` and ``sizes``
in the global tensor), and for every chunk where its bytes are: a file, a byte offset and a
length (a ``torch.save`` blob of the chunk, see :mod:`scalai.interop.dcp.torchsave`).
Non-tensor values (``BytesStorageMetadata``) are ``torch.save`` blobs too.

:func:`read_index` unpickles ``.metadata`` with torch's own metadata classes but through
:func:`~scalai.interop.unpickle.restricted_loads`: only DCP's metadata classes (and the
torch dtypes, sizes and layouts they hold) can be built; anything else is refused in one
line. The result is checked strictly and turned into plain frozen data (:class:`DcpIndex`),
so nothing downstream touches torch objects. :func:`write_metadata` writes the same format
from plain data (DCP's ``finish``: a temporary file, fsync, rename).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ...dtypes import DTYPES, name_of
from ...checkpoint.manifest import atomic_write
from ...errors import CheckpointError
from ...limits import DIMS, LOCAL_TENSORS, TENSORS
from .pickles import restricted_loads

__all__ = ["StoredBlob", "DcpChunk", "DcpTensor", "DcpIndex", "read_index", "parse_metadata",
           "write_metadata", "METADATA_FILE", "is_dcp_directory"]

METADATA_FILE = ".metadata"
#: The DCP format versions this module reads (torch writes "1.0.0"; older files have none).
_MAJOR = "1."
#: Bytes of ``.metadata`` per chunk it may describe, at most (a chunk takes about 150-250
#: pickled): the file is refused before unpickling when it is larger than the chunk limit
#: (:data:`scalai.limits.LOCAL_TENSORS`) allows.
_BYTES_PER_CHUNK = 256


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """Where the ``torch.save`` bytes of one item are: ``file`` (relative to the directory),
    its byte ``offset`` and ``length``."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DcpChunk:
    """One stored chunk of a tensor: the box ``[offsets, offsets + sizes)`` of the global
    tensor, its bytes in ``blob`` (row-major in the box)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    blob: StoredBlob


@dataclass(frozen=True, slots=True)
class DcpTensor:
    """A tensor of the saved state dict: its key, global shape, dtype name and chunks."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpIndex:
    """Everything ``.metadata`` says, as plain data.

    Attributes:
        tensors: key -> :class:`DcpTensor`.
        objects: key -> blob of a non-tensor value (``BytesStorageMetadata``).
        version: DCP's format version (``None`` for files written before it had one).
    """

    tensors: Mapping[str, DcpTensor]
    objects: Mapping[str, StoredBlob]
    version: str | None

    def files(self) -> dict[str, int]:
        """Every data file the metadata refers to, with the bytes it must hold at least."""
        need: dict[str, int] = {}
        blobs = [c.blob for t in self.tensors.values() for c in t.chunks] + list(self.objects.values())
        for b in blobs:
            need[b.file] = max(need.get(b.file, 0), b.offset + b.length)
        return need


def is_dcp_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a DCP ``.metadata`` file."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_FILE))


def read_index(directory: str | os.PathLike) -> DcpIndex:
    """Read and check ``directory/.metadata`` and that every data file it names is there.

    Raises:
        CheckpointError: no ``.metadata`` (not a DCP checkpoint, or an unfinished save), a
            truncated or corrupt one, one that names code to run
            (:class:`~scalai.interop.unpickle.UnsafePickleError`), or a data file that is
            missing or shorter than the metadata says.
        LimitError: more tensors or chunks than :mod:`scalai.limits` allows (checked
            from the file's size before unpickling, then from what it holds).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            LOCAL_TENSORS.check(size // _BYTES_PER_CHUNK, f"DCP metadata {path} ({size:,} bytes, about one "
                                                           f"chunk, a (rank, tensor) pair, per {_BYTES_PER_CHUNK})")
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {METADATA_FILE}: it is not a PyTorch DCP checkpoint, "
                              f"or its save did not finish; give a complete checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not DCP metadata") from None
    index = parse_metadata(data, what=path)
    _check_files(directory, index)
    return index


def _check_files(directory: str, index: DcpIndex) -> None:
    for name, need in sorted(index.files().items()):
        path = os.path.join(directory, name)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointError(f"DCP data file {path} is missing ({METADATA_FILE} refers to it); "
                                  f"restore it or use another checkpoint") from None
        if size < need:
            raise CheckpointError(f"DCP data file {path} has {size} bytes but {METADATA_FILE} places data "
                                  f"up to byte {need}: it is truncated; restore it or use another checkpoint")


def _allowed() -> dict[tuple[str, str], Any]:
    """The globals a DCP ``.metadata`` may refer to: DCP's own metadata classes, torch sizes,
    dtypes and layouts, and paths (kept as pure paths: nothing touches the filesystem)."""
    import pathlib

    import torch
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout)):
            allowed[("torch", name)] = value
    allowed[("torch.serialization", "_get_layout")] = _layout_by_name
    for cls in ("PosixPath", "PurePosixPath"):
        allowed[("pathlib", cls)] = pathlib.PurePosixPath
    for cls in ("WindowsPath", "PureWindowsPath"):
        allowed[("pathlib", cls)] = pathlib.PureWindowsPath
    return allowed


def _layout_by_name(name: str) -> Any:
    """What ``torch.serialization._get_layout`` returns, for torch's own layouts only."""
    import torch

    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise ValueError(f"unknown tensor layout {name!r}")
    return value


def parse_metadata(data: bytes, what: str = METADATA_FILE) -> DcpIndex:
    """The :class:`DcpIndex` of a ``.metadata`` pickle (pure apart from the unpickling).

    Raises:
        CheckpointError: see :func:`read_index`.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                       TensorStorageMetadata)

    md = restricted_loads(data, _allowed(), what=what)

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{what} is not valid DCP metadata: {msg}; restore it or save the checkpoint again")

    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise bad(f"it holds a {type(md).__name__}, not a Metadata")
    version = getattr(md, "version", None)
    if version is not None and (not isinstance(version, str) or not version.startswith(_MAJOR)):
        raise CheckpointError(f"{what} has DCP format version {version!r}; scalai reads version 1.x: "
                              f"convert it with the torch that wrote it")
    storage = getattr(md, "storage_data", None)
    if not isinstance(storage, dict):
        raise bad("it has no storage_data (where each chunk's bytes are)")
    where: dict[tuple[str, tuple[int, ...] | None], StoredBlob] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(f"a storage_data entry is {type(index).__name__} -> {type(info).__name__}")
        offset = None if index.offset is None else _ints(index.offset, f"the offset of {index.fqn!r}", bad)
        where[(str(index.fqn), offset)] = _blob(info, index.fqn, bad, what)
    tensors: dict[str, DcpTensor] = {}
    objects: dict[str, StoredBlob] = {}
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise bad(f"a key is a {type(key).__name__}, not a string")
        if isinstance(entry, BytesStorageMetadata):
            blob = where.get((key, None))
            if blob is None:
                raise bad(f"{key!r} has no storage entry")
            objects[key] = blob
        elif isinstance(entry, TensorStorageMetadata):
            tensors[key] = _tensor(key, entry, where, bad)
        else:
            raise bad(f"{key!r} is described by a {type(entry).__name__}")
    TENSORS.check(len(tensors), f"DCP checkpoint {what}")
    LOCAL_TENSORS.check(sum(len(t.chunks) for t in tensors.values()),
                        f"DCP checkpoint {what} (one (rank, tensor) pair per chunk)")
    return DcpIndex(tensors, objects, version)


def _ints(value: Any, what: str, bad) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        raise bad(f"{what} is not a sequence of integers") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise bad(f"{what} {list(out)} is not a sequence of non-negative integers")
    return out


def _blob(info: Any, fqn: str, bad, what: str) -> StoredBlob:
    path, offset, length = info.relative_path, info.offset, info.length
    if not isinstance(path, str) or not path or "\0" in path or os.path.isabs(path) \
            or any(p in ("..", "") for p in path.replace("\\", "/").split("/")):
        raise bad(f"{fqn!r} is stored at {path!r}, which is not a file inside the checkpoint directory")
    for v, name in ((offset, "offset"), (length, "length")):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(f"{fqn!r} has a stored {name} {v!r}")
    transforms = getattr(info, "transform_descriptors", None)
    if transforms:
        raise CheckpointError(f"{what}: {fqn!r} is stored through stream transforms {list(transforms)} "
                              f"(e.g. compression), which scalai does not read; save without them")
    return StoredBlob(path, offset, length)


def _tensor(key: str, entry: Any, where, bad) -> DcpTensor:
    shape = _ints(entry.size, f"the size of {key!r}", bad)
    DIMS.check(len(shape), f"DCP tensor {key!r}")
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    try:
        dtype_name = name_of(dtype)
    except ValueError:
        raise CheckpointError(f"DCP tensor {key!r} has dtype {dtype}, which scalai does not handle "
                              f"(supported: {', '.join(DTYPES)})") from None
    if not isinstance(entry.chunks, list):
        raise bad(f"the chunks of {key!r} are not a list")
    chunks = []
    for i, chunk in enumerate(entry.chunks):
        offsets = _ints(getattr(chunk, "offsets", None), f"chunk {i} of {key!r}", bad)
        sizes = _ints(getattr(chunk, "sizes", None), f"chunk {i} of {key!r}", bad)
        if len(offsets) != len(shape) or len(sizes) != len(shape) \
                or any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise bad(f"chunk {i} of {key!r} (offsets {list(offsets)}, sizes {list(sizes)}) lies outside "
                      f"its size {list(shape)}")
        blob = where.get((key, offsets))
        if blob is None:
            raise bad(f"chunk {i} of {key!r} at {list(offsets)} has no storage entry")
        chunks.append(DcpChunk(offsets, sizes, blob))
    return DcpTensor(key, shape, dtype_name, tuple(chunks))


# -- writing --------------------------------------------------------------------------

def write_metadata(directory: str, tensors: Iterable[DcpTensor], objects: Mapping[str, StoredBlob],
                   planner_data: Mapping[str, tuple[str, ...]] | None = None, sync: bool = True) -> None:
    """Write ``directory/.metadata`` in DCP's format (atomically: a temporary file, fsync,
    rename), describing ``tensors`` and the non-tensor ``objects``.

    ``planner_data`` maps each key to its path in the nested state dict (what DCP's own
    planner records, e.g. ``"model.w" -> ("model", "w")``); loaders that rebuild a nested
    dict from the checkpoint alone use it.
    """
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    from ...dtypes import torch_dtype

    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for t in tensors:
        chunks = []
        for i, c in enumerate(t.chunks):
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)))
            storage[MetadataIndex(t.key, c.offsets, i)] = _StorageInfo(c.blob.file, c.blob.offset, c.blob.length)
        state[t.key] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype(t.dtype)), torch.Size(t.shape),
                                             chunks)
    for key, blob in objects.items():
        state[key] = BytesStorageMetadata()
        storage[MetadataIndex(key)] = _StorageInfo(blob.file, blob.offset, blob.length)
    md = Metadata(state_dict_metadata=state, planner_data=dict(planner_data or {}), storage_data=storage,
                  storage_meta=StorageMeta(), version="1.0.0")
    atomic_write(os.path.join(directory, METADATA_FILE), pickle.dumps(md), sync)
