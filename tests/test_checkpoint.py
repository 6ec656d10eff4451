"""The sharded checkpoint format: safetensors I/O, manifest, atomic saves, damage detection."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scalai.checkpoint import (Checkpoint, CheckpointWriter, SafetensorsReader, SafetensorsWriter,
                               rank_file_name, save_arrays, verify)
from scalai.storage.checksum import crc32_combine, crc32_of_pieces, crc32_of_range, crc32_zeros
from scalai.checkpoint.manifest import VERSION
from scalai.config import ParallelConfig
from scalai.dtypes import raw_numpy
from scalai.errors import CheckpointError, ChecksumError
from scalai.layout.ptc import PTC
from scalai.layout.spec import Residence, TensorSpec, with_optimizer_state
from scalai.layout.splits import Fused, Replicate, Split, VocabSplit
from scalai.regions import Region


def _specs():
    params = [
        TensorSpec("embed", (37, 8), "bfloat16", VocabSplit(0, 4), Residence("tied")),
        TensorSpec("layers.0.qkv", (32, 8), "bfloat16", Fused(0, (16, 8, 8), groups=4), Residence.of_layer(0)),
        TensorSpec("layers.0.proj", (8, 16), "bfloat16", Split(1), Residence.of_layer(0)),
        TensorSpec("layers.1.fc", (16, 8), "float16", Split(0), Residence.of_layer(1)),
        TensorSpec("layers.1.norm", (8,), "float32", Replicate(), Residence.of_layer(1)),
        TensorSpec("final.scale", (), "float64", Replicate(), Residence("last")),
    ]
    return with_optimizer_state(params) + [
        TensorSpec("extra.mask", (3, 5), "bool", Replicate(), Residence("all")),
        TensorSpec("extra.count", (4,), "int64", Replicate(), Residence("first")),
    ]


def make_ptc(layout: str) -> PTC:
    return PTC(ParallelConfig.parse(layout), _specs(), 2)


def global_raw(ptc: PTC, seed: int = 0) -> dict[str, np.ndarray]:
    """Random bits for every global tensor (NaN payloads and all)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in ptc.specs:
        raw = raw_numpy(s.dtype)
        out[s.name] = rng.integers(0, np.iinfo(raw).max, size=s.shape, dtype=raw, endpoint=True)
        if s.dtype == "bool":
            out[s.name] &= 1
    return out


