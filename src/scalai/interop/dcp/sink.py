"""A DCP directory as a :class:`~scalai.storage.TensorSink`: chunks written in DCP's format.

What is written is what ``torch.distributed.checkpoint.save`` writes for a state dict
``{"model": {key: tensor}, "optim": {"state": {key: {"exp_avg": ..., "exp_avg_sq": ...,
"step": ...}}}}``: data files ``__<i>_0.distcp`` of back-to-back ``torch.save`` blobs, one
per chunk, and ``.metadata`` (the chunks' boxes and where their bytes are), written last.
``dcp.load`` reads it into any DTensor layout.

The chunks are the boxes the scalai checkpoint stores (:func:`stored_boxes`: each tensor's
distinct tensor-parallel pieces, replicas once), so nothing is consolidated: data-parallel
*slot* ``i`` of the sink's layout (:class:`~scalai.interop.dcp.layout.Chunks`) holds the
``i``-th chunk of every tensor, in file ``__<i>_0.distcp``. Blobs are laid out before any
data exist (:class:`~scalai.interop.dcp.torchsave.TensorBlob`); the runner ``pwrite`` s
windows into their data regions; :meth:`DcpSink.complete` reads the chunk back once for its
CRC-32 (which ``torch.load`` checks) and writes the blob's trailer. Files go into a hidden
staging directory (:mod:`scalai.checkpoint.staging`) renamed into place on commit.
"""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ...config import ParallelConfig
from ...layout.ptc import PTC
from ...layout.spec import Residence, TensorSpec
from ...regions import Region
from ...storage.base import TensorSink
from .layout import Chunks
from .metadata import DcpChunk, DcpTensor, StoredBlob, write_metadata
from .torchsave import TensorBlob

__all__ = ["DcpSink", "ExportTensor", "stored_boxes", "sink_layout"]

_CRC_BLOCK = 8 << 20


@dataclass(frozen=True)
class ExportTensor:
    """One scalai tensor to write: its spec, its DCP key and path in the nested state dict,
    and the boxes it is stored in (one chunk each)."""

    spec: TensorSpec
    key: str
    path: tuple[str, ...]
    boxes: tuple[Region, ...]


def stored_boxes(ptc: PTC) -> dict[str, tuple[Region, ...]]:
    """Per tensor, the distinct boxes of the global tensor that the ranks of ``ptc`` hold
    (without ZeRO: an optimizer tensor is cut as its parameter is), in rank order."""
    config = ptc.config
    plain = PTC(ParallelConfig(tp=config.tp, pp=config.pp, layers_per_stage=config.layers_per_stage),
                ptc.full.specs, ptc.num_layers)
    seen: dict[str, dict[Region, None]] = {s.name: {} for s in plain.specs}
    for rank in plain.config.ranks():
        for tensor, shard in plain.rank_shards(rank):
            for piece in shard.pieces:
                seen[tensor].setdefault(piece.global_region, None)
    return {name: tuple(boxes) for name, boxes in seen.items()}


def sink_layout(tensors: Sequence[ExportTensor], num_layers: int) -> PTC:
    """The layout a :class:`DcpSink` of ``tensors`` is planned into: slot ``i`` holds chunk ``i``."""
    width = max([len(t.boxes) for t in tensors] + [1])
    specs = [replace(t.spec, split=Chunks(t.boxes), residence=Residence("all")) for t in tensors]
    return PTC(ParallelConfig(dp=width), specs, num_layers)


