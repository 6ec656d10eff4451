"""Damaged or hostile data inputs (issue 11, item 9): Megatron indexes, sample indexes,
positions past what 64 bits count, nested JSON, checkpoints as ``--state``. Each is one
line naming what is wrong; nothing is written."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from scalai.cli.main import main
from scalai.data import DataState, SampleIndex, global_order


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- Megatron .idx -------------------------------------------------------------------------
def _patch_idx(prefix, change):
    """Rewrite PREFIX.idx: ``change(header: dict, arrays: dict) -> bytes | None`` edits the
    parsed fields (or returns the file's new bytes outright)."""
    path = prefix.with_suffix(".idx")
    raw = path.read_bytes()
    version, code, seqs, docs = struct.unpack("<QBQQ", raw[9:34])
    sizes = np.frombuffer(raw, "<i4", seqs, 34).copy()
    pointers = np.frombuffer(raw, "<i8", seqs, 34 + 4 * seqs).copy()
    doc_idx = np.frombuffer(raw, "<i8", docs, 34 + 12 * seqs).copy()
    head = {"version": version, "code": code, "seqs": seqs, "docs": docs}
    arrays = {"sizes": sizes, "pointers": pointers, "doc_idx": doc_idx}
    replaced = change(head, arrays)
    if replaced is None:
        replaced = (raw[:9] + struct.pack("<QBQQ", head["version"], head["code"], head["seqs"], head["docs"])
                    + arrays["sizes"].tobytes() + arrays["pointers"].tobytes() + arrays["doc_idx"].tobytes())
    path.write_bytes(replaced)


def _set(where: str, **values):
    def change(head, arrays):
        target = head if where == "head" else arrays
        for key, value in values.items():
            if where == "head":
                target[key] = value
            else:
                index, item = value
                target[key][index] = item
    return change


@pytest.mark.parametrize("change, fragment", [
    (_set("head", seqs=2**64 - 1), "header describes .* bytes .*18446744073709551615 sequences"),
    (_set("head", docs=2**64 - 1), "18446744073709551615 document bounds"),
    (_set("arrays", doc_idx=(-1, 99)), "document indices outside 0..3 or out of order"),
    (_set("arrays", doc_idx=(1, -2)), "document indices outside 0..3 or out of order"),
    (_set("arrays", doc_idx=(1, 3)), "document indices outside 0..3 or out of order"),  # 0, 3, 2, 3
    (_set("arrays", sizes=(0, -5)), "negative sequence length"),
    (lambda head, arrays: b"MMIDIDX\x00\x00\x01", "is not a Megatron index"),
    (lambda head, arrays: (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 4)
                           + arrays["sizes"].tobytes()), "is truncated or damaged"),
])
@pytest.mark.parametrize("packing", ["stream", "document"])
def test_a_damaged_megatron_index_is_one_line(capsys, tmp_path, megatron_writer, change, fragment, packing):
    import re

    src = tmp_path / "src"
    src.mkdir()
    prefix = src / "corpus"
    megatron_writer(prefix, [np.arange(50), np.arange(30), np.arange(40)])
    _patch_idx(prefix, change)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    code, _, err = _run(capsys, "data", "index", prefix, tmp_path / "out", "--seq-len", "8",
                        "--format", "megatron", "--packing", packing)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(prefix.with_suffix(".idx")) in err and re.search(fragment, err), err
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


# -- the sample index ----------------------------------------------------------------------
@pytest.fixture
def index(tmp_path, token_files):
    from scalai.data import build_index

    return build_index(token_files, tmp_path / "idx", 8).path


def _meta(change):
    def mutate(path):
        meta = json.loads((path / "index.json").read_text())
        change(meta)
        (path / "index.json").write_text(json.dumps(meta))
    return mutate


def _replace(name, make):
    def mutate(path):
        (path / name).unlink()
        make(path / name)
    return mutate


def _edit_bytes(name, old, new):
    def mutate(path):
        data = (path / name).read_bytes()
        assert old in data
        (path / name).write_bytes(data.replace(old, new, 1))
    return mutate


def _truncate(name, keep):
    def mutate(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep(len(data))])
    return mutate