def local_raw(ptc: PTC, glob, pad: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Every rank's local tensors; padding elements hold ``pad``."""
    out = {}
    for r in range(ptc.config.world_size):
        out[r] = {}
        for name, shard in ptc.rank_shards(r):
            arr = np.full(shard.shape, pad, dtype=raw_numpy(ptc.spec(name).dtype))
            for p in shard.pieces:
                arr[p.local_region.to_slices()] = glob[name][p.global_region.to_slices()].reshape(
                    p.local_region.sizes)
            out[r][name] = arr
    return out


def _snapshot(directory):
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


@pytest.fixture
def saved(tmp_path):
    ptc = make_ptc("tp=2,pp=2,dp=2,zero=1")
    glob = global_raw(ptc)
    arrays = local_raw(ptc, glob)
    out = tmp_path / "ckpt"
    save_arrays(out, ptc, arrays, {"step": 7, "sched": {"lr": 0.5}})
    return out, ptc, glob, arrays


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_is_bit_exact_with_state(saved):
    out, ptc, glob, arrays = saved
    with Checkpoint.open(out) as ck:
        assert ck.state == {"step": 7, "sched": {"lr": 0.5}}
        assert str(ck.ptc.config) == "tp=2,pp=2,dp=2,zero=1"
        for r, tensors in arrays.items():
            for name, arr in tensors.items():
                view = ck.view(r, name)
                assert view.dtype == arr.dtype and np.array_equal(view, arr), (r, name)
        for name, arr in glob.items():
            assert np.array_equal(ck.read_global(name), arr), name
        ck.verify()
    assert sorted(os.listdir(out)) == ["manifest.json"] + [rank_file_name(r) for r in range(8)]


def test_torch_tensors_save_and_read_back_bf16(tmp_path):
    ptc = make_ptc("tp=2,pp=1,dp=1")
    glob = global_raw(ptc, seed=3)
    raw = local_raw(ptc, glob)
    typed = {r: {n: torch.from_numpy(a.view(f"int{a.itemsize * 8}") if a.dtype != np.bool_ else a.astype(bool))
                 .view(getattr(torch, ptc.spec(n).dtype)) for n, a in t.items()} for r, t in raw.items()}
    save_arrays(tmp_path / "c", ptc, typed)
    with Checkpoint.open(tmp_path / "c") as ck:
        t = ck.read(1, "layers.0.qkv")
        assert t.dtype == torch.bfloat16 and torch.equal(t.view(torch.int16), typed[1]["layers.0.qkv"].view(torch.int16))
        part = ck.read(0, "embed", Region((1, 2), (3, 4)))
        assert torch.equal(part.view(torch.int16), typed[0]["embed"][1:4, 2:6].view(torch.int16))


def test_official_safetensors_library_loads_our_files(saved):
    out, ptc, _, arrays = saved
    for r in range(ptc.config.world_size):
        path = os.path.join(out, rank_file_name(r))
        loaded = load_file(path)
        # each replica lives in one file: the rank PTC.replica_owner names
        assert list(loaded) == [n for n, _ in ptc.rank_shards(r) if ptc.replica_owner(n, r) == r]
        for name, tensor in loaded.items():
            assert str(tensor.dtype) == f"torch.{ptc.spec(name).dtype}"
            expect = arrays[r][name]
            got = tensor.view(torch.uint8).numpy() if tensor.dtype == torch.bool else \
                tensor.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]).numpy()
            assert np.array_equal(got.view(expect.dtype), expect), (r, name)
        with safe_open(path, "pt") as f:
            assert f.metadata()["scalai.rank"] == str(r)


def test_data_sections_start_at_a_page_and_files_with_8_byte_headers_still_read(saved, tmp_path):
    """Every rank file's data section starts at a multiple of 4096 bytes (its length prefix
    and JSON header padded with spaces), so a tensor's place in a page does not depend on
    the header's length; a file whose header is padded to 8 bytes only, as the official
    library writes it, reads the same."""
    out, ptc, _, arrays = saved
    for r in range(ptc.config.world_size):
        with open(os.path.join(out, rank_file_name(r)), "rb") as f:
            data = f.read()
        n = int.from_bytes(data[:8], "little")
        assert (8 + n) % 4096 == 0 and data[8:8 + n].rstrip(b" ").endswith(b"}"), r
    path = os.path.join(out, rank_file_name(0))
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].rstrip(b" ")
    text += b" " * (-len(text) % 8)
    short = tmp_path / "short.safetensors"
    short.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    assert len(text) < n
    with SafetensorsReader(short) as f, SafetensorsReader(path) as g:
        assert list(f.entries) == list(g.entries) and f.entries and f.metadata == g.metadata
        for name in f.entries:
            assert np.array_equal(f.view(name).view(np.uint8), arrays[0][name].view(np.uint8)), name


def test_region_views_are_read_only_and_bounded(saved):
    out, _, _, arrays = saved
    with Checkpoint.open(out) as ck:
        part = ck.view(0, "layers.0.proj", Region((2, 1), (3, 4)))
        assert np.array_equal(part, arrays[0]["layers.0.proj"][2:5, 1:5])
        with pytest.raises(ValueError):
            part[0, 0] = 1
        with pytest.raises(ValueError, match="outside"):
            ck.view(0, "layers.0.proj", Region((6, 0), (3, 1)))
        with pytest.raises(KeyError, match="nope"):
            ck.view(0, "nope")


