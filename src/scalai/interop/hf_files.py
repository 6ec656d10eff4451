"""A Hugging Face model directory on disk: ``config.json`` and safetensors files.

Reading: :class:`HFDirectory` opens ``config.json`` and either ``model.safetensors`` or
the shards that ``model.safetensors.index.json`` lists, parses every header strictly (the
reader of :mod:`scalai.checkpoint.safetensors_io`) and reads boxes of stored tensors with
``pread`` into the caller's buffers, a few rows at a time: no file is mapped, so reading a
model costs no more memory than the buffers the caller hands in.

Writing: :func:`shard_files` assigns tensors to files as ``save_pretrained`` does (in
order, a new file when the next tensor would pass ``max_shard_bytes``) and
:func:`index_json` is the index ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from math import prod
from typing import Any, Sequence

import numpy as np

from ..checkpoint.safetensors_io import SafetensorsReader, TensorEntry
from ..dtypes import itemsize
from ..errors import CheckpointError
from ..regions import Region
from .mapping import Foreign

__all__ = ["HFDirectory", "read_config", "read_box", "shard_files", "file_names", "index_json", "INDEX", "SINGLE",
           "CONFIG"]

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_READ_BYTES = 4 << 20  # rows read per pread, at most (a box of a few columns reads whole rows)


def _json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; a Hugging Face model directory needs {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})") from None


def read_config(path: str | os.PathLike) -> dict:
    """A ``config.json`` (a JSON object).

    Raises:
        ValueError: the file is missing or not a JSON object.
    """
    path = os.fspath(path)
    config = _json(path, CONFIG)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object; give a Hugging Face config.json")
    return config


@dataclass(frozen=True)
class _Stored:
    reader: SafetensorsReader
    entry: TensorEntry


class HFDirectory:
    """A Hugging Face model directory opened for reading (use as a context manager).

    Args:
        path: the directory.
        prefix: the base model's key prefix in the causal-LM class (default: the built-in
            family's, e.g. ``model.``); keys of a bare model (none starts with it) get it.

    Attributes:
        config: ``config.json`` as a dict.
        tensors: ``{name: Foreign(shape, dtype)}`` of every stored tensor, under the
            causal-LM class's names.

    Raises:
        ValueError: no ``config.json``, no weights, or an index naming files outside the
            directory.
        CheckpointError: a file that is missing, truncated or not safetensors, an index
            that disagrees with the files.
    """

    def __init__(self, path: str | os.PathLike, prefix: str | None = None):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ValueError(f"{self.path} is not a directory; give a Hugging Face model directory "
                             f"(config.json and safetensors files)")
        self.config = read_config(os.path.join(self.path, CONFIG))
        if prefix is None:
            from .hf_models import FAMILIES, base_prefix

            if self.config.get("model_type") in FAMILIES:
                prefix = base_prefix(self.config["model_type"])
        self._readers: list[SafetensorsReader] = []
        self._stored: dict[str, _Stored] = {}
        try:
            self._open(prefix)
        except BaseException:
            self.close()
            raise
        self.tensors = {n: Foreign(s.entry.shape, s.entry.dtype) for n, s in self._stored.items()}

    def _open(self, prefix: str | None) -> None:
        index_path = os.path.join(self.path, INDEX)
        if os.path.exists(index_path):
            index = _json(index_path, INDEX)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path} has no weight_map of tensor -> file")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.path, SINGLE)):
            weight_map, files = None, [SINGLE]
        else:
            raise ValueError(f"{self.path} holds neither {SINGLE} nor {INDEX}; scalai reads safetensors "
                             f"weights (convert .bin files with transformers' save_pretrained first)")
        for name in files:
            if os.path.basename(name) != name or name in (".", ".."):
                raise ValueError(f"{index_path} names file {name!r} outside the model directory; refused")
            reader = SafetensorsReader(os.path.join(self.path, name))
            self._readers.append(reader)
            listed = {k for k, v in weight_map.items() if v == name} if weight_map is not None else None
            if listed is not None and listed != set(reader.entries):
                odd = sorted(listed ^ set(reader.entries))[0]
                raise CheckpointError(f"{INDEX} and {name} disagree on {odd}; the directory is damaged "
                                      f"(save the model again)")
            for key, entry in reader.entries.items():
                if key in self._stored:
                    raise CheckpointError(f"{key} is stored twice ({name} and another file)")
                self._stored[key] = _Stored(reader, entry)
        if prefix and self._stored and not any(k.startswith(prefix) for k in self._stored):
            # a bare model (LlamaModel, GPT2Model): its keys as the causal-LM class names them
            self._stored = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in self._stored.items()}

    def read(self, name: str, box: Region, out: np.ndarray) -> None:
        """Copy ``box`` of stored tensor ``name`` (its own coordinates) into ``out``, a raw
        array of ``box.sizes`` (any strides)."""
        s = self._stored[name]
        read_box(s.reader.fileno(), s.entry.start, s.entry.shape, itemsize(s.entry.dtype), box, out)

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers.clear()

    def __enter__(self) -> HFDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_box(fd: int, start: int, shape: Sequence[int], size: int, box: Region, out: np.ndarray) -> None:
    """``pread`` box ``box`` of the row-major tensor at byte ``start`` of file ``fd`` into
    ``out`` (raw elements of ``size`` bytes, shape ``box.sizes``): one read when the box is
    contiguous and ``out`` too, else whole rows of dim 0 a few MiB at a time."""
    shape = tuple(shape)
    if box.volume == 0:
        return
    row = prod(shape[1:]) * size  # bytes of one index of dim 0
    full = box.sizes[1:] == shape[1:]
    if not shape or (full and out.flags.c_contiguous):
        offset = start + (box.offsets[0] * row if shape else 0)
        _pread_into(fd, offset, memoryview(out.reshape(-1).view(np.uint8)))
        return
    step = max(1, _READ_BYTES // max(row, 1))
    inner = tuple(slice(o, o + n) for o, n in zip(box.offsets[1:], box.sizes[1:]))
    buf = np.empty((min(step, box.sizes[0]), *shape[1:]), out.dtype)
    for lo in range(0, box.sizes[0], step):
        n = min(step, box.sizes[0] - lo)
        chunk = buf[:n]
        _pread_into(fd, start + (box.offsets[0] + lo) * row, memoryview(chunk.reshape(-1).view(np.uint8)))
        out[lo:lo + n] = chunk[(slice(None), *inner)]


def _pread_into(fd: int, offset: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise CheckpointError("a safetensors file ended early (it was truncated while being read)")
        view, offset = view[n:], offset + n


def shard_files(tensors: Sequence[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per file, in order: a new file when the next tensor would pass
    ``max_shard_bytes`` (a tensor larger than that gets a file of its own)."""
    files: list[list[str]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        nbytes = prod(shape) * itemsize(dtype)
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def file_names(count: int) -> list[str]:
    """``model.safetensors`` for one file, ``model-00001-of-00003.safetensors``... for several."""
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_json(files: list[list[str]], names: list[str], total_bytes: int) -> dict:
    """``model.safetensors.index.json``: total size and the file of every tensor."""
    return {"metadata": {"total_size": total_bytes},
            "weight_map": {t: f for f, members in zip(names, files) for t in members}}
