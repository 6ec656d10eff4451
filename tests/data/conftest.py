"""Fixtures for the data tests: small corpora of every input kind, written per test."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

_MEGATRON_CODES = {"uint8": 1, "int32": 4, "int64": 5, "uint16": 8}


def write_megatron(prefix: Path, docs: list[np.ndarray], dtype: str = "uint16") -> Path:
    """Write a Megatron indexed dataset (PREFIX.bin / PREFIX.idx, version 1); one sequence
    per document. Returns the .bin path."""
    arrays = [np.asarray(d, dtype=dtype) for d in docs]
    sizes = np.array([len(a) for a in arrays], dtype="<i4")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).astype("<i8") * itemsize
    doc_idx = np.arange(len(arrays) + 1, dtype="<i8")
    prefix.with_suffix(".bin").write_bytes(b"".join(a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
                                                    for a in arrays))
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<QBQQ", 1, _MEGATRON_CODES[dtype], len(sizes), len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    return prefix.with_suffix(".bin")


@pytest.fixture
def token_files(tmp_path: Path) -> list[Path]:
    """Three uint16 token files of uneven lengths (one empty), random ids below 50,000."""
    rng = np.random.default_rng(0)
    paths = []
    for name, n in (("a.bin", 1000), ("b.bin", 0), ("c.bin", 777)):
        path = tmp_path / "tokens" / name
        path.parent.mkdir(exist_ok=True)
        rng.integers(0, 50_000, n, dtype=np.uint16).tofile(path)
        paths.append(path)
    return paths


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A directory of small text files (one empty, one in a subdirectory)."""
    root = tmp_path / "text"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "\n", "épsilon", "ζ"]
    for i, n in enumerate((40, 0, 300, 55)):
        (root / f"f{i}.txt").write_text(" ".join(rng.choice(words, n)))
    (root / "sub" / "g.txt").write_text("def f():\n    return 42\n" * 20)
    return root


def require_fuse() -> None:
    """Fail (not skip) when FUSE is unusable, unless SCALAI_ALLOW_NO_FUSE=1 allows a skip."""
    from scalai.data.vfs import fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("SCALAI_ALLOW_NO_FUSE") == "1":
        pytest.skip(f"{reason} (allowed by SCALAI_ALLOW_NO_FUSE=1)")
    pytest.fail(f"{reason}; FUSE tests must run here (set SCALAI_ALLOW_NO_FUSE=1 only where FUSE "
                f"cannot exist)", pytrace=False)


@pytest.fixture
def megatron_writer():
    return write_megatron


@pytest.fixture
def fuse_ok() -> None:
    require_fuse()
