"""Reading samples' bytes from the source files, in place.

Source files are memory-mapped read-only, lazily, once per process: a reader pickled
into a DataLoader worker carries only the index path and reopens its maps there. Reads
are plain slices of the maps (no system call per sample), safe from many threads.
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from ..errors import ScalaiError
from .index import SampleIndex

__all__ = ["SampleReader"]


class SampleReader:
    """Bytes and tokens of samples of one :class:`SampleIndex`."""

    def __init__(self, index: SampleIndex) -> None:
        self.index = index
        self._sizes = np.array([s.size for s in index.sources], dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(index.sources)
        self._record_views: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"path": str(self.index.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(SampleIndex.open(state["path"]))

    def _map(self, f: int) -> np.ndarray:
        """uint8[size] view of source file ``f`` (mapped on first use)."""
        m = self._maps[f]
        if m is None:
            with self._lock:
                m = self._maps[f]
                if m is None:
                    m = self._maps[f] = self._open(f)
        return m

    def _open(self, f: int) -> np.ndarray:
        source = self.index.sources[f]
        if source.size == 0:
            return np.zeros(0, dtype=np.uint8)
        try:
            with open(source.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size != source.size:
                    raise ScalaiError(f"source file {source.path} changed size since the index was "
                                      f"built; rebuild the index")
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ScalaiError(f"source file {source.path} is gone; restore it or rebuild the index") from None
        return np.frombuffer(mapped, dtype=np.uint8)

    def _records(self, f: int) -> np.ndarray:
        """File ``f`` as overlapping ``V{sample_bytes}`` records, one starting at every token."""
        records = self._record_views.get(f)
        if records is None:
            mapped, sb, isz = self._map(f), self.index.sample_bytes, self.index.itemsize
            records = np.ndarray(shape=((mapped.size - sb) // isz + 1,), dtype=np.dtype((np.void, sb)),
                                 buffer=mapped, strides=(isz,))
            self._record_views[f] = records
        return records

    # -- bytes -----------------------------------------------------------------------
    def read(self, sample: int, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes ``[start, stop)`` of one sample (default: all ``sample_bytes`` of it)."""
        sb = self.index.sample_bytes
        stop = sb if stop is None else min(stop, sb)
        if start < 0:
            raise ValueError(f"byte offset {start} must be >= 0")
        if start >= stop:
            return b""
        f = int(self.index.sample_file[sample])
        offset = int(self.index.sample_offset[sample])
        if offset + stop <= self._sizes[f]:  # the common case: inside one file
            return self._map(f)[offset + start: offset + stop].tobytes()
        # A stream sample that crosses a file end: join its pieces (rare: < one per file).
        whole = b"".join(self._map(f)[o: o + n].tobytes() for f, o, n in self.index.segments(sample))
        return whole[start:stop]

    def read_range(self, samples: np.ndarray, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the concatenation of ``samples`` (int[k])."""
        sb = self.index.sample_bytes
        end = min(offset + size, len(samples) * sb)
        if offset >= end:
            return b""
        first, last = offset // sb, (end - 1) // sb + 1  # samples touched: [first, last)
        raw = self._gather(np.asarray(samples[first:last], dtype=np.int64)).reshape(-1)
        return raw[offset - first * sb: end - first * sb].tobytes()

    # -- tokens ----------------------------------------------------------------------
    def tokens(self, samples: np.ndarray) -> np.ndarray:
        """Tokens of ``samples`` (int[k]) as ``[k, seq_len + 1]`` of the index dtype."""
        index = self.index
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        raw = self._gather(samples)
        return raw.view(np.dtype(index.dtype).newbyteorder("<")).reshape(samples.size, index.seq_len + 1)

    def _gather(self, samples: np.ndarray) -> np.ndarray:
        """Bytes of ``samples`` (int64[k]) as ``uint8[k, sample_bytes]``, one copy.

        Each file's map is viewed as an array of overlapping ``sample_bytes``-wide records,
        one starting at every token (dtype ``V{sample_bytes}``, stride ``itemsize``), so one
        fancy index copies all of a file's samples with a memcpy each, in C.
        """
        index = self.index
        sb, isz = index.sample_bytes, index.itemsize
        if samples.size == 0:
            return np.empty((0, sb), dtype=np.uint8)
        files = index.sample_file[samples]  # [k] uint32
        offsets = index.sample_offset[samples].astype(np.int64)  # [k] bytes
        f0 = int(files[0])
        if (files == f0).all() and int(offsets.max()) + sb <= self._sizes[f0]:  # the common case
            return self._records(f0)[offsets // isz].view(np.uint8).reshape(samples.size, sb)
        raw = np.empty((samples.size, sb), dtype=np.uint8)
        inside = offsets + sb <= self._sizes[files]  # [k] samples that do not cross a file end
        for f in np.unique(files[inside]).tolist():
            sel = np.flatnonzero(inside & (files == f))
            raw[sel] = self._records(f)[offsets[sel] // isz].view(np.uint8).reshape(sel.size, sb)
        for j in np.flatnonzero(~inside):  # rare: a stream sample across a file end
            raw[j] = np.frombuffer(self.read(int(samples[j])), dtype=np.uint8)
        return raw
