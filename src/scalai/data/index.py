"""The sample index: for every sample, the file and byte range it is read from.

A sample is a window of ``seq_len + 1`` tokens (inputs and the next-token targets);
consecutive samples overlap by one token, as in nanoGPT and Megatron's GPT dataset, so
sample ``i`` of a stream starts at token ``i * seq_len``. Two packings:

``stream`` (default)
    The inputs are one token stream, in order; a sample may continue from the end of
    one file into the next.
``document``
    Samples never cross a document (a file, or a Megatron document); each document's
    last ``(tokens - 1) % seq_len`` tokens are dropped.

On disk an index is a directory::

    index.json         format, version, seq_len, dtype, packing, the source files
    sample_file.npy    uint32[num_samples]: source file of each sample's first byte
    sample_offset.npy  uint64[num_samples]: byte offset of that first byte in the file

A sample's bytes are ``sample_bytes = (seq_len + 1) * itemsize`` bytes from there, going
on at byte 0 of the following files when a ``stream`` sample crosses a file end. Building
writes into a temporary directory and renames it into place, so a reader never sees a
half-written index; the arrays are filled in chunks (memory stays bounded whatever the
corpus size) and nothing loops in Python per sample.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..bounded import open_regular, read_json
from ..errors import ScalaiError
from ..validate import integer
from .sources import TOKEN_DTYPES, SourceFile, discover, documents, fingerprint

__all__ = ["SampleIndex", "build_index", "INDEX_FORMAT", "INDEX_VERSION", "PACKINGS", "MAX_INDEX_JSON_BYTES"]

INDEX_FORMAT = "scalai-data-index"
INDEX_VERSION = 1
PACKINGS = ("stream", "document")
#: Largest index.json read (it lists the source files: some 200 bytes each).
MAX_INDEX_JSON_BYTES = 256 << 20
_MAX_NPY_HEADER = 64 << 10  # numpy writes some 120 bytes
_CHUNK = 1 << 20  # samples per vectorized chunk: ~24 MiB of temporaries


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """An opened index (arrays memory-mapped, nothing else read)."""

    path: Path
    seq_len: int
    dtype: str
    packing: str
    sources: tuple[SourceFile, ...]
    sample_file: np.ndarray  # uint32[num_samples]
    sample_offset: np.ndarray  # uint64[num_samples], bytes

    @property
    def num_samples(self) -> int:
        return int(self.sample_file.shape[0])

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample: ``(seq_len + 1) * itemsize``."""
        return (self.seq_len + 1) * self.itemsize

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.sources)

    def segments(self, sample: int) -> list[tuple[int, int, int]]:
        """``(file, byte offset, byte count)`` pieces of one sample, in order."""
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} is outside the index (0..{self.num_samples - 1})")
        f, offset, left = int(self.sample_file[sample]), int(self.sample_offset[sample]), self.sample_bytes
        if f < len(self.sources) and offset > self.sources[f].size:
            raise ScalaiError(f"sample {sample} starts at byte {offset} of {self.sources[f].path}, past its "
                              f"end; the index {self.path} is corrupt: rebuild it")
        pieces = []
        while left > 0:
            if f >= len(self.sources):
                raise ScalaiError(f"sample {sample} runs past the last source file; the index {self.path} "
                                  f"is corrupt: rebuild it")
            take = min(left, self.sources[f].size - offset)
            if take > 0:
                pieces.append((f, offset, take))
                left -= take
            f, offset = f + 1, 0
        return pieces

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> SampleIndex:
        """Open an index directory; checks every source file's size (``verify``: fingerprint too).

        ``index.json`` is parsed strictly (bounded JSON, every field checked) and the arrays
        must be 1-d ``uint32``/``uint64`` of ``num_samples`` entries; anything else is a
        :class:`~scalai.errors.ScalaiError` naming the file and saying to rebuild.
        """
        path = Path(path)
        meta_path = path / "index.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{path} is not a scalai data index (no index.json); "
                                    f"build one with 'scalai data index INPUTS... {path} --seq-len N'")
        meta = read_json(meta_path, MAX_INDEX_JSON_BYTES, "index file", error=ScalaiError,
                         hint="; rebuild the index")
        seq_len, dtype, packing, n, sources = _parse_meta(meta, meta_path)
        for s in sources:
            try:
                size = os.stat(s.path).st_size
            except FileNotFoundError:
                raise ScalaiError(f"source file {s.path} of index {path} is gone; restore it or "
                                  f"rebuild the index") from None
            except OSError as exc:
                raise ScalaiError(f"source file {s.path} of index {path} cannot be read ({exc.strerror}); "
                                  f"restore it or rebuild the index") from None
            if size != s.size or (verify and fingerprint(s.path, size) != s.fingerprint):
                raise ScalaiError(f"source file {s.path} changed since index {path} was built "
                                  f"({s.size} -> {size} bytes); rebuild the index")
        sample_file = _load_array(path / "sample_file.npy", np.uint32, n)
        sample_offset = _load_array(path / "sample_offset.npy", np.uint64, n)
        return cls(path=path, seq_len=seq_len, dtype=dtype, packing=packing, sources=sources,
                   sample_file=sample_file, sample_offset=sample_offset)


