"""A DCP directory as a :class:`~scalai.storage.RangeSource`: chunks read in place, by offset.

The source presents the checkpoint in its stored layout (:class:`~scalai.interop.dcp.DcpPTC`:
data-parallel slot ``i`` of a tensor holds its ``i``-th chunk), so a plan into any scalai
layout reads each destination window from the chunks that overlap it. A read locates the
chunk's ``torch.save`` blob once (:func:`~scalai.interop.dcp.torchsave.read_tensor_record`:
the zip directory and an allow-listed ``data.pkl``, never ``torch.load``) and then
``pread`` s only the bytes of the window: a contiguous run straight into the runner's
buffer, otherwise the smallest span that holds the window; a window that is a thin
slice of its chunk (a few columns of every row: a head of a transposed ``Conv1D``)
reads the whole chunk once per worker, as the windows of one chunk come one after
another (row by row when the chunk is larger than 256 MiB). Nothing is consolidated and no code in the files
runs. A chunk read as it is stored has the CRC-32 its archive records as its checksum, so
:func:`~scalai.storage.verify.verify_source` checks it and a copy of it keeps it.
"""

from __future__ import annotations

import os
import threading
from math import prod
from typing import Any

import numpy as np

from ...dtypes import itemsize, raw_numpy
from ...errors import CheckpointError
from ...planner.plan import Window
from ...storage.base import RangeSource
from .layout import DcpLayout, SlotChunk
from .metadata import DcpIndex
from .torchsave import TensorRecord, read_object, read_tensor_record

__all__ = ["DcpSource"]

#: A span read at once may be this many times the window's bytes (or up to _SPAN_FREE).
_SPAN_FACTOR = 4
_SPAN_FREE = 1 << 20
#: A chunk read thinly (see _thin) is read whole once per worker up to this size.
_WHOLE_MAX = 256 << 20


