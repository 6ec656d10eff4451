"""Source files of a sample index: what each input is and where its tokens lie.

Three kinds of input, all read in place (nothing is converted or copied):

``tokens``
    A flat little-endian array of token ids, the layout nanoGPT's ``train.bin`` uses
    (``--dtype uint16`` by default, ``uint32`` for vocabularies over 65,536).
``megatron``
    Megatron-LM's indexed dataset: ``PREFIX.bin`` (tokens) beside ``PREFIX.idx`` (header
    ``MMIDIDX\\0\\0``, version 1, dtype code, then per-sequence lengths and byte pointers,
    then the sequence range of each document). The token dtype comes from the ``.idx``.
``text``
    Any other file, tokenized on the fly at byte level: token id = byte value (uint8), so
    a sample's bytes are exactly the file's bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..bounded import open_regular
from ..validate import integer

__all__ = ["SourceFile", "discover", "documents", "fingerprint", "TOKEN_DTYPES", "FORMATS"]

#: Token dtypes accepted for token files and Megatron datasets (ids must be integers).
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
FORMATS = ("auto", "tokens", "megatron", "text")
_MEGATRON_HEADER = b"MMIDIDX\x00\x00"
_HEAD_BYTES = len(_MEGATRON_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts
_MEGATRON_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64",
                    6: "float64", 7: "float32", 8: "uint16"}
_FINGERPRINT_SPAN = 64 * 1024


@dataclass(frozen=True)
class SourceFile:
    """One input data file as the index records it.

    Attributes:
        path: absolute path of the file holding the tokens (a Megatron ``.bin``).
        kind: ``"tokens"``, ``"megatron"`` or ``"text"``.
        dtype: numpy dtype name of one token (``"uint8"`` for text).
        size: bytes of the file.
        fingerprint: hash of the size and the first and last 64 KiB, to notice a file
            replaced after indexing without reading all of it.
    """

    path: str
    kind: str
    dtype: str
    size: int
    fingerprint: str

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def tokens(self) -> int:
        return self.size // self.itemsize

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "dtype": self.dtype, "size": self.size,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, obj: dict) -> SourceFile:
        """Parse :meth:`to_json`'s object strictly; raises ValueError."""
        if not isinstance(obj, dict) or set(obj) != {"path", "kind", "dtype", "size", "fingerprint"}:
            raise ValueError(f"a source entry is not {{path, kind, dtype, size, fingerprint}}: {obj!r:.100}")
        if not all(isinstance(obj[k], str) for k in ("path", "kind", "dtype", "fingerprint")):
            raise ValueError(f"source entry {obj['path']!r:.100}: path, kind, dtype and fingerprint are strings")
        if obj["kind"] not in ("tokens", "megatron", "text") or obj["dtype"] not in TOKEN_DTYPES:
            raise ValueError(f"source {obj['path']!r:.100} has kind {obj['kind']!r:.20} and dtype "
                             f"{obj['dtype']!r:.20}; known kinds: tokens, megatron, text; dtypes: "
                             f"{', '.join(TOKEN_DTYPES)}")
        return cls(path=obj["path"], kind=obj["kind"], dtype=obj["dtype"],
                   size=integer(f"size of source {obj['path']!r:.100}", obj["size"], 0), fingerprint=obj["fingerprint"])


def fingerprint(path: str | os.PathLike, size: int) -> str:
    """blake2b of the size and the first and last 64 KiB of a file (hex, 32 chars)."""
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        if size > 2 * _FINGERPRINT_SPAN:
            f.seek(size - _FINGERPRINT_SPAN)
            digest.update(f.read(_FINGERPRINT_SPAN))
        elif size > _FINGERPRINT_SPAN:
            digest.update(f.read())
    return digest.hexdigest()