def test_region_read_maps_only_the_pages_it_touches(tmp_path):
    """A 1-row read of a 256 MiB tensor must not bring the tensor into memory."""
    path = str(tmp_path / "big.safetensors")
    rows, cols = 1 << 15, 1 << 12  # uint16: 256 MiB
    with SafetensorsWriter(path, [("w", "bfloat16", (rows, cols))]) as w:
        w.write("w", (rows // 2) * cols * 2, np.arange(cols, dtype=np.uint16))

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    with SafetensorsReader(path) as reader:
        before = rss()
        row = np.array(reader.view("w", Region((rows // 2, 0), (1, cols))))
        grown = rss() - before
    assert np.array_equal(row[0], np.arange(cols, dtype=np.uint16))
    assert grown < 16 << 20, f"reading one row mapped {grown} bytes"


def test_writer_copies_consecutive_tensors_in_one_call_and_refuses_others(tmp_path):
    """copy_tensors copies tensors that lie one after the other in the new file from one
    run of another file; tensors that do not (a skipped one between them, or the wrong
    order) are refused with nothing written."""
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(0, 255, n, dtype=np.uint8) for n in (10, 7, 5))
    src = tmp_path / "src.bin"
    src.write_bytes(b"xyz" + a.tobytes() + b.tobytes() + c.tobytes())
    entries = [(n, "uint8", (len(x),)) for n, x in (("a", a), ("b", b), ("c", c))]
    with open(src, "rb") as f, SafetensorsWriter(str(tmp_path / "out.safetensors"), entries) as w:
        for names in (["a", "c"], ["b", "a"]):
            with pytest.raises(ValueError, match="not consecutive"):
                w.copy_tensors(names, f.fileno(), 3)
        assert not w.view("a").any() and not w.view("c").any()
        assert w.copy_tensors(["a", "b"], f.fileno(), 3)
        assert w.copy_tensors(["c"], f.fileno(), 3 + 17)
    with SafetensorsReader(str(tmp_path / "out.safetensors")) as r:
        for name, x in (("a", a), ("b", b), ("c", c)):
            assert np.array_equal(r.view(name), x), name


def test_writer_views_fill_in_place_and_padding_reads_zero(tmp_path):
    ptc = make_ptc("tp=4,pp=1,dp=1")
    with CheckpointWriter(tmp_path / "c", ptc, {"a": [1, 2]}) as w:
        for r in range(4):
            for name, shard in ptc.rank_shards(r):
                view = w.array(r, name)
                for p in shard.pieces:  # write only the real elements
                    view[p.local_region.to_slices()] = 1
        w.commit()
    with Checkpoint.open(tmp_path / "c") as ck:
        ck.verify()
        embed = ck.view(3, "embed")  # 37 rows over 4 x 12: rank 3 holds 1 real row
        assert embed[:1].all() and not embed[1:].any()


# -- checksums --------------------------------------------------------------------------------

@pytest.fixture(params=["zlib-ng", "algebra"])
def combine(request, monkeypatch):
    """Each way of combining CRCs: zlib-ng's C function, and the algebra in Python that
    stands in where zlib-ng is missing."""
    from scalai.storage import checksum

    if request.param == "algebra":
        monkeypatch.setattr(checksum, "_combine", checksum._combine_algebra)
    else:
        assert checksum._fast_combine is not None, "zlib-ng, a dependency, lacks crc32_combine"
    return request.param


@pytest.mark.parametrize("n1, n2", [(0, 0), (1, 0), (0, 9), (13, 7), (5000, 70001)])
def test_crc32_combine_matches_zlib(n1, n2, combine):
    rng = np.random.default_rng(n1 + n2)
    a, b = rng.bytes(n1), rng.bytes(n2)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)
    assert crc32_zeros(n1 + n2 + 70000) == zlib.crc32(bytes(n1 + n2 + 70000))


@pytest.mark.parametrize("head, middle, tail", [(0, 0, 0), (0, 9, 0), (3, 0, 4), (0, 100, 7), (5, 100, 0),
                                               (13, 70001, 5000), (1 << 20, 3, 1)])
def test_crc32_of_range_matches_zlib(head, middle, tail, combine):
    """The CRC of a range from the whole buffer's and its surroundings' (zlib over the range
    is the oracle)."""
    buf = np.random.default_rng(head + middle + tail).bytes(head + middle + tail)
    h, m, t = buf[:head], buf[head:head + middle], buf[head + middle:]
    assert crc32_of_range(zlib.crc32(buf), zlib.crc32(h), middle, zlib.crc32(t), tail) == zlib.crc32(m)


def test_crc32_of_pieces_with_gaps_and_overlaps(combine):
    rng = np.random.default_rng(1)
    buf = bytearray(3000)
    pieces = []
    for offset, length in ((2000, 500), (10, 90), (100, 900)):
        data = rng.bytes(length)
        buf[offset:offset + length] = data
        pieces.append((offset, length, zlib.crc32(data)))
    assert crc32_of_pieces(pieces, len(buf)) == zlib.crc32(bytes(buf))
    assert crc32_of_pieces(pieces + [(950, 100, 0)], len(buf)) is None  # overlap
    assert crc32_of_pieces([(2990, 20, 0)], len(buf)) is None  # beyond the end


def test_wrong_declared_checksum_is_caught_by_verify(tmp_path):
    ptc = make_ptc("tp=1,pp=1,dp=1")
    with CheckpointWriter(tmp_path / "c", ptc) as w:
        data = np.ones(8, np.uint32)
        w.write(0, "layers.1.norm", 0, data)
        w.declare_checksum(0, "layers.1.norm", 12345)
        w.commit()
    with pytest.raises(ChecksumError, match="layers.1.norm"):
        verify(tmp_path / "c")


# -- damage and bad input ---------------------------------------------------------------------

def test_corrupted_bytes_name_file_and_tensor(saved):
    out, ptc, _, _ = saved
    path = os.path.join(out, rank_file_name(5))
    with SafetensorsReader(path) as reader:
        entry = reader.entries["layers.1.fc"]
    with open(path, "r+b") as f:
        f.seek(entry.start + 3)
        byte = f.read(1)
        f.seek(entry.start + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ChecksumError, match=r"rank-00005\.safetensors.*layers\.1\.fc.*earlier checkpoint"):
        verify(out)


def test_truncated_rank_file_is_reported_at_open(saved):
    out, _, _, _ = saved
    path = os.path.join(out, rank_file_name(2))
    os.truncate(path, os.path.getsize(path) - 1)
    with pytest.raises(CheckpointError, match=r"rank-00002\.safetensors.*truncated.*restore"):
        Checkpoint.open(out)


def test_damaged_header_of_a_rank_file_names_the_file(saved):
    out, ptc, _, _ = saved
    rank, name = next((r, n) for r in range(ptc.config.world_size) for n, _ in ptc.rank_shards(r)
                      if r > 0 and ptc.replica_owner(n, r) == r)  # a tensor stored in its own file
    path = os.path.join(out, rank_file_name(rank))
    with open(path, "r+b") as f:
        f.seek(9)
        f.write(b"#")  # same size, header no longer JSON
    with Checkpoint.open(out) as ck:  # sizes still match: found when the file is read
        with pytest.raises(CheckpointError, match=rf"rank-{rank:05d}\.safetensors is truncated or corrupt"):
            ck.view(rank, name)
    with pytest.raises(CheckpointError, match=rf"rank-{rank:05d}\.safetensors"):
        verify(out)


def test_missing_rank_file(saved):
    out, _, _, _ = saved
    os.unlink(os.path.join(out, rank_file_name(7)))
    with pytest.raises(CheckpointError, match=r"rank-00007\.safetensors is missing.*restore"):
        Checkpoint.open(out)


def test_missing_manifest_means_unfinished_save(saved):
    out, _, _, _ = saved
    os.unlink(os.path.join(out, "manifest.json"))
    with pytest.raises(CheckpointError, match="no manifest.json: the save did not finish; use an earlier"):
        Checkpoint.open(out)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(out / "nothing-here")


def _edit_manifest(out, change):
    path = os.path.join(out, "manifest.json")
    obj = json.load(open(path))
    change(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_newer_format_version_is_refused(saved):
    out, _, _, _ = saved
    _edit_manifest(out, lambda m: m.update(version=VERSION + 1))
    with pytest.raises(CheckpointError, match=f"version {VERSION + 1}, newer .*upgrade scalai"):
        Checkpoint.open(out)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(extra=1), "unexpected or missing"),
    (lambda m: m.update(checksum_algorithm="md5"), "unknown checksum algorithm"),
    (lambda m: m["ranks"].pop(), "lists 7"),
    (lambda m: m["ranks"][1]["tensors"]["embed"].update(shape=[1, 8]), "rank 1 tensor embed"),
    (lambda m: m["ranks"][1]["tensors"]["embed"].update(checksum="xyz"), "rank 1 tensor embed"),
    (lambda m: m["ranks"][0]["tensors"].pop("embed"), "other tensors"),
    (lambda m: m["ptc"].update(config="tp=3"), "does not parse|lists"),
    (lambda m: m.update(state=[1]), "state is not a JSON object"),
])
def test_invalid_manifest_is_rejected(saved, change, message):
    out, _, _, _ = saved
    _edit_manifest(out, change)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(out)


def test_manifest_that_is_not_json(saved):
    out, _, _, _ = saved
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write('{"format": "scalai-checkpoint", ')
    with pytest.raises(CheckpointError, match="not valid JSON.*corrupt"):
        Checkpoint.open(out)


def _header_file(tmp_path, header: bytes, data: bytes = b"") -> str:
    path = str(tmp_path / "f.safetensors")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"1234", "describes 77 bytes, the file has 73"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', b"1234", "its shape needs 8"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}', b"123456", "overlaps"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"12345678", "gap"),
    (b'{"a": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}', b"1234", "bad header entry"),
    (b'{"a": [1, 2]', b"", "not valid JSON"),
    (b"[1, 2]", b"", "not a JSON object"),
])
def test_corrupt_safetensors_headers(tmp_path, header, data, message):
    path = _header_file(tmp_path, header, data)
    with pytest.raises(CheckpointError, match=f"f.safetensors is truncated or corrupt: .*{message}"):
        SafetensorsReader(path)