def _parse_meta(meta: object, where: Path) -> tuple[int, str, str, int, tuple[SourceFile, ...]]:
    """``(seq_len, dtype, packing, num_samples, sources)`` of a parsed ``index.json``."""
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ScalaiError(f"{where} is not a scalai data index (format={found!r:.40})")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ScalaiError(f"{where} has version {version!r:.40}, not a positive integer; rebuild the index")
    if version > INDEX_VERSION:
        raise ScalaiError(f"{where.parent} is index version {version}, newer than this "
                          f"scalai reads ({INDEX_VERSION}); upgrade scalai")
    try:
        seq_len = integer("seq_len", meta.get("seq_len"), 1, hint=" (tokens per sample)")
        n = integer("num_samples", meta.get("num_samples"), 1)
        if meta.get("dtype") not in TOKEN_DTYPES or meta.get("packing") not in PACKINGS:
            raise ValueError(f"dtype {meta.get('dtype')!r:.20} or packing {meta.get('packing')!r:.20} is "
                             f"not known (dtypes: {', '.join(TOKEN_DTYPES)}; packings: {', '.join(PACKINGS)})")
        if not isinstance(meta.get("sources"), list) or not meta["sources"]:
            raise ValueError("sources is not a non-empty list")
        sources = tuple(SourceFile.from_json(s) for s in meta["sources"])
        if any(s.dtype != meta["dtype"] for s in sources):
            raise ValueError(f"a source's dtype differs from the index's {meta['dtype']}")
    except ValueError as exc:
        raise ScalaiError(f"{where} is invalid: {exc}; rebuild the index") from None
    return seq_len, meta["dtype"], meta["packing"], n, sources