def _read_megatron_idx(idx: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sizes int32[s], pointers int64[s], document_indices int64[d]) of an .idx.

    Every count is checked against the file's size before anything is mapped, and the
    arrays against each other (sizes >= 0; document indices within ``[0, s]`` and in
    order), so a damaged or hostile index fails here, naming the file.

    Raises:
        ValueError: not a Megatron index, truncated, or inconsistent.
    """
    fd = open_regular(idx, "Megatron index")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD_BYTES, 0)
    finally:
        os.close(fd)
    if len(head) < _HEAD_BYTES or head[:9] != _MEGATRON_HEADER:
        raise ValueError(f"{idx} is not a Megatron index (its header is not MMIDIDX); "
                         f"pass the .bin of a Megatron dataset or use --format tokens")
    version, code, sequences, docs = struct.unpack("<QBQQ", head[9:_HEAD_BYTES])
    if version != 1:
        raise ValueError(f"{idx} is Megatron index version {version}; scalai reads version 1")
    dtype = _MEGATRON_DTYPES.get(code)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"{idx} stores tokens as {dtype or f'code {code}'}; token ids must be one of "
                         f"{', '.join(TOKEN_DTYPES)}")
    expected = _HEAD_BYTES + 12 * sequences + 8 * docs  # sizes int32, pointers int64, documents int64
    if size not in (expected, expected + sequences):  # (+ one int8 mode per sequence: multimodal)
        raise ValueError(f"{idx} holds {size} bytes but its header describes {expected} bytes ({sequences} "
                         f"sequences, {docs} document bounds): it is truncated or damaged; re-run "
                         f"Megatron's preprocessing")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    at = _HEAD_BYTES
    sizes = np.frombuffer(mm, dtype="<i4", count=sequences, offset=at)
    at += 4 * sequences
    pointers = np.frombuffer(mm, dtype="<i8", count=sequences, offset=at)
    at += 8 * sequences
    doc_idx = np.frombuffer(mm, dtype="<i8", count=docs, offset=at)
    if sequences and int(sizes.min()) < 0:
        raise ValueError(f"{idx} has a negative sequence length; it is damaged: re-run Megatron's preprocessing")
    if docs and (int(doc_idx.min()) < 0 or int(doc_idx.max()) > sequences or bool(np.any(np.diff(doc_idx) < 0))):
        raise ValueError(f"{idx} has document indices outside 0..{sequences} or out of order; it is damaged: "
                         f"re-run Megatron's preprocessing")
    return dtype, sizes, pointers, doc_idx


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(_MEGATRON_HEADER))


def _megatron_source(bin_path: Path) -> SourceFile:
    dtype, sizes, pointers, _ = _read_megatron_idx(bin_path.with_suffix(".idx"))
    size = bin_path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    starts = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * itemsize
    if not np.array_equal(starts, pointers):
        raise ValueError(f"{bin_path.with_suffix('.idx')} has sequence pointers that are not "
                         f"contiguous; re-run Megatron's preprocessing")
    expected = int(pointers[-1]) + int(sizes[-1]) * itemsize if len(sizes) else 0
    if size != expected:
        raise ValueError(f"{bin_path} holds {size} bytes but its .idx describes {expected}; "
                         f"the pair is truncated or mismatched: re-run Megatron's preprocessing")
    return SourceFile(str(bin_path), "megatron", dtype, size, fingerprint(bin_path, size))


def _expand(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                paths += [Path(root, name) for name in sorted(files) if not name.startswith(".")]
        elif path.is_file():
            paths.append(path)
        elif path.with_suffix(".bin").is_file() and path.with_suffix(".idx").is_file():
            paths.append(path.with_suffix(".bin"))  # a Megatron prefix
        else:
            raise FileNotFoundError(f"input {item} does not exist; pass data files, directories "
                                    f"or a Megatron prefix (PREFIX.bin + PREFIX.idx)")
    return paths


def discover(inputs: Iterable[str | os.PathLike], fmt: str = "auto", dtype: str = "uint16",
             tokenizer: str = "bytes") -> list[SourceFile]:
    """Describe each input file, in order (directories are walked in sorted order).

    ``fmt="auto"`` reads ``X.bin`` beside ``X.idx`` as Megatron, any other ``.bin`` as a
    token file of ``dtype``, and everything else as raw text at byte level.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt} is not known; use one of {', '.join(FORMATS)}")
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"--dtype {dtype} is not a token dtype; use one of {', '.join(TOKEN_DTYPES)}")
    if tokenizer != "bytes":
        raise ValueError(f"--tokenizer {tokenizer} is not supported: raw text is tokenized at byte "
                         f"level (--tokenizer bytes); pre-tokenize into a token file for others")
    sources: list[SourceFile] = []
    seen: set[Path] = set()
    for path in _expand(inputs):
        path = path.resolve()
        if path in seen:
            continue
        seen.add(path)
        pair = path.with_suffix(".bin") if path.suffix == ".idx" else path.with_suffix(".idx")
        is_megatron = path.suffix in (".bin", ".idx") and pair.is_file() and \
            _head(path.with_suffix(".idx")) == _MEGATRON_HEADER
        kind = fmt if fmt != "auto" else ("megatron" if is_megatron else
                                          "tokens" if path.suffix == ".bin" else "text")
        if kind == "megatron":
            bin_path = path.with_suffix(".bin")
            if path.suffix == ".idx":
                if bin_path in seen:
                    continue
                seen.add(bin_path)
            elif path.suffix == ".bin":
                seen.add(path.with_suffix(".idx"))
            sources.append(_megatron_source(bin_path))
        elif kind == "tokens":
            size = path.stat().st_size
            if size % np.dtype(dtype).itemsize:
                raise ValueError(f"{path} holds {size} bytes, not a whole number of {dtype} tokens; "
                                 f"check --dtype (uint16 for vocabularies up to 65,536, else uint32)")
            sources.append(SourceFile(str(path), "tokens", dtype, size, fingerprint(path, size)))
        else:
            size = path.stat().st_size
            sources.append(SourceFile(str(path), "text", "uint8", size, fingerprint(path, size)))
    if not sources:
        raise ValueError("no input files found; pass data files, directories or Megatron prefixes")
    dtypes = sorted({s.dtype for s in sources})
    if len(dtypes) > 1:
        raise ValueError(f"inputs mix token dtypes {dtypes}; index each dtype separately "
                         f"(raw text is uint8 bytes; use --format to force one reading)")
    return sources


def documents(source: SourceFile) -> tuple[np.ndarray, np.ndarray]:
    """Documents of a source as (first token int64[d], token count int64[d]) in the file.

    A token or text file is one document; a Megatron dataset has one per entry of its
    document index (a document may span several sequences).
    """
    if source.kind != "megatron":
        return np.zeros(1, dtype=np.int64), np.array([source.tokens], dtype=np.int64)
    _, sizes, pointers, doc_idx = _read_megatron_idx(Path(source.path).with_suffix(".idx"))
    if len(sizes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    bounds = np.asarray(doc_idx, dtype=np.int64)  # sequence index where each document starts
    if bounds.size == 0 or bounds[0] != 0:
        bounds = np.concatenate([[0], bounds])
    if bounds[-1] != len(sizes):
        bounds = np.concatenate([bounds, [len(sizes)]])
    seq_tokens = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # [s + 1]
    first = seq_tokens[bounds[:-1]]
    count = seq_tokens[bounds[1:]] - first
    return first, count