def test_truncated_header_length(tmp_path):
    path = str(tmp_path / "f.safetensors")
    with open(path, "wb") as f:
        f.write((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        SafetensorsReader(path)
    with open(path, "wb") as f:
        f.write(b"\x01\x02")
    with pytest.raises(CheckpointError, match="shorter than"):
        SafetensorsReader(path)


def test_bad_arrays_are_rejected_with_the_fix(tmp_path):
    ptc = make_ptc("tp=1,pp=1,dp=1")
    arrays = local_raw(ptc, global_raw(ptc))
    bad = {0: dict(arrays[0])}
    bad[0]["layers.1.fc"] = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match="layers.1.fc of rank 0 has numpy dtype float32, expected float16"):
        save_arrays(tmp_path / "a", ptc, bad)
    bad[0]["layers.1.fc"] = np.zeros((8, 8), np.float16)
    with pytest.raises(ValueError, match=r"has shape \[8, 8\].*local shape .* is \[16, 8\]"):
        save_arrays(tmp_path / "b", ptc, bad)
    del bad[0]["layers.1.fc"]
    with pytest.raises(ValueError, match="no .*array for tensor layers.1.fc of rank 0"):
        save_arrays(tmp_path / "c", ptc, bad)
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_arrays(tmp_path / "d", ptc, arrays, {"rng": b"\x00"})
    assert not [p for p in os.listdir(tmp_path)], "a failed save left files behind"


def test_existing_output_is_refused_and_untouched(saved, tmp_path):
    out, ptc, _, arrays = saved
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="already exists; choose another"):
        save_arrays(out, ptc, arrays)
    assert _snapshot(out) == before