class DcpSink(TensorSink):
    """Write the DCP directory ``out_dir`` (which must not exist yet).

    Args:
        out_dir: the directory to create.
        tensors: what to write (:class:`ExportTensor`, parameters first).
        num_layers: transformer layers (of the sink's PTC).
        steps: DCP key and nested path of each optimizer ``step`` entry, all ``step``.
        step: the optimizer's step count.
        sync: fsync files and the directory on commit.

    Raises:
        FileExistsError: ``out_dir`` exists.
    """

    zero_filled = True
    records_checksums = False

    def __init__(self, out_dir: str | os.PathLike, tensors: Sequence[ExportTensor], num_layers: int,
                 steps: Sequence[tuple[str, tuple[str, ...]]] = (), step: int = 0, sync: bool = True):
        from ...checkpoint import staging

        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.tensors, self.sync = list(tensors), sync
        self.ptc = sink_layout(self.tensors, num_layers)
        width = self.ptc.config.dp
        self._blobs: dict[tuple[int, str], tuple[str, int, TensorBlob]] = {}  # (slot, tensor) -> file, offset
        ends = [0] * width
        for t in self.tensors:
            for slot, box in enumerate(t.boxes):
                blob = TensorBlob(t.spec.dtype, box.sizes)
                self._blobs[(slot, t.spec.name)] = (_file(slot), ends[slot], blob)
                ends[slot] += blob.length
        self._steps = [(key, path, ends[0] + i * TensorBlob("float32", ()).length) for i, (key, path) in
                       enumerate(steps)]
        self._step = float(step)
        if os.path.lexists(self.out_dir):
            raise FileExistsError(f"output {out_dir} already exists; choose another directory or remove it first")
        self.staging = staging.create(self.out_dir)
        self._fds: dict[str, int] = {}
        self.committed = False
        try:
            for slot in range(width):
                self._fds[_file(slot)] = os.open(os.path.join(self.staging, _file(slot)),
                                                 os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            for file, offset, blob in self._blobs.values():
                os.pwrite(self._fds[file], blob.header, offset)
            value = np.array(self._step, np.float32).tobytes()
            for _, _, offset in self._steps:
                blob = TensorBlob("float32", ())
                os.pwrite(self._fds[_file(0)], blob.header, offset)
                self._finish(_file(0), offset, blob, value)
        except BaseException:
            self.abort()
            raise

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        file, offset, blob = self._blobs[(rank, tensor)]
        data = memoryview(data).cast("B")
        if byte_offset < 0 or byte_offset + data.nbytes > blob.nbytes:
            raise ValueError(f"write of {data.nbytes} bytes at {byte_offset} falls outside chunk {rank} of "
                             f"{tensor} ({blob.nbytes} bytes)")
        fd, at, done = self._fds[file], offset + blob.data_offset + byte_offset, 0
        while done < data.nbytes:
            done += os.pwrite(fd, data[done:], at + done)

    def complete(self, rank: int, tensor: str) -> None:
        """Read the chunk back for its CRC-32, and write its blob's CRC and trailer."""
        file, offset, blob = self._blobs[(rank, tensor)]
        self._finish(file, offset, blob, None)

    def _finish(self, file: str, offset: int, blob: TensorBlob, data: bytes | None) -> None:
        fd, crc = self._fds[file], 0
        if data is not None:
            crc = zlib.crc32(data)
            os.pwrite(fd, data, offset + blob.data_offset)
        else:
            start = offset + blob.data_offset
            for at in range(0, blob.nbytes, _CRC_BLOCK):
                crc = zlib.crc32(os.pread(fd, min(_CRC_BLOCK, blob.nbytes - at), start + at), crc)
        os.pwrite(fd, blob.crc_patch(crc), offset + blob.crc_offset)
        os.pwrite(fd, blob.trailer(crc), offset + blob.trailer_offset)

    def _index(self) -> tuple[list[DcpTensor], dict[str, tuple[str, ...]]]:
        tensors, paths = [], {}
        for t in self.tensors:
            chunks = []
            for slot, box in enumerate(t.boxes):
                file, offset, blob = self._blobs[(slot, t.spec.name)]
                chunks.append(DcpChunk(box.offsets, box.sizes, StoredBlob(file, offset, blob.length)))
            tensors.append(DcpTensor(t.key, t.spec.shape, t.spec.dtype, tuple(chunks)))
            paths[t.key] = t.path
        blob = TensorBlob("float32", ())
        for key, path, offset in self._steps:
            tensors.append(DcpTensor(key, (), "float32", (DcpChunk((), (), StoredBlob(_file(0), offset,
                                                                                     blob.length)),)))
            paths[key] = path
        return tensors, paths

    def commit(self) -> None:
        """fsync the data files, write ``.metadata`` last, rename the directory into place."""
        from ...checkpoint import staging

        if self.committed:
            return
        for fd in self._fds.values():
            if self.sync:
                os.fsync(fd)
        tensors, paths = self._index()
        write_metadata(self.staging, tensors, {}, paths, self.sync)
        self._close()
        staging.publish(self.staging, self.out_dir, self.sync)
        self.committed = True

    def _close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def abort(self) -> None:
        """Remove everything written (nothing after a commit)."""
        if self.committed:
            return
        self._close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _file(slot: int) -> str:
    return f"__{slot}_0.distcp"