class DcpSource(RangeSource):
    """The chunks of the DCP checkpoint in ``directory`` as scalai's tensors.

    Args:
        directory: the checkpoint directory (its data files are opened here, closed by
            :meth:`close`).
        index: its ``.metadata`` (:func:`~scalai.interop.dcp.read_index`).
        layout: its chunks as scalai tensors (:func:`~scalai.interop.dcp.dcp_layout`).
        state: the non-tensor state to hand on (a JSON object).

    Raises:
        CheckpointError: a data file cannot be opened.
    """

    block_bytes = 8 << 20
    concurrency = 4
    loads_subset = True  # as dcp.load: a job takes the tensors it has

    def __init__(self, directory: str | os.PathLike, index: DcpIndex, layout: DcpLayout,
                 state: dict | None = None):
        self.directory = os.fspath(directory)
        self.index, self.layout = index, layout
        self.ptc = layout.ptc
        self.state = dict(state or {})
        self._fds: dict[str, int] = {}
        self._records: dict[tuple[str, int], TensorRecord] = {}
        self._lock = threading.Lock()
        self._last = threading.local()  # per worker: the last chunk read whole
        try:
            for name in sorted(index.files()):
                path = os.path.join(self.directory, name)
                try:
                    self._fds[name] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"cannot open DCP data file {path}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise

    def where(self, rank: int) -> str:
        return self.directory

    def checksum(self, rank: int, tensor: str) -> int | None:
        """The CRC-32 the chunk's ``torch.save`` archive records for its bytes, when slot
        ``rank`` of ``tensor`` is that whole chunk as stored (not transposed, no rows left
        out) and the archive records one; ``None`` otherwise."""
        slot = self.layout.slots.get((rank, tensor))
        if slot is None or slot.transpose or slot.rows is not None:
            return None
        return self._record(slot).crc

    def _record(self, slot: SlotChunk) -> TensorRecord:
        blob = slot.chunk.blob
        key = (blob.file, blob.offset)
        with self._lock:
            rec = self._records.get(key)
        if rec is None:
            what = f"{os.path.join(self.directory, blob.file)} at byte {blob.offset} ({slot.key})"
            rec = read_tensor_record(self._fds[blob.file], blob, what)
            want = self.index.tensors[slot.key]
            if rec.shape != slot.chunk.sizes or rec.dtype != want.dtype:
                raise CheckpointError(f"{what} holds {rec.dtype}{list(rec.shape)}, but .metadata says "
                                      f"{want.dtype}{list(slot.chunk.sizes)}: the checkpoint is damaged")
            with self._lock:
                self._records[key] = rec
        return rec

    def read_into(self, rank: int, tensor: str, window: Window, out: np.ndarray) -> None:
        if window.view is not None:  # a flat (ZeRO) window: never on a stored chunk layout
            raise ValueError(f"{tensor}: a flattened window cannot be read from {self.directory}")
        slot = self.layout.slots.get((rank, tensor))
        if slot is None:
            if out.size:
                raise ValueError(f"{tensor}: slot {rank} of {self.directory} holds none of it")
            return
        rec = self._record(slot)
        box = window.region
        if slot.transpose:  # local (i, j) is stored (j, i)
            offsets, sizes, target = box.offsets[::-1], box.sizes[::-1], out.T
        else:
            offsets, sizes, target = box.offsets, box.sizes, out
        offsets, sizes = tuple(offsets), tuple(sizes)
        path = os.path.join(self.directory, slot.chunk.blob.file)
        if _thin(rec, sizes) and prod(rec.shape) * itemsize(rec.dtype) <= _WHOLE_MAX:
            # a few columns of every stored row (a head of a transposed Conv1D): the windows
            # of one chunk come one after another, so read it whole once per worker
            whole = self._whole(slot, rec, path)
            target[...] = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
            return
        _read_box(self._fds[slot.chunk.blob.file], rec, offsets, sizes, target, path)

    def _whole(self, slot: SlotChunk, rec: TensorRecord, path: str) -> np.ndarray:
        """The whole stored chunk, kept for the worker's next window (one chunk per worker)."""
        key = (slot.chunk.blob.file, slot.chunk.blob.offset)
        last = getattr(self._last, "value", None)
        if last is None or last[0] != key:
            whole = np.empty(rec.shape, raw_numpy(rec.dtype))
            self._last.value = None  # free the previous chunk first
            _read_box(self._fds[slot.chunk.blob.file], rec, (0,) * len(rec.shape), rec.shape, whole, path)
            last = self._last.value = (key, whole)
        return last[1]

    def object_value(self, key: str) -> Any:
        """The plain Python value stored under non-tensor ``key`` (read through the
        allow-list: numbers, strings, containers)."""
        blob = self.index.objects[key]
        return read_object(self._fds[blob.file], blob, f"{os.path.join(self.directory, blob.file)} ({key})")

    def tensor_value(self, key: str) -> np.ndarray:
        """A whole stored tensor of one chunk (a 0-d step counter, say), as a numpy array of
        its raw bits (see :func:`scalai.dtypes.raw_numpy`; ``.view`` it as its dtype)."""
        t = self.index.tensors[key]
        if len(t.chunks) != 1:
            raise ValueError(f"{key} is stored in {len(t.chunks)} chunks; read it through a plan")
        chunk = t.chunks[0]
        rec = self._record(SlotChunk(key, chunk))
        out = np.empty(chunk.sizes, raw_numpy(t.dtype))
        _read_box(self._fds[chunk.blob.file], rec, (0,) * len(chunk.sizes), chunk.sizes, out, chunk.blob.file)
        return out

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _pread_into(fd: int, buf: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(buf.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"DCP data file {path} ends at byte {offset + done}, inside a chunk; it is "
                                  f"truncated; restore it or use another checkpoint")
        done += n


def _thin(rec: TensorRecord, sizes: tuple[int, ...]) -> bool:
    """Whether a box of ``sizes`` is a thin slice of the stored chunk (the span of bytes
    that holds it is far larger than the box)."""
    need = prod(sizes)
    span = sum((n - 1) * s for n, s in zip(sizes, rec.strides)) + 1 if need else 0
    return need > 0 and span > _SPAN_FACTOR * need and span * itemsize(rec.dtype) > _SPAN_FREE


def _read_box(fd: int, rec: TensorRecord, offsets: tuple[int, ...], sizes: tuple[int, ...], out: np.ndarray,
              path: str) -> None:
    """Copy the box ``[offsets, offsets + sizes)`` of the stored tensor ``rec`` into ``out``
    (an array, or a view, of shape ``sizes``)."""
    if prod(sizes) == 0:
        return
    width = itemsize(rec.dtype)
    start = rec.start + sum(o * s for o, s in zip(offsets, rec.strides)) * width
    _read_strided(fd, start, rec.strides, sizes, width, raw_numpy(rec.dtype), out, path)


def _read_strided(fd: int, start: int, strides: tuple[int, ...], sizes: tuple[int, ...], width: int, dtype,
                  out: np.ndarray, path: str) -> None:
    """Copy the elements at byte ``start`` with element ``strides`` and shape ``sizes`` into ``out``."""
    span = sum((n - 1) * s for n, s in zip(sizes, strides)) + 1
    need = prod(sizes)
    if span == need and out.flags.c_contiguous and all(s > 0 or n == 1 for n, s in zip(sizes, strides)) \
            and list(strides) == sorted(strides, reverse=True):  # one run, straight into out
        _pread_into(fd, out, start, path)
        return
    if span > _SPAN_FACTOR * need and span * width > _SPAN_FREE and len(sizes) > 1:
        for i in range(sizes[0]):  # a thin window of a large chunk: row by row
            _read_strided(fd, start + i * strides[0] * width, strides[1:], sizes[1:], width, dtype, out[i], path)
        return
    buf = np.empty(span, dtype)
    _pread_into(fd, buf, start, path)
    out[...] = np.lib.stride_tricks.as_strided(buf, shape=sizes, strides=tuple(s * width for s in strides),
                                               writeable=False)
