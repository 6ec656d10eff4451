"""What a plan reads from and writes into: declared tensor sources and sinks.

A :class:`~scalai.planner.Plan` names tensors by (rank, tensor name) and windows of their
local arrays; :func:`~scalai.storage.run_plan` moves the bytes. It never asks a storage
what it can do: every source and sink says it in its type.

Sources (the old layout's tensors):

- :class:`ArraySource`: every local tensor is an addressable array (RAM, or a file
  mapping). Reads are views: no byte is copied before it reaches the sink.
  :class:`FileSource`: moreover each tensor is a byte range of a file.
- :class:`RangeSource`: reads copy a window's elements out of a medium that cannot be
  addressed (an HTTP store, an object store), one blocking call per block of at most
  ``block_bytes``, from up to ``concurrency`` worker threads.
- :class:`AsyncRangeSource`: the same with coroutines, run on an event loop (a peer store
  read from inside a store's server).

A source whose ranks live on different media (a store cluster: this host's ranks mapped,
the others' read over the network) routes each rank to one of those with :meth:`part`.

Sinks (the new layout's tensors):

- :class:`TensorSink`: contiguous byte ranges of a tensor are written with :meth:`write`
  (``pwrite`` into a file, an upload part); strided windows are assembled in a buffer first.
- :class:`ArraySink`: its tensors are also writable arrays, so strided windows are copied
  in place, and what a plan wrote can be read back (a host fan-out reads it).
  :class:`FileSink`: moreover each tensor is a byte range of a file, so a whole tensor of a
  :class:`FileSource` is copied file to file inside the kernel. :class:`PackedFileSink`:
  moreover a rank's tensors lie one after the other in one file, so whole tensors
  consecutive in both files are copied by one kernel call.

A sink declares ``zero_filled`` (elements no copy writes read as zero: fresh files, fresh
RAM) and ``records_checksums`` (it keeps a CRC-32 per tensor: the runner hands it the CRC
of every block it writes, and declares the source's CRC for a tensor that moves unchanged).

Call order of a sink: ``prepare(ranks)`` once, then ``write``/``array`` calls on disjoint
regions from any number of threads, ``complete(rank, tensor)`` once per tensor when all
its copies are written, then ``commit`` (every byte visible at once, atomically) or
``abort`` (nothing left behind). ``run_plan`` calls ``prepare``, the writes and
``complete``; whoever made the sink calls ``commit`` or ``abort``, since what a commit
records (a manifest, a version) is theirs. A source is opened by its constructor, read from
any number of threads, and closed with ``close`` (sources and sinks are context managers;
leaving a sink's ``with`` block without a commit aborts it).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np

from ..config import Placement
from ..dtypes import raw_numpy
from ..layout.ptc import PTC
from ..planner.plan import Window
from ..regions import Region

__all__ = ["TensorSource", "ArraySource", "FileSource", "RangeSource", "StreamingSource", "AsyncRangeSource",
           "TensorSink", "ArraySink", "FileSink", "PackedFileSink", "copy_bytes", "same_tensors"]


class TensorSource(ABC):
    """Stored tensors of one layout, read by windows of their local arrays.

    Attributes:
        ptc: the layout the tensors are stored in (rank ``r`` holds ``ptc.rank_shards(r)``).
        state: the non-tensor state stored with them (a JSON object; ``{}`` for live tensors).
        placement: the hosts its ranks' bytes live on, when that matters to a plan (per-host
            stores: read each replica from the reader's own host); ``None`` otherwise.
        loads_subset: a loader may take only the tensors it needs and leave the others (a
            foreign checkpoint, as its own loader does: DCP's ``load`` reads what the
            state dict asks for); ``False``: a tensor the destination lacks is an error
            (a scalai checkpoint of another model).
    """

    ptc: PTC
    state: dict
    placement: Placement | None = None
    loads_subset: bool = False

    def checksum(self, rank: int, tensor: str) -> int | None:
        """The CRC-32 recorded for the whole local tensor, or ``None`` (not recorded)."""
        return None

    def stored(self, rank: int) -> list[str]:
        """The tensors whose bytes ``rank`` holds itself (a replica stored once is held by
        one rank; the others read it from there). Default: all of them."""
        return [name for name, _ in self.ptc.rank_shards(rank)]

    def stored_in(self, rank: int, tensor: str) -> int:
        """The rank whose own bytes hold ``rank``'s ``tensor`` (see :meth:`stored`);
        default: ``rank`` itself."""
        return rank

    def where(self, rank: int) -> str:
        """Where ``rank``'s tensors are stored, for messages (a file path, a store)."""
        return f"rank {rank}"

    def part(self, rank: int) -> TensorSource:
        """The source that reads ``rank``'s tensors: ``self``, or for a source that spans
        several media (a store cluster), the one holding that rank."""
        return self

    def read_window(self, rank: int, tensor: str, window: Window | None = None) -> np.ndarray:
        """A raw copy of the elements ``window`` selects from ``rank``'s ``tensor`` (default: the
        whole local tensor), whatever the medium (for inspection and tests; plans go
        through :func:`~scalai.storage.run_plan`)."""
        if window is None:
            window = Window(Region.full(dict(self.ptc.rank_shards(rank))[tensor].shape))
        part = self.part(rank)
        if isinstance(part, ArraySource):
            return np.array(window.select(part.array(rank, tensor)))
        out = np.empty(window.shape, raw_numpy(self.ptc.spec(tensor).dtype))
        if isinstance(part, AsyncRangeSource):
            asyncio.run(part.read_into(rank, tensor, window, out))
        else:
            part.read_into(rank, tensor, window, out)
        return out

    def close(self) -> None:
        """Release files and connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(TensorSource):
    """A source whose local tensors are addressable arrays: reads are views, zero-copy."""

    @abstractmethod
    def array(self, rank: int, tensor: str) -> np.ndarray:
        """Read-only raw array (the dtype's unsigned bits, local shape) of ``tensor`` on ``rank``."""


class FileSource(ArraySource):
    """An :class:`ArraySource` whose local tensors are contiguous byte ranges of files (a
    checkpoint directory): whole tensors can be copied file to file inside the kernel."""

    @abstractmethod
    def file_range(self, rank: int, tensor: str) -> tuple[int, int]:
        """``(file descriptor, byte offset)`` where ``rank``'s ``tensor`` starts (row-major,
        ``nbytes`` contiguous bytes); the descriptor stays open until :meth:`close`."""

    def file_path(self, rank: int, tensor: str) -> str | None:
        """The name of the file :meth:`file_range` opens for ``rank``'s ``tensor``, for a
        sink that may link it (:meth:`FileSink.link_from`); ``None`` (the default): none."""
        return None


class RangeSource(TensorSource):
    """A source read by copying windows out (blocking calls, from worker threads).

    Attributes:
        block_bytes: the largest read worth one call (the runner cuts windows to it).
        concurrency: reads in flight that pay off (e.g. parallel HTTP connections).
        coalesce: a request costs more than its bytes (an object store): the runner hands
            small windows of one rank over together (:meth:`read_many`). Off for media where
            a read is a ``pread`` (packing would only hold more destination tensors half
            written at once).
    """

    block_bytes: int = 8 << 20
    concurrency: int = 8
    coalesce: bool = False

    @abstractmethod
    def read_into(self, rank: int, tensor: str, window: Window, out: np.ndarray) -> None:
        """Copy the elements ``window`` selects from ``rank``'s ``tensor`` into ``out``
        (a C-contiguous raw array of shape ``window.shape``)."""

    def read_many(self, rank: int, reads: Sequence[tuple[str, Window, np.ndarray]]) -> None:
        """:meth:`read_into` for several ``(tensor, window, out)`` of ``rank`` at once: the
        runner's small blocks of one rank, in the rank's tensor order, at most
        ``block_bytes`` in all. Default: one call each; a medium where a request costs more
        than its bytes (an object store) fetches neighbouring windows together."""
        for tensor, window, out in reads:
            self.read_into(rank, tensor, window, out)


class StreamingSource(RangeSource):
    """A :class:`RangeSource` that plans read by pieces (:mod:`scalai.storage.pieces`): the
    runner hands over every window it reads from it at once (:meth:`pieces`) and runs each
    piece, one request streamed into the windows it serves (:meth:`read_piece`); the files
    it is told to check (:meth:`read_whole`) are read whole, every stored tensor checked
    against its CRC-32 as its bytes pass (:meth:`check` checks the rest of a rank's). For a
    medium where a request costs far more than its bytes (an object store)."""

    @abstractmethod
    def pieces(self, reads: Sequence[tuple[int, str, Window]]) -> list:
        """The requests (:class:`~scalai.storage.pieces.Piece`)
        that fetch every ``(rank, tensor, window)`` a plan reads from it. Pure."""

    @abstractmethod
    def read_piece(self, piece, out: Callable[[int], np.ndarray] | None,
                   done: Callable[[int], None] | None) -> None:
        """Fetch ``piece``; the bytes of read ``i`` (an index
        into the reads given to :meth:`pieces`) go into ``out(i)`` (uint8, called at
        its first byte), and ``done(i)`` is called once they are all there."""

    @abstractmethod
    def read_whole(self, ranks: Sequence[int]) -> None:
        """Read these ranks' files whole whenever a plan reads
        from them (so that every tensor in them is checked on the way)."""

    @abstractmethod
    def check(self, rank: int) -> None:
        """Check every stored tensor of ``rank`` that did not
        pass whole yet (reading what is left)."""


class AsyncRangeSource(TensorSource):
    """A :class:`RangeSource` whose reads are coroutines, awaited on the runner's event loop
    (``coalesce`` and :meth:`read_many` as there)."""

    block_bytes: int = 4 << 20
    concurrency: int = 8
    coalesce: bool = False

    @abstractmethod
    async def read_into(self, rank: int, tensor: str, window: Window, out: np.ndarray) -> None:
        """As :meth:`RangeSource.read_into`, awaited."""

    async def read_many(self, rank: int, reads: Sequence[tuple[str, Window, np.ndarray]]) -> None:
        """As :meth:`RangeSource.read_many`, awaited (default: one read after the other)."""
        for tensor, window, out in reads:
            await self.read_into(rank, tensor, window, out)


class TensorSink(ABC):
    """Tensors of one layout being written (see the module docstring for the call order).

    Attributes:
        ptc: the layout written; plans write into exactly the (rank, tensor) pairs for
            which :meth:`stores` is true (a sink that keeps each replica once declares it
            there and is planned into with ``ptc.stored_replicas()``).
        zero_filled: elements that no copy writes read as zero.
        records_checksums: the sink keeps a CRC-32 per tensor.
        in_order: the sink holds less when filled in the order of its files (it streams
            them out in parts): the runner then starts tasks in destination order (rank,
            tensor, window) instead of largest first.
        timings: seconds of the parts of its commit, once committed (``checksum``: reading
            back what had no CRC; ``sync``: making it durable and visible).
    """

    ptc: PTC
    zero_filled: bool = True
    records_checksums: bool = True
    in_order: bool = False
    timings: dict[str, float] = {}

    def stores(self, rank: int, tensor: str) -> bool:
        """Whether this sink holds ``rank``'s ``tensor`` itself."""
        return True

    def prepare(self, ranks: Sequence[int]) -> None:
        """Allocate what the given ranks' tensors need, before any write."""

    @abstractmethod
    def write(self, rank: int, tensor: str, byte_offset: int, data, crc: int | None = None) -> None:
        """Write the bytes of ``data`` (a C-contiguous buffer) at ``byte_offset`` of
        ``rank``'s local ``tensor``; ``crc``: their CRC-32, when the caller has it."""

    def declare_checksum(self, rank: int, tensor: str, crc: int) -> None:
        """The whole tensor will have CRC-32 ``crc`` once written (it moves unchanged from
        a source that records it): the sink records it without reading the tensor."""

    def complete(self, rank: int, tensor: str) -> None:
        """Every copy into ``rank``'s ``tensor`` is written (start writing it back, free
        its staging buffer, move it to its device...)."""

    @abstractmethod
    def commit(self) -> None:
        """Make everything written visible at once, atomically."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written; nothing that looks complete remains."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


class ArraySink(TensorSink):
    """A sink whose tensors are writable arrays (RAM, or a writable file mapping)."""

    @abstractmethod
    def array(self, rank: int, tensor: str) -> np.ndarray:
        """Writable raw array (local shape) of ``rank``'s ``tensor``; what is written through
        it has no CRC yet (a sink that records checksums computes it at commit)."""

    def written(self, rank: int, tensor: str) -> np.ndarray:
        """The array for reading back what was written (a host fan-out's source)."""
        return self.array(rank, tensor)


class FileSink(ArraySink):
    """An :class:`ArraySink` whose tensors are contiguous byte ranges of files: the runner
    hands it whole source tensors to copy file to file inside the kernel.

    Attributes:
        links: :meth:`link_from` may link a whole source file (a medium of one file per
            tensor); the runner offers it the tensors that move unchanged.
    """

    links: bool = False

    @abstractmethod
    def copy_from(self, rank: int, tensor: str, byte_offset: int, fd: int, offset: int, nbytes: int,
                  crc: int | None) -> bool:
        """Copy ``nbytes`` bytes of file ``fd`` from ``offset`` to ``byte_offset`` of
        ``rank``'s ``tensor`` (``crc``: their CRC-32, when known). Returns ``False``, having
        written nothing, when the kernel cannot copy between these files (then the runner
        writes the bytes with :meth:`write`)."""

    def link_from(self, rank: int, tensor: str, path: str, fd: int, offset: int, nbytes: int, crc: int) -> bool:
        """Make ``rank``'s whole ``tensor`` the source file itself (``fd``, named ``path``),
        whose ``nbytes`` bytes from ``offset`` are exactly that tensor's (CRC-32 ``crc``),
        without copying a byte (a hard link), where this sink's medium and format allow it
        and nothing was written into the tensor yet. Returns ``False``, nothing done,
        otherwise (the default): the runner then copies. A sink that links must never write
        into the file afterwards."""
        return False


class PackedFileSink(FileSink):
    """A :class:`FileSink` whose rank's tensors lie one after the other in one file (a
    checkpoint's rank file): whole tensors that are consecutive in a source file and in this
    sink's file are copied by one :meth:`copy_tensors` call instead of one call each."""

    @abstractmethod
    def start_of(self, rank: int, tensor: str) -> int:
        """Byte offset of ``rank``'s ``tensor`` in its file."""

    @abstractmethod
    def copy_tensors(self, rank: int, tensors: Sequence[tuple[str, int | None]], fd: int, offset: int) -> bool:
        """Copy whole tensors of ``rank``, consecutive in its file (in that order), from file
        ``fd`` at ``offset``, where their bytes lie one after the other, in one kernel copy;
        ``tensors``: ``(name, its CRC-32 when known)``. ``False``, nothing written, where the
        kernel cannot copy between these files.

        Raises:
            ValueError: the tensors are not consecutive in ``rank``'s file.
        """


def copy_bytes(array: np.ndarray, byte_offset: int, data, what: str = "tensor") -> None:
    """Copy the bytes of ``data`` (a contiguous buffer) into the C-contiguous ``array`` at
    ``byte_offset``: an :class:`ArraySink`'s :meth:`~TensorSink.write`."""
    if not array.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; a sink's arrays must be")
    flat = array.reshape(-1).view(np.uint8)
    src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    if byte_offset < 0 or byte_offset + src.nbytes > flat.nbytes:
        raise ValueError(f"write of {src.nbytes} bytes at {byte_offset} falls outside {what} "
                         f"({flat.nbytes} bytes)")
    flat[byte_offset:byte_offset + src.nbytes] = src


def same_tensors(a: PTC, b: PTC) -> bool:
    """Whether two PTCs describe the same layout of the same tensors (replica views aside)."""
    a, b = a.full, b.full
    return a is b or (a.config == b.config and a.num_layers == b.num_layers and a.specs == b.specs)