def test_reading_never_modifies_the_checkpoint(saved):
    out, _, glob, _ = saved
    before = _snapshot(out)
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    with Checkpoint.open(out) as ck:
        ck.verify()
        for name in glob:
            ck.read_global(name)
    assert _snapshot(out) == before
    assert mtimes == {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}


# -- crashes ----------------------------------------------------------------------------------

def test_exception_mid_save_leaves_nothing(tmp_path):
    ptc = make_ptc("tp=2,pp=1,dp=1")
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "c", ptc) as w:
            w.array(0, "embed")[:] = 1
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_failure_at_the_final_rename_leaves_no_checkpoint(tmp_path, monkeypatch):
    ptc = make_ptc("tp=2,pp=1,dp=1")
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(dst) == "c":
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        save_arrays(tmp_path / "c", ptc, local_raw(ptc, global_raw(ptc)))
    assert os.listdir(tmp_path) == []


def test_forgetting_commit_leaves_nothing(tmp_path):
    with CheckpointWriter(tmp_path / "c", make_ptc("tp=1,pp=1,dp=1")) as w:
        w.array(0, "embed")[:] = 3
    assert os.listdir(tmp_path) == []


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_ptc
    from scalai.checkpoint import CheckpointWriter
    ptc = make_ptc("tp=2,pp=2,dp=1")
    w = CheckpointWriter(sys.argv[1], ptc, {{"step": 1}})
    for r in range(4):
        for name, _ in ptc.rank_shards(r):
            if w.stores(r, name):
                w.array(r, name)[...] = 1
    print("filled", flush=True)
    time.sleep(60)
