"""Tensors in a process's memory as a source or sink: ``{rank: {tensor name: array}}``.

The arrays are numpy arrays (the spec's dtype, or its raw unsigned bits) or torch tensors
(exactly the spec's dtype) with each rank's local shapes. A live training job's tensors are
the source of a save and the sink of a load; the same classes hold a layout in RAM for
tests and benchmarks.

An :class:`ArraysSink` writes into the arrays in place. A torch tensor on a device (a GPU)
is filled through a host buffer of its size, copied to the device when the runner reports
the tensor complete (one tensor's buffer per worker thread at a time, not the whole state).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from ..layout.ptc import PTC
from .arrays import as_raw
from .base import ArraySink, ArraySource, copy_bytes

__all__ = ["ArraysSource", "ArraysSink"]


class _Arrays:
    """Raw views of ``{rank: {tensor: array}}`` of one layout, checked against it."""

    def __init__(self, ptc: PTC, arrays: Mapping[int, Mapping[str, Any]], side: str):
        self.ptc, self._arrays, self._side = ptc, arrays, side
        self._shapes: dict[int, dict[str, tuple[int, ...]]] = {}
        self._raw: dict[tuple[int, str], np.ndarray] = {}

    def given(self, rank: int, tensor: str) -> Any:
        try:
            return self._arrays[rank][tensor]
        except KeyError:
            raise ValueError(f"no {self._side} array for tensor {tensor} of rank {rank}; the mapping "
                             f"must hold every local tensor of ptc.rank_shards({rank})") from None

    def check_shape(self, rank: int, tensor: str, shape: tuple[int, ...]) -> None:
        shapes = self._shapes.get(rank)
        if shapes is None:
            shapes = self._shapes[rank] = {n: s.shape for n, s in self.ptc.rank_shards(rank)}
        if tuple(shape) != shapes.get(tensor):
            raise ValueError(f"{self._side} {tensor} of rank {rank} has shape {list(shape)}, its local "
                             f"shape under {self.ptc.config} is {list(shapes.get(tensor, ()))}")

    def raw(self, rank: int, tensor: str) -> np.ndarray:
        """The raw view (checked once; a device tensor is copied to host memory each time)."""
        raw = self._raw.get((rank, tensor))
        if raw is not None:
            return raw
        array = self.given(rank, tensor)
        raw = as_raw(array, self.ptc.spec(tensor).dtype, f"{self._side} {tensor} of rank {rank}")
        self.check_shape(rank, tensor, raw.shape)
        if not _on_device(array):
            self._raw[(rank, tensor)] = raw
        return raw


def _on_device(array: Any) -> bool:
    return not isinstance(array, np.ndarray) and str(getattr(array, "device", "cpu")) != "cpu"


class ArraysSource(ArraySource):
    """Local tensors in memory as a source (views, no copy; a device tensor is copied to
    host memory when read).

    Args:
        ptc: their layout.
        arrays: ``{rank: {tensor: array}}``; only the ranks and tensors a plan reads.
        state: the non-tensor state that goes with them.
        checksums: ``{(rank, tensor): CRC-32}`` where known (tensors that move unchanged
            then keep it instead of being checksummed).
    """

    def __init__(self, ptc: PTC, arrays: Mapping[int, Mapping[str, Any]], state: dict | None = None,
                 checksums: Mapping[tuple[int, str], int] | None = None):
        self.ptc, self.state = ptc, dict(state or {})
        self._arrays = _Arrays(ptc, arrays, "source")
        self._checksums = dict(checksums or {})

    def array(self, rank: int, tensor: str) -> np.ndarray:
        return self._arrays.raw(rank, tensor)

    def checksum(self, rank: int, tensor: str) -> int | None:
        return self._checksums.get((rank, tensor))


class ArraysSink(ArraySink):
    """Local tensors in memory as a sink, written in place.

    Not zero-filled (the runner zeroes what no copy covers) and keeps no checksums.
    :meth:`commit` and :meth:`abort` do nothing: the arrays are the caller's (after a
    failure they are partly overwritten).

    Args:
        ptc: their layout.
        arrays: ``{rank: {tensor: writable array}}`` (numpy, or torch on any device).
    """

    zero_filled = False
    records_checksums = False

    def __init__(self, ptc: PTC, arrays: Mapping[int, Mapping[str, Any]]):
        self.ptc = ptc
        self._arrays = _Arrays(ptc, arrays, "destination")
        self._staged: dict[tuple[int, str], np.ndarray] = {}
        self._host: dict[tuple[int, str], np.ndarray] = {}  # host arrays, checked writable
        self._lock = threading.Lock()

    def array(self, rank: int, tensor: str) -> np.ndarray:
        key = (rank, tensor)
        raw = self._host.get(key)
        if raw is not None:
            return raw
        given = self._arrays.given(rank, tensor)
        if not _on_device(given):
            raw = self._arrays.raw(rank, tensor)
            if not raw.flags.writeable:
                raise ValueError(f"destination {tensor} of rank {rank} is read-only; give writable arrays")
            self._host[key] = raw
            return raw
        with self._lock:
            staged = self._staged.get(key)
            if staged is None:
                self._arrays.check_shape(rank, tensor, tuple(given.shape))
                from ..dtypes import raw_numpy

                staged = self._staged[key] = np.empty(tuple(given.shape), raw_numpy(self.ptc.spec(tensor).dtype))
        return staged

    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        copy_bytes(self.array(rank, tensor), byte_offset, data, f"{tensor} of rank {rank}")

    def complete(self, rank: int, tensor: str) -> None:
        """Copy a device tensor's host buffer to the device and free the buffer."""
        if not self._staged:  # host arrays only (a staged tensor stays until its own complete)
            return
        with self._lock:
            staged = self._staged.pop((rank, tensor), None)
        if staged is not None:
            import torch

            target = self._arrays.given(rank, tensor)
            signed = staged.view({1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[staged.itemsize])
            target.copy_(torch.from_numpy(signed).view(target.dtype))

    def commit(self) -> None:
        if self._staged:
            raise RuntimeError(f"{len(self._staged)} device tensors were not completed")

    def abort(self) -> None:
        self._staged.clear()
