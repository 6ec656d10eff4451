"""A Hugging Face model directory as a :class:`~scalai.storage.TensorSource` and a
:class:`~scalai.storage.TensorSink`.

Both present the model in one layout: ``tp=1,pp=1,dp=1`` with every tensor whole
(:func:`whole_layout`), so a plan's windows on them are boxes of scalai's global tensors;
a :class:`~scalai.interop.rules.Mapping` turns each box into boxes of the foreign tensors
(fused parts, transposes, a padded vocabulary's real rows).

- :class:`HFSource` is a :class:`~scalai.storage.RangeSource`: each read ``pread`` s
  exactly the rows of the foreign tensors a window needs into the runner's block buffer,
  so an import holds the runner's few blocks, never a whole model. A transposed tensor
  whose windows are a few of its columns each (a head of GPT-2's ``c_attn``) is read
  whole once per worker instead of once per window.
- :class:`HFSink` writes ``save_pretrained``'s layout: safetensors files of at most
  ``max_shard_bytes`` (the index when there are several) and ``config.json``. Contiguous
  writes go to the files as they come (``pwrite``); a transposed tensor (GPT-2's
  ``Conv1D``) is assembled in memory, one tensor at a time per worker, and written when
  complete. Files are written into a hidden staging directory
  (:mod:`scalai.checkpoint.staging`: removed on an error or a signal, and by the next run
  after a kill) renamed into place on :meth:`~HFSink.commit`: a directory that appears is
  complete.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import ParallelConfig
from ..dtypes import itemsize, raw_numpy
from ..layout.ptc import PTC
from ..layout.splits import Replicate
from ..planner.plan import Window
from ..regions import Region
from ..storage.base import RangeSource, TensorSink
from .hf_files import CONFIG, INDEX, HFDirectory, file_names, index_json, shard_files
from .mapping import Mapping

__all__ = ["whole_layout", "HFSource", "HFSink"]


def whole_layout(mapping: Mapping) -> PTC:
    """The layout of a foreign checkpoint as its mapping sees it: one rank, every tensor whole."""
    specs = [replace(s, split=Replicate()) for s in mapping.specs]
    return PTC(ParallelConfig(), specs, mapping.num_layers)


class HFSource(RangeSource):
    """The tensors of a Hugging Face directory under scalai's names (see the module docstring).

    Args:
        directory: the opened directory (closed with this source).
        mapping: its tensors resolved by the rules.
    """

    block_bytes = 8 << 20
    concurrency = 4

    def __init__(self, directory: HFDirectory, mapping: Mapping, state: dict | None = None):
        self.directory, self.mapping = directory, mapping
        self.ptc = whole_layout(mapping)
        self.state = dict(state or {})
        self._last = threading.local()  # per worker: the last transposed tensor read whole

    def where(self, rank: int) -> str:
        return self.directory.path

    def read_into(self, rank: int, tensor: str, window: Window, out: np.ndarray) -> None:
        if window.view is not None:  # a flat (ZeRO) window: never on a whole-tensor layout
            raise ValueError(f"{tensor}: a flattened window cannot be read from {self.directory.path}")
        box = window.region
        for part in self.mapping[tensor].parts:
            hit = part.window(box)
            if hit is None:
                continue
            src, inside = hit
            target = out[inside.to_slices()]
            if not part.transpose:
                self.directory.read(part.key, src, target)
            elif src.sizes[1] == part.shape[1]:  # whole rows of the stored tensor
                self.directory.read(part.key, src, target.T)
            else:  # a few columns of every stored row (a head of GPT-2's c_attn): read it once
                target.T[...] = self._whole(part)[src.to_slices()]

    def _whole(self, part) -> np.ndarray:
        """The stored tensor of a transposed part, read whole once per worker: the windows
        of one tensor come one after another, each a few of its columns."""
        last = getattr(self._last, "value", None)
        if last is None or last[0] != part.key:
            dtype = raw_numpy(self.directory.tensors[part.key].dtype)
            whole = np.empty(part.shape, dtype)
            self.directory.read(part.key, Region.full(part.shape), whole)
            last = self._last.value = (part.key, whole)
        return last[1]

    def close(self) -> None:
        self.directory.close()


class HFSink(TensorSink):
    """Write a Hugging Face model directory ``out_dir`` (which must not exist yet).

    Args:
        out_dir: the directory to create.
        mapping: the scalai tensors to write and the foreign tensors each becomes.
        config: the ``config.json`` to write.
        max_shard_bytes: the largest safetensors file (as ``save_pretrained``'s
            ``max_shard_size``); a tensor larger than that gets a file of its own.
        sync: fsync files and directories on commit.

    Raises:
        FileExistsError: ``out_dir`` exists.
    """

    zero_filled = True
    records_checksums = False

    def __init__(self, out_dir: str | os.PathLike, mapping: Mapping, config: dict[str, Any],
                 max_shard_bytes: int = 5 << 30, sync: bool = True):
        from ..checkpoint import staging
        from ..checkpoint.safetensors_io import SafetensorsWriter

        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.mapping, self.config, self.sync = mapping, dict(config), sync
        self.ptc = whole_layout(mapping)
        foreign = []
        for m in mapping.tensors:
            for p in m.parts:
                shape = (p.rows, *m.spec.shape[1:])
                foreign.append((p.key, m.spec.dtype, shape[::-1] if p.transpose else shape))
        groups = shard_files(foreign, max_shard_bytes)
        self.names = file_names(len(groups))
        self.total_bytes = sum(itemsize(d) * int(np.prod(s)) for _, d, s in foreign)
        self._index = index_json(groups, self.names, self.total_bytes)
        entries = {k: (k, d, s) for k, d, s in foreign}
        if os.path.lexists(self.out_dir):
            raise FileExistsError(f"output {out_dir} already exists; choose another directory or remove it first")
        self.staging = staging.create(self.out_dir)
        self._files: dict[str, SafetensorsWriter] = {}
        self._writers: list[SafetensorsWriter] = []
        self._staged: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self.committed = False
        try:
            for name, members in zip(self.names, groups):
                w = SafetensorsWriter(os.path.join(self.staging, name), [entries[k] for k in members],
                                      {"format": "pt"})
                self._writers.append(w)
                self._files.update((k, w) for k in members)
        except BaseException:
            self.abort()
            raise

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        m = self.mapping[tensor]
        size = itemsize(m.spec.dtype)
        row = int(np.prod(m.spec.shape[1:])) * size  # bytes of one row of dim 0
        data = memoryview(data).cast("B")
        lo, hi = byte_offset, byte_offset + data.nbytes
        for p in m.parts:
            plo, phi = p.start * row, (p.start + p.rows) * row
            a, b = max(lo, plo), min(hi, phi)
            if b <= a:
                continue
            piece = data[a - lo:b - lo]
            if p.transpose:  # assembled in scalai's order, transposed when complete
                self._staging(tensor, p.key, (p.rows, *m.spec.shape[1:]), m.spec.dtype)[a - plo:b - plo] = \
                    np.frombuffer(piece, np.uint8)
            else:
                self._files[p.key].write(p.key, a - plo, piece)

    def _staging(self, tensor: str, key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        with self._lock:
            buf = self._staged.get((tensor, key))
            if buf is None:
                buf = self._staged[(tensor, key)] = np.zeros(int(np.prod(shape)) * itemsize(dtype), np.uint8)
        return buf

    def complete(self, rank: int, tensor: str) -> None:
        """Write the transposed parts of ``tensor`` assembled so far, and free them."""
        m = self.mapping[tensor]
        for p in m.parts:
            with self._lock:
                buf = self._staged.pop((tensor, p.key), None)
            if buf is None:
                continue
            ours = buf.view(raw_numpy(m.spec.dtype)).reshape(p.rows, *m.spec.shape[1:])
            self._files[p.key].write(p.key, 0, np.ascontiguousarray(ours.T))

    def commit(self) -> None:
        """Finish every file, write ``config.json`` (and the index), rename into place."""
        from ..checkpoint import staging
        from ..checkpoint.manifest import atomic_write

        if self.committed:
            return
        if self._staged:
            raise RuntimeError(f"{len(self._staged)} transposed tensors were never completed")
        for w in self._writers:
            w.finalize(self.sync)
        atomic_write(os.path.join(self.staging, CONFIG), (json.dumps(self.config, indent=2) + "\n").encode(),
                     self.sync)
        if len(self.names) > 1:
            atomic_write(os.path.join(self.staging, INDEX), (json.dumps(self._index, indent=2) + "\n").encode(),
                         self.sync)
        staging.publish(self.staging, self.out_dir, self.sync)
        self.committed = True

    def abort(self) -> None:
        """Remove everything written (nothing after a commit)."""
        if self.committed:
            return
        for w in self._writers:
            w.abort()
        self._staged.clear()
        shutil.rmtree(self.staging, ignore_errors=True)