""")


def test_killed_writer_leaves_no_directory_that_looks_complete(tmp_path):
    out = tmp_path / "c"
    script = _KILLED_WRITER.format(tests=os.path.dirname(__file__))
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "filled"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".c.partial-")
    assert "manifest.json" not in os.listdir(tmp_path / left[0])
    with pytest.raises(CheckpointError):
        Checkpoint.open(out)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Checkpoint.open(tmp_path / left[0])


# -- replicas stored once ---------------------------------------------------------------------

def _dp_checkpoint(tmp_path, dedup: bool):
    from scalai.models import model_ptc
    from scalai.models.synth import write_synthetic_checkpoint
    from scalai.config import ParallelConfig

    out = tmp_path / ("dedup" if dedup else "full")
    if dedup:
        write_synthetic_checkpoint("gpt-tiny", out, ParallelConfig.parse("tp=1,pp=2,dp=4"), seed=2)
    else:  # the same state with every replica written out
        ptc = model_ptc("gpt-tiny", "tp=1,pp=2,dp=4")
        with Checkpoint.open(tmp_path / "dedup") as src, CheckpointWriter(out, ptc, src.state, dedup=False) as w:
            for r in range(ptc.config.world_size):
                for n, _ in ptc.rank_shards(r):
                    w.array(r, n)[...] = src.view(r, n)
            w.commit()
    return out


def test_replicas_are_stored_once_and_read_through_their_owner(tmp_path):
    from scalai.compare import compare_checkpoints

    dedup, full = _dp_checkpoint(tmp_path, True), _dp_checkpoint(tmp_path, False)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir() if f.suffix == ".safetensors")  # noqa: E731
    assert size(dedup) * 3.5 < size(full)  # dp=4: one copy instead of four (plus headers)
    with Checkpoint.open(dedup) as a, Checkpoint.open(full) as b:
        for r in range(8):  # every replica points at the rank the layout names, which stores it
            for n, _ in a.ptc.rank_shards(r):
                owner = a.stored_in(r, n)
                assert owner == a.ptc.replica_owner(n, r) and a.stored_in(owner, n) == owner
                assert np.array_equal(a.view(r, n), b.view(r, n))
        # replicas spread over the holders: each stage-1 rank stores about a quarter
        files = [os.path.getsize(dedup / rank_file_name(r)) for r in range(4, 8)]
        assert max(files) < 1.6 * min(files)
        assert a.checksum(7, "decoder.final_layernorm.weight") == b.checksum(7, "decoder.final_layernorm.weight")
        a.verify()
        assert compare_checkpoints(a, b) is None
    assert f'"version": {VERSION}' in (dedup / "manifest.json").read_text()


def test_version_1_manifests_without_replica_pointers_still_read(tmp_path):
    _dp_checkpoint(tmp_path, True)
    full = _dp_checkpoint(tmp_path, False)
    path = full / "manifest.json"
    path.write_text(path.read_text().replace(f'"version": {VERSION}', '"version": 1'))
    with Checkpoint.open(full) as c:
        c.verify()


@pytest.mark.parametrize("where", ["an alias", "another stage"])
def test_a_replica_pointer_to_a_rank_without_that_replica_is_refused(tmp_path, where):
    import json

    out = _dp_checkpoint(tmp_path, True)
    path = out / "manifest.json"
    obj = json.loads(path.read_text())
    ranks = obj["ranks"]
    # a tensor that rank 6 (stage 1) does not store itself
    name, rec = next((n, t) for n, t in ranks[6]["tensors"].items() if "stored_in" in t)
    owner = rec["stored_in"]
    if where == "an alias":  # another stage-1 rank that itself points elsewhere
        rec["stored_in"] = next(r for r in range(4, 8) if r not in (6, owner)
                                and "stored_in" in ranks[r]["tensors"][name])
    else:  # a stage-0 rank: it holds another shard
        rec["stored_in"] = 1
    path.write_text(json.dumps(obj))
    with pytest.raises(CheckpointError, match="does not store an identical replica"):
        Checkpoint.open(out)


# -- ranks whose shard is all padding (format 3) ----------------------------------------------

def test_a_rank_whose_vocabulary_rows_are_all_padding_stores_its_zero_shard_and_old_formats_still_read(tmp_path):
    from scalai.compare import compare_checkpoints
    from scalai.reshard import reshard_checkpoint as reshard
    from scalai.models.synth import write_synthetic_checkpoint

    new = tmp_path / "new"
    write_synthetic_checkpoint("gpt-tiny", new, ParallelConfig.parse("tp=4,pp=2,dp=1"), seed=3)
    name = "embedding.word_embeddings.weight"
    with Checkpoint.open(new) as c:
        # tp rank 3 of both stages (ranks 3 and 7: the tied copy) holds its 384 padded rows
        for rank in (3, 7):
            assert c.manifest.ranks[rank].tensors[name].shape == (384, 64)
        owner = c.stored_in(3, name)
        assert not c.view(owner, name).any()  # zeros: Megatron's padding
        # the same state in format 2: no entry for the all-padding shards
        old_ptc = PTC(c.ptc.config, c.ptc.specs, c.ptc.num_layers, padding_shards=False)
        old = tmp_path / "old"
        with CheckpointWriter(old, old_ptc, c.state) as w:
            for r in range(old_ptc.config.world_size):
                for n, _ in old_ptc.rank_shards(r):
                    if w.stores(r, n):
                        w.array(r, n)[...] = c.view(r, n)
            w.commit()
    _edit_manifest(old, lambda m: m.update(version=2))
    assert name not in json.load(open(old / "manifest.json"))["ranks"][3]["tensors"]
    with Checkpoint.open(old) as a, Checkpoint.open(new) as b:
        a.verify()
        assert compare_checkpoints(a, b) is None and compare_checkpoints(b, a) is None
    # an old checkpoint reshards into the new format, equal to the new one's reshard
    reshard(old, tmp_path / "old1", ParallelConfig.parse("tp=1,pp=1,dp=2"))
    reshard(new, tmp_path / "new1", ParallelConfig.parse("tp=1,pp=1,dp=2"))
    with Checkpoint.open(tmp_path / "old1") as a, Checkpoint.open(tmp_path / "new1") as b:
        assert compare_checkpoints(a, b) is None
        assert all(np.array_equal(a.view(r, n), b.view(r, n)) for r in range(2) for n, _ in a.ptc.rank_shards(r))