@pytest.mark.parametrize("mutate, fragment", [
    (_meta(lambda m: m.update(seq_len=0)), "index.json is invalid: seq_len=0 is out of range"),
    (_meta(lambda m: m.update(seq_len=8.5)), "index.json is invalid: seq_len=8.5 is not an integer"),
    (_meta(lambda m: m.update(num_samples=-1)), "index.json is invalid: num_samples=-1"),
    (_meta(lambda m: m.update(dtype="float32")), "index.json is invalid: dtype 'float32'"),
    (_meta(lambda m: m.update(sources=[{"path": 1}])), "index.json is invalid: a source entry"),
    (_meta(lambda m: m["sources"][0].update(size="big")), "index.json is invalid: size of source"),
    (_meta(lambda m: m.update(version=True)), "has version True"),
    (_replace("index.json", lambda p: p.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")),
     "index.json nests JSON 100001 levels deep"),
    (_replace("index.json", lambda p: p.write_text('{"format": "scalai-data-index", "seq_len": NaN}')),
     "index.json is not valid JSON: NaN"),
    (_replace("index.json", os.mkfifo), r"index.json is a FIFO \(named pipe\)"),
    (_truncate("sample_file.npy", lambda n: n - 5), "sample_file.npy is not a readable .npy array"),
    (_truncate("sample_offset.npy", lambda n: 60), r"sample_offset.npy claims a 118-byte header in a 60-byte file"),
    (_replace("sample_file.npy", lambda p: np.save(p, np.zeros(3, np.int64))),
     r"sample_file.npy holds int64\[3\], the index needs uint32"),
    (_replace("sample_file.npy", lambda p: np.save(p, np.array([{}], dtype=object))),
     "sample_file.npy is not a readable .npy array"),
    (_replace("sample_offset.npy", os.mkdir), "sample_offset.npy is a directory"),
    (_edit_bytes("sample_file.npy", b",), }", b",(, }"), "sample_file.npy is not a readable .npy array"),  # fuzz
    (_edit_bytes("sample_file.npy", b"NUMPY\x01", b"NUMPY\x03"),  # fuzz: a 662 MB header claimed
     r"sample_file.npy claims a 6\d{8}-byte header in a \d+-byte file"),
    (_edit_bytes("sample_file.npy", b"NUMPY", b"NUMPX"), "sample_file.npy is not a .npy array"),
])
@pytest.mark.timeout(60)
def test_a_damaged_sample_index_is_one_line(capsys, index, mutate, fragment):
    import re

    mutate(index)
    code, out, err = _run(capsys, "data", "plan", "--index", index, "--seed", "1", "--global-batch", "4",
                          "--dp", "2")
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(fragment, err) and "rebuild the index" in err, err


def test_a_sample_offset_past_its_file_is_caught_at_read(index):
    offsets = np.load(index / "sample_offset.npy", mmap_mode="r+")
    offsets[3] = 10**9
    offsets.flush()
    del offsets
    from scalai.data.reader import SampleReader
    from scalai.errors import ScalaiError

    opened = SampleIndex.open(index)
    with pytest.raises(ScalaiError, match="sample 3 starts at byte 1000000000 of .*a.bin, past its end"):
        SampleReader(opened).read(3)


# -- positions and state -------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["order", "--seed", "1", "--count", "2", "--start", str(2**63 - 1)], "start=9223372036854775807 and count=2 "
                                                                          "must be at most 4611686018427387904"),
    (["plan", "--seed", "1", "--global-batch", "4", "--dp", "2", "--consumed", str(2**63 - 1)],
     "position 9223372036854775807 of the global order is past the 4611686018427387904 samples"),
    (["plan", "--seed", "1", "--global-batch", "4", "--dp", "2", "--epoch", "99999999999999999"],
     "of the global order is past the 4611686018427387904 samples"),
    (["plan", "--seed", "1", "--global-batch", "4", "--dp", "2", "--epoch", str(2**64)], "is out of range"),
    (["plan", "--seed", "1", "--global-batch", str(10**9), "--dp", "2"], "more than the 10,000,000 samples"),
])
def test_positions_past_64_bits_are_one_line(capsys, index, args, fragment):
    code, out, err = _run(capsys, "data", args[0], "--index", index, *args[1:])
    assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err, err


def test_nested_json_in_state_is_one_line(capsys, index, tmp_path):
    state = tmp_path / "state.json"
    state.write_text('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = _run(capsys, "data", "plan", "--index", index, "--state", state, "--dp", "1")
    assert code == 2 and err.count("\n") == 1 and f"--state {state} nests JSON 100001 levels deep" in err, err


def test_plan_takes_the_state_of_a_real_checkpoint(capsys, index, tmp_path):
    """A checkpoint keeps its data position under state.data: --state takes its manifest
    or its directory."""
    from scalai.checkpoint import save_arrays
    from scalai.config import ParallelConfig
    from scalai.layout.ptc import PTC

    n = SampleIndex.open(index).num_samples
    data = DataState(seed=11, global_batch=6, num_samples=n, epoch=2, consumed=5)
    ckpt = tmp_path / "ckpt"
    save_arrays(ckpt, PTC(ParallelConfig(), [], 0), {0: {}}, {"step": 7, "data": data.to_json()})
    expected = global_order(data.position, 6, n, 11).tolist()
    for state in (ckpt / "manifest.json", ckpt):
        code, out, err = _run(capsys, "data", "plan", "--index", index, "--state", state, "--dp", "2", "--json")
        assert code == 0, err
        assert sum(json.loads(out)[0], []) == expected
    save_arrays(tmp_path / "nodata", PTC(ParallelConfig(), [], 0), {0: {}}, {"step": 7})
    code, _, err = _run(capsys, "data", "plan", "--index", index, "--state", tmp_path / "nodata", "--dp", "2")
    assert code == 2 and "records no data position (no state.data)" in err, err
