"""Sample index over token files, Megatron datasets and raw text; reading samples in place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from scalai.data import SampleIndex, SampleReader, build_index
from scalai.errors import ScalaiError

from data_helpers import concat_bytes


def _all_samples(index: SampleIndex) -> list[bytes]:
    reader = SampleReader(index)
    return [reader.read(i) for i in range(index.num_samples)]


@pytest.mark.parametrize("seq_len", [1, 7, 64, 500])
def test_stream_samples_are_windows_of_the_concatenated_token_files(tmp_path, token_files, seq_len):
    index = build_index(token_files, tmp_path / "idx", seq_len)
    stream = np.frombuffer(concat_bytes(token_files), dtype="<u2")
    assert index.num_samples == (len(stream) - 1) // seq_len
    assert (index.dtype, index.sample_bytes, index.packing) == ("uint16", (seq_len + 1) * 2, "stream")
    reader = SampleReader(index)
    tokens = reader.tokens(np.arange(index.num_samples))  # [N, seq_len + 1]
    for i in range(index.num_samples):
        expected = stream[i * seq_len: i * seq_len + seq_len + 1]
        assert np.array_equal(tokens[i], expected)
        assert reader.read(i) == expected.tobytes()
    # Exactly one sample crosses the a.bin -> c.bin boundary (b.bin is empty): the one whose
    # seq_len + 1 tokens start before token 1000 and end after it.
    crossing = [i for i in range(index.num_samples) if len(index.segments(i)) > 1]
    assert crossing == [(1000 - 1) // seq_len]
    assert [f for f, _, _ in index.segments(crossing[0])] == [0, 2]


def test_document_packing_never_crosses_a_document(tmp_path, megatron_writer):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 60_000, n) for n in (10, 3, 25, 1, 0, 17)]
    bin_path = megatron_writer(tmp_path / "corpus_text_document", docs)
    index = build_index([bin_path], tmp_path / "idx", 4, packing="document")
    expected = [d[k * 4: k * 4 + 5] for d in docs for k in range(max(len(d) - 1, 0) // 4)]
    assert index.num_samples == len(expected) == 2 + 0 + 6 + 0 + 0 + 4
    assert index.dtype == "uint16" and index.sources[0].kind == "megatron"
    got = SampleReader(index).tokens(np.arange(index.num_samples))
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))


def test_megatron_stream_matches_the_bin_and_prefix_idx_and_bin_inputs_agree(tmp_path, megatron_writer):
    docs = [np.arange(i * 100, i * 100 + n) for i, n in enumerate((50, 70, 33))]
    bin_path = megatron_writer(tmp_path / "m", docs, dtype="int32")
    by_bin = build_index([bin_path], tmp_path / "i1", 16)
    by_prefix = build_index([tmp_path / "m"], tmp_path / "i2", 16)
    by_idx = build_index([bin_path.with_suffix(".idx")], tmp_path / "i3", 16)
    stream = np.concatenate(docs)
    assert by_bin.dtype == "int32" and by_bin.num_samples == (len(stream) - 1) // 16
    for index in (by_bin, by_prefix, by_idx):
        assert len(index.sources) == 1
        assert np.array_equal(SampleReader(index).tokens([2])[0], stream[32:49])


def test_raw_text_is_read_at_byte_level_from_a_walked_directory(tmp_path, text_dir):
    index = build_index([text_dir], tmp_path / "idx", 63, tokenizer="bytes")
    files = sorted(p for p in text_dir.rglob("*") if p.is_file())
    assert [Path(s.path) for s in index.sources] == [p.resolve() for p in files]
    assert {s.kind for s in index.sources} == {"text"} and index.dtype == "uint8"
    data = concat_bytes(files)
    assert _all_samples(index) == [data[i * 63: i * 63 + 64] for i in range(index.num_samples)]


def test_index_on_disk_is_self_describing(tmp_path, token_files):
    build_index(token_files, tmp_path / "idx", 32)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format"] == "scalai-data-index" and meta["version"] == 1
    assert meta["num_samples"] == np.load(tmp_path / "idx" / "sample_file.npy").shape[0]
    assert [s["size"] for s in meta["sources"]] == [os.path.getsize(p) for p in token_files]
    assert sorted(os.listdir(tmp_path / "idx")) == ["index.json", "sample_file.npy", "sample_offset.npy"]


def test_chunked_build_of_a_large_stream_matches_arithmetic(tmp_path, monkeypatch):
    # Force many small chunks: the vectorized chunks must join without a seam.
    import scalai.data.index as index_module

    monkeypatch.setattr(index_module, "_CHUNK", 1000)
    sizes = [12_345, 0, 54_321, 7, 33_333]
    paths = []
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"{i}.bin")
        np.zeros(n, dtype=np.uint32).tofile(paths[-1])
    progress = []
    index = build_index(paths, tmp_path / "idx", 9, fmt="tokens", dtype="uint32", on_progress=progress.append)
    first = np.concatenate([[0], np.cumsum(sizes)])
    start = np.arange(index.num_samples) * 9
    f = np.searchsorted(first, start, side="right") - 1
    assert sum(progress) == index.num_samples == (sum(sizes) - 1) // 9 and len(progress) > 10
    assert np.array_equal(index.sample_file, f)
    assert np.array_equal(index.sample_offset, (start - first[f]) * 4)
    assert all(sizes[int(x)] > 0 for x in np.unique(index.sample_file))  # never points into an empty file


@pytest.mark.parametrize("make, kwargs, error, message", [
    (lambda p: np.zeros(11, np.uint8).tofile(p / "odd.bin"), {}, ValueError, "not a whole number of uint16"),
    (lambda p: np.zeros(3, np.uint16).tofile(p / "x.bin"), {}, ValueError, "not one sample of seq_len \\+ 1 = 9"),
    (lambda p: None, {}, ValueError, "no input files"),
    (lambda p: (p / "t.txt").write_text("hi"), {"tokenizer": "gpt2"}, ValueError, "--tokenizer gpt2"),
    (lambda p: [(p / "t.txt").write_text("hello world"), np.zeros(9, np.uint16).tofile(p / "t.bin")], {},
     ValueError, "mix token dtypes"),
])
def test_bad_inputs_fail_with_one_clear_line_and_leave_nothing(tmp_path, make, kwargs, error, message):
    src = tmp_path / "src"
    src.mkdir()
    make(src)
    before = {p: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(error, match=message):
        build_index([src], tmp_path / "idx", 8, **kwargs)
    assert not (tmp_path / "idx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left
    assert {p: p.read_bytes() for p in src.iterdir()} == before


def test_existing_output_needs_force_and_force_replaces_only_an_index(tmp_path, token_files):
    build_index(token_files, tmp_path / "idx", 8)
    with pytest.raises(FileExistsError, match="--force"):
        build_index(token_files, tmp_path / "idx", 16)
    assert build_index(token_files, tmp_path / "idx", 16, force=True).seq_len == 16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a scalai index"):
        build_index(token_files, tmp_path / "other", 16, force=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_an_interrupted_build_leaves_the_old_index_intact(tmp_path, token_files):
    build_index(token_files, tmp_path / "idx", 8)

    def interrupt(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(token_files, tmp_path / "idx", 16, force=True, on_progress=interrupt)
    assert SampleIndex.open(tmp_path / "idx").seq_len == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "tokens"]


def test_a_changed_source_file_is_noticed(tmp_path, token_files):
    build_index(token_files, tmp_path / "idx", 8)
    with open(token_files[0], "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ScalaiError, match="changed since index"):
        SampleIndex.open(tmp_path / "idx")
    with open(token_files[0], "r+b") as f:  # same size, other content: only the fingerprint sees it
        f.truncate(2000)
        f.seek(0)
        f.write(b"\1\1")
    SampleIndex.open(tmp_path / "idx")
    with pytest.raises(ScalaiError, match="changed since index"):
        SampleIndex.open(tmp_path / "idx", verify=True)


def test_a_newer_index_version_is_refused(tmp_path, token_files):
    build_index(token_files, tmp_path / "idx", 8)
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ScalaiError, match="version 99, newer"):
        SampleIndex.open(tmp_path / "idx")


def test_read_range_spans_samples_and_reader_pickles_without_maps(tmp_path, token_files):
    import pickle

    index = build_index(token_files, tmp_path / "idx", 10)
    reader = SampleReader(index)
    ids = np.array([5, 0, 77, 5])
    whole = b"".join(reader.read(int(i)) for i in ids)
    for offset, size in [(0, len(whole)), (3, 30), (21, 1), (40, 1000), (len(whole), 5)]:
        assert reader.read_range(ids, offset, size) == whole[offset: offset + size]
    reader.read(0)
    clone = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < 500 and clone.read(77) == reader.read(77)