def _check_npy_head(path: Path, head: bytes, size: int) -> None:
    """Refuse a .npy file whose magic, version or header length is not plausible, before
    numpy reads (and allocates) a header of whatever length the file claims."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2, 3):
        raise ScalaiError(f"{path} is not a .npy array (no NUMPY magic and version); rebuild the index")
    start, length = (10, int.from_bytes(head[8:10], "little")) if head[6] == 1 else \
        (12, int.from_bytes(head[8:12], "little"))
    if length > _MAX_NPY_HEADER or start + length > size:
        raise ScalaiError(f"{path} claims a {length}-byte header in a {size}-byte file; it is damaged: "
                          f"rebuild the index")


def _load_array(path: Path, dtype, n: int) -> np.ndarray:
    """The memory-mapped 1-d ``dtype[n]`` array of an index, or a ScalaiError naming the file."""
    try:
        fd = open_regular(path, "index array", ScalaiError, "; rebuild the index")  # no FIFO hang
        try:
            size, head = os.fstat(fd).st_size, os.pread(fd, 12, 0)
        finally:
            os.close(fd)
        _check_npy_head(path, head, size)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ScalaiError(f"{path} is missing; rebuild the index") from None
    except ScalaiError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's header parser fails in many ways on damaged files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ScalaiError(f"{path} is not a readable .npy array ({reason}); rebuild the index") from None
    if array.dtype != np.dtype(dtype) or array.shape != (n,):
        raise ScalaiError(f"{path} holds {array.dtype}{list(array.shape)}, the index needs {np.dtype(dtype)}[{n}] "
                          f"(index.json says {n} samples); rebuild the index")
    return array


def _stream_starts(sources: Sequence[SourceFile], seq_len: int) -> tuple[int, Callable]:
    """Sample count and a chunk function for the ``stream`` packing."""
    first = np.concatenate([[0], np.cumsum([s.tokens for s in sources], dtype=np.int64)])  # [F + 1]
    total = int(first[-1])
    count = (total - 1) // seq_len if total > seq_len else 0
    itemsize = sources[0].itemsize

    def chunk(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.arange(lo, hi, dtype=np.int64) * seq_len  # [k] global token of each sample
        f = np.searchsorted(first, start, side="right") - 1  # [k]; skips empty files
        return f, (start - first[f]) * itemsize

    return count, chunk


def _document_starts(sources: Sequence[SourceFile], seq_len: int) -> tuple[int, Callable]:
    """Sample count and a chunk function for the ``document`` packing."""
    parts = [documents(s) for s in sources]
    doc_file = np.concatenate([np.full(len(p[0]), i, dtype=np.int64) for i, p in enumerate(parts)])
    doc_first = np.concatenate([p[0] for p in parts])  # [D] first token in its file
    per_doc = np.maximum(np.concatenate([p[1] for p in parts]) - 1, 0) // seq_len  # [D]
    before = np.concatenate([[0], np.cumsum(per_doc)])  # [D + 1] samples before each doc
    itemsize = sources[0].itemsize

    def chunk(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        sample = np.arange(lo, hi, dtype=np.int64)  # [k]
        doc = np.searchsorted(before, sample, side="right") - 1  # [k]; skips docs without samples
        token = doc_first[doc] + (sample - before[doc]) * seq_len  # [k]
        return doc_file[doc], token * itemsize

    return int(before[-1]), chunk


def build_index(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, seq_len: int, *,
                fmt: str = "auto", dtype: str = "uint16", tokenizer: str = "bytes",
                packing: str = "stream", force: bool = False,
                on_progress: Callable[[int], None] | None = None,
                on_total: Callable[[int], None] | None = None) -> SampleIndex:
    """Index ``inputs`` into the directory ``out``; returns the opened index.

    ``on_total(num_samples)`` is called once the sample count is known, then
    ``on_progress(k)`` after every chunk of ``k`` samples written.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"--seq-len {seq_len!r} must be a positive integer (tokens per sample, "
                         f"without the extra target token)")
    if packing not in PACKINGS:
        raise ValueError(f"--packing {packing} is not known; use one of {', '.join(PACKINGS)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another path or pass --force to replace it")
    if out.exists() and not (out / "index.json").is_file():
        raise FileExistsError(f"{out} exists and is not a scalai index; refusing to replace it")
    sources = discover(inputs, fmt=fmt, dtype=dtype, tokenizer=tokenizer)
    out_abs = out.resolve()
    if any(Path(s.path).is_relative_to(out_abs) for s in sources):
        raise ValueError(f"{out} is among the inputs; write the index outside the data directories")
    if len(sources) >= 2**32:
        raise ValueError(f"{len(sources)} files are more than an index holds (2**32); concatenate them")
    count, chunk = (_stream_starts if packing == "stream" else _document_starts)(sources, seq_len)
    if count == 0:
        tokens = sum(s.tokens for s in sources)
        raise ValueError(f"the inputs hold {tokens} tokens, not one sample of seq_len + 1 = "
                         f"{seq_len + 1} tokens{' inside one document' if packing == 'document' else ''}; "
                         f"use a smaller --seq-len or more data")
    if on_total:
        on_total(count)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = np.lib.format.open_memmap(tmp / "sample_file.npy", mode="w+", dtype=np.uint32, shape=(count,))
        offsets = np.lib.format.open_memmap(tmp / "sample_offset.npy", mode="w+", dtype=np.uint64,
                                            shape=(count,))
        for lo in range(0, count, _CHUNK):
            hi = min(count, lo + _CHUNK)
            files[lo:hi], offsets[lo:hi] = chunk(lo, hi)
            if on_progress:
                on_progress(hi - lo)
        files.flush(), offsets.flush()
        del files, offsets
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "seq_len": seq_len,
                "dtype": sources[0].dtype, "tokenizer": "bytes" if sources[0].kind == "text" else None,
                "packing": packing, "num_samples": count,
                "num_tokens": sum(s.tokens for s in sources),
                "sample_bytes": (seq_len + 1) * sources[0].itemsize,
                "sources": [s.to_json() for s in sources]}
        # Metadata last: an index.json only ever sits beside complete arrays.
        (tmp / "index.json").write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SampleIndex.open(out)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old.partial-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
