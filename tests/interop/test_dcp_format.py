"""DCP's on-disk format read safely: .metadata, torch.save blobs, key roles, chunks as a PTC.

Fixtures are written by torch's own ``dcp.save`` and ``torch.save``; the expected values are
the tensors handed to them.
"""

from __future__ import annotations

import io
import os
import pickle
import zlib

import numpy as np
import pytest
import torch
from dcp_helpers import damaged_copy, evil_pickle, truncate, write_metadata_pickle

from scalai.config import ParallelConfig
from scalai.errors import CheckpointError
from scalai.interop.dcp.keys import classify
from scalai.interop.dcp.layout import Chunks, dcp_layout, model_rules
from scalai.interop.dcp.metadata import DcpChunk, DcpIndex, DcpTensor, StoredBlob, parse_metadata, read_index
from scalai.interop.dcp.torchsave import TensorBlob, read_object, read_tensor_record
from scalai.interop.rules import FORMAT, Rules
from scalai.interop.dcp.pickles import restricted_loads
from scalai.interop.unpickle import UnsafePickleError
from scalai.layout.splits import Split
from scalai.regions import Region


# -- the restricted unpickler -----------------------------------------------------------

def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(UnsafePickleError, match=r"refers to (os|posix)\.system.*never runs code"):
        restricted_loads(evil_pickle(marker), {}, what="x.pkl")
    assert not marker.exists()


def test_allowed_globals_resolve_to_what_the_allow_list_says():
    data = pickle.dumps(Region((1,), (2,)))
    stand_in = restricted_loads(data, {("scalai.regions", "Region"): Region}, what="x")
    assert stand_in == Region((1,), (2,))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        restricted_loads(data[:-5], {("scalai.regions", "Region"): Region}, what="x")


# -- .metadata ----------------------------------------------------------------------------

def test_metadata_written_by_dcp_save_reads_into_plain_data(small_dcp):
    path, saved = small_dcp
    index = read_index(path)
    assert index.version == "1.0.0"
    tensors = {k: t for k, t in index.tensors.items()}
    assert set(tensors) == set(saved)
    for key, value in saved.items():
        t = tensors[key]
        assert t.shape == tuple(value.shape) and t.dtype == str(value.dtype).removeprefix("torch.")
        assert len(t.chunks) == 1 and t.chunks[0].offsets == (0,) * value.dim()
    assert "optim.param_groups" in index.objects or any(k.startswith("optim.param_groups.") for k in index.objects)


def test_every_chunk_blob_is_found_in_place(small_dcp):
    path, saved = small_dcp
    index = read_index(path)
    for key, value in saved.items():
        chunk = index.tensors[key].chunks[0]
        fd = os.open(os.path.join(path, chunk.blob.file), os.O_RDONLY)
        try:
            rec = read_tensor_record(fd, chunk.blob, key)
            raw = os.pread(fd, value.numel() * value.element_size(), rec.start)
        finally:
            os.close(fd)
        expected = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert rec.shape == tuple(value.shape) and rec.contiguous and raw == expected
        assert rec.crc == zlib.crc32(expected)


def test_object_values_read_as_plain_python(small_dcp):
    path, _ = small_dcp
    index = read_index(path)
    values = {}
    for key, blob in index.objects.items():
        fd = os.open(os.path.join(path, blob.file), os.O_RDONLY)
        try:
            values[key] = read_object(fd, blob, key)
        finally:
            os.close(fd)
    assert values["optim.param_groups.0.lr"] == 0.01 and values["optim.param_groups.0.betas"] == (0.9, 0.95)


def test_metadata_that_would_run_code_is_refused_in_one_line(small_dcp, tmp_path):
    bad = damaged_copy(small_dcp[0], tmp_path / "evil")
    marker = tmp_path / "ran"
    (bad / ".metadata").write_bytes(evil_pickle(marker))
    with pytest.raises(UnsafePickleError) as info:
        read_index(bad)
    assert "\n" not in str(info.value) and ".metadata refers to" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / ".metadata", os.path.getsize(d / ".metadata") // 2), "truncated or corrupt"),
    (lambda d: (d / ".metadata").write_bytes(b"not a pickle at all"), "truncated or corrupt"),
    (lambda d: write_metadata_pickle(d, {"state_dict_metadata": {}}), "not valid DCP metadata"),
    (lambda d: (d / ".metadata").unlink(), "not a PyTorch DCP checkpoint"),
    (lambda d: (d / "__0_0.distcp").unlink(), r"__0_0\.distcp is missing"),
    (lambda d: truncate(d / "__0_0.distcp", 100), "is truncated"),
])
def test_damaged_checkpoints_fail_in_one_line(small_dcp, tmp_path, damage, message):
    bad = damaged_copy(small_dcp[0], tmp_path / "bad")
    damage(bad)
    with pytest.raises(CheckpointError, match=message) as info:
        read_index(bad)
    assert "\n" not in str(info.value)


def _metadata_with(path, change):
    """The fixture's metadata, unpickled by pickle itself (the test trusts its own file), changed."""
    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    change(md)
    return pickle.dumps(md)


def test_storage_outside_the_directory_and_newer_versions_are_refused(small_dcp):
    path = small_dcp[0]

    def escape(md):
        info = next(iter(md.storage_data.values()))
        info.relative_path = "../../etc/passwd"

    with pytest.raises(CheckpointError, match="not a file inside the checkpoint directory"):
        parse_metadata(_metadata_with(path, escape))
    with pytest.raises(CheckpointError, match="format version '2.0.0'"):
        parse_metadata(_metadata_with(path, lambda md: setattr(md, "version", "2.0.0")))

    def outside(md):
        t = next(v for v in md.state_dict_metadata.values() if hasattr(v, "chunks"))
        t.chunks[0].sizes = torch.Size([s + 1 for s in t.chunks[0].sizes])

    with pytest.raises(CheckpointError, match="lies outside its size"):
        parse_metadata(_metadata_with(path, outside))


# -- torch.save blobs ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype, shape", [("float32", (3, 5)), ("bfloat16", (7,)), ("int64", ()),
                                          ("float16", (2, 3, 4)), ("float32", (0, 4))])
def test_blobs_laid_out_here_load_with_torch_load(dtype, shape):
    t = (torch.arange(int(np.prod(shape)), dtype=torch.float64) * 1.5 - 3).reshape(shape).to(getattr(torch, dtype))
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    layout = TensorBlob(dtype, shape)
    crc = zlib.crc32(raw)
    blob = bytearray(layout.header) + raw + layout.trailer(crc)
    blob[layout.crc_offset:layout.crc_offset + 4] = layout.crc_patch(crc)
    assert len(blob) == layout.length and layout.data_offset % 64 == 0
    loaded = torch.load(io.BytesIO(bytes(blob)), weights_only=True)
    assert loaded.dtype == t.dtype and torch.equal(loaded, t)


def _torch_blob(tmp_path, t: torch.Tensor, prefix: bytes = b"x" * 11):
    buf = io.BytesIO()
    torch.save(t, buf)
    path = tmp_path / "blob"
    path.write_bytes(prefix + buf.getvalue())
    return path, StoredBlob("blob", len(prefix), len(buf.getvalue()))


def test_strided_and_unchecksummed_blobs(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t().clone()  # clone keeps the transposed strides
    path, blob = _torch_blob(tmp_path, t)
    fd = os.open(path, os.O_RDONLY)
    try:
        rec = read_tensor_record(fd, blob, "t")
    finally:
        os.close(fd)
    assert rec.shape == (4, 3) and rec.strides == (1, 4) and not rec.contiguous and rec.crc is None
    torch.serialization.set_crc32_options(False)
    try:
        path, blob = _torch_blob(tmp_path, torch.ones(3))
    finally:
        torch.serialization.set_crc32_options(True)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_tensor_record(fd, blob, "t").crc is None  # not recorded: no checksum claimed
    finally:
        os.close(fd)


def test_a_blob_whose_pickle_would_run_code_is_refused(tmp_path):
    layout = TensorBlob("float32", (2,))
    good = bytes(layout.header) + b"\0" * 8 + layout.trailer(0)
    evil = evil_pickle(tmp_path / "ran")
    # Same length as the real data.pkl, so the zip stays well formed.
    pkl_start = good.index(b"\x80\x02")
    pkl_end = good.index(b".", good.index(b"OrderedDict")) + 1
    evil = evil[:-1].ljust(pkl_end - pkl_start - 1, b" ") + b"."
    path = tmp_path / "blob"
    path.write_bytes(good[:pkl_start] + evil + good[pkl_end:])
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(UnsafePickleError, match="refers to"):
            read_tensor_record(fd, StoredBlob("blob", 0, len(good)), "blob")
    finally:
        os.close(fd)
    assert not (tmp_path / "ran").exists()


def test_garbage_is_not_a_blob(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\0" * 500)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError, match="not a torch.save archive"):
            read_tensor_record(fd, StoredBlob("blob", 0, 500), "blob")
    finally:
        os.close(fd)


# -- key roles ----------------------------------------------------------------------------

def test_keys_of_get_state_dict_and_of_torchtitan():
    c = classify(["model.a.weight", "optim.state.a.weight.exp_avg", "optim.state.a.weight.step", "extra"],
                 ["optim.param_groups.0.lr", "optim.param_groups.0.params"])
    assert (c.model_prefix, c.optimizer_prefix) == ("model.", "optim.")
    assert c.params == {"a.weight": "model.a.weight"} and c.states == {("a.weight", "exp_avg"): "optim.state.a.weight.exp_avg"}
    assert c.steps == {"a.weight": "optim.state.a.weight.step"} and c.other == ["extra"]
    assert c.groups == {("0", "lr"): "optim.param_groups.0.lr", ("0", "params"): "optim.param_groups.0.params"}
    t = classify(["tok.weight", "optimizer.state.tok.weight.exp_avg_sq"],
                 ["optimizer.param_groups.tok.weight.lr", "lr_scheduler", "train_state"])
    assert (t.model_prefix, t.optimizer_prefix) == ("", "optimizer.")
    assert t.params == {"tok.weight": "tok.weight"} and ("tok.weight", "exp_avg_sq") in t.states
    assert t.groups == {("tok.weight", "lr"): "optimizer.param_groups.tok.weight.lr"}
    assert sorted(t.other) == ["lr_scheduler", "train_state"]


# -- chunks as a PTC ----------------------------------------------------------------------

def _index(tensors: dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]],
           dtype: str = "float32") -> DcpIndex:
    out = {}
    for key, (shape, chunks) in tensors.items():
        out[key] = DcpTensor(key, shape, dtype, tuple(
            DcpChunk(o, s, StoredBlob(f"__{i}_0.distcp", 0, 1)) for i, (o, s) in enumerate(chunks)))
    return DcpIndex(out, {}, "1.0.0")


ROWS = [((0, 0), (2, 4)), ((4, 0), (2, 4)), ((2, 0), (2, 4)), ((6, 0), (2, 4))]  # FSDP2 + TP order


def test_chunks_become_slots_of_a_ptc():
    index = _index({"model.w": ((8, 4), ROWS), "model.b": ((4,), [((0,), (4,))]),
                    "optim.state.w.exp_avg": ((8, 4), ROWS), "optim.state.w.step": ((), [((), ())])})
    layout = dcp_layout(index)
    ptc = layout.ptc
    assert ptc.config == ParallelConfig(dp=4)
    assert ptc.names == ["w", "b", "optimizer.exp_avg.w"]
    assert ptc.spec("optimizer.exp_avg.w").param == "w"
    ptc.validate()
    for slot, (offsets, sizes) in enumerate(ROWS):
        shard = dict(ptc.rank_shards(slot))["w"]
        assert shard.shape == sizes and shard.pieces[0].global_region == Region(offsets, sizes)
        assert layout.slots[(slot, "w")].key == "model.w"
    assert [n for n, _ in ptc.rank_shards(1)] == ["w", "optimizer.exp_avg.w"]  # b: one chunk, in slot 0
    assert layout.unmapped == {}


def test_fused_tensors_take_every_part_s_chunks_shifted():
    index = _index({"model.wq": ((4, 2), [((0, 0), (2, 2)), ((2, 0), (2, 2))]),
                    "model.wk": ((2, 2), [((0, 0), (1, 2)), ((1, 0), (1, 2))]),
                    "model.wv": ((2, 2), [((0, 0), (2, 2))])})
    rules = Rules.from_json({"format": FORMAT, "dims": {"num_heads": 2, "num_kv_heads": 1, "head_dim": 2},
                             "tensors": [{"name": "qkv", "split": "qkv", "where": "first",
                                          "from": ["wq", "wk", "wv"]}]})
    layout = dcp_layout(index, rules)
    ptc = layout.ptc
    assert ptc.spec("qkv").shape == (8, 2)
    assert ptc.spec("qkv").split == Chunks((Region((0, 0), (2, 2)), Region((2, 0), (2, 2)), Region((4, 0), (1, 2)),
                                            Region((5, 0), (1, 2)), Region((6, 0), (2, 2))))
    assert layout.slots[(3, "qkv")].key == "model.wk" and layout.slots[(4, "qkv")].key == "model.wv"
    ptc.validate()
    assert ptc.relayout(ParallelConfig(tp=1)).spec("qkv").split.kind == "fused"


def test_transposed_and_padded_parts():
    """A part stored transposed, and a padded vocabulary of which the model keeps 5 rows."""
    index = _index({"model.emb": ((8, 3), [((0, 0), (4, 3)), ((4, 0), (4, 3))]),
                    "model.proj": ((3, 4), [((0, 0), (3, 2)), ((0, 2), (3, 2))])})
    rules = Rules.from_json({"format": FORMAT, "dims": {"vocab_size": 5, "vocab_multiple": 1}, "tensors": [
        {"name": "emb", "split": "vocab", "where": "first", "from": ["emb"]},
        {"name": "proj", "split": "column", "where": "last", "from": [{"key": "proj", "transpose": True}]}]})
    layout = dcp_layout(index, rules)
    emb, proj = layout.ptc.spec("emb"), layout.ptc.spec("proj")
    assert emb.shape == (5, 3) and emb.split.boxes == (Region((0, 0), (4, 3)), Region((4, 0), (1, 3)))
    assert layout.slots[(1, "emb")].rows == 1 and layout.slots[(0, "emb")].rows is None
    assert proj.shape == (4, 3) and proj.split.boxes == (Region((0, 0), (2, 3)), Region((2, 0), (2, 3)))
    assert layout.slots[(1, "proj")].transpose
    layout.ptc.validate()


def test_chunks_that_leave_a_gap_are_refused_and_overlaps_are_read_once():
    gap = _index({"model.w": ((8, 4), ROWS[:3])})
    with pytest.raises(CheckpointError, match="hold 24 of its 32 elements"):
        dcp_layout(gap)
    overlap = _index({"model.w": ((8, 4), ROWS[:3] + [((5, 0), (3, 4))])})
    layout = dcp_layout(overlap)  # DCP allows chunks that repeat elements: the planner reads each once
    layout.ptc.validate()


def test_keep_selects_the_destination_s_tensors_and_reports_the_rest():
    index = _index({"model.w": ((8, 4), ROWS), "optim.state.w.exp_avg": ((8, 4), ROWS),
                    "optim.state.w.momentum_buffer": ((8, 4), ROWS)})
    layout = dcp_layout(index, keep={"w", "optimizer.exp_avg.w"})
    assert layout.ptc.names == ["w", "optimizer.exp_avg.w"]
    assert list(layout.unmapped) == ["optim.state.w.momentum_buffer"]


def test_relayout_uses_the_model_s_rules():
    index = _index({"model.layers.0.w": ((8, 4), ROWS), "model.layers.1.w": ((8, 4), ROWS),
                    "optim.state.layers.0.w.exp_avg": ((8, 4), ROWS),
                    "optim.state.layers.1.w.exp_avg": ((8, 4), ROWS)})
    rules = Rules.from_json({"format": FORMAT, "tensors": [
        {"name": "layers.{layer}.w", "split": "column", "from": ["layers.{layer}.w"]}]})
    ptc = dcp_layout(index, rules).ptc
    new = ptc.relayout(ParallelConfig(tp=2, pp=2))
    assert new.num_layers == 2 and new.spec("layers.1.w").split == Split(0)
    assert new.spec("optimizer.exp_avg.layers.1.w").split == Split(0)
    assert new.spec("optimizer.exp_avg.layers.1.w").param == "layers.1.w"
    new.validate()
    with pytest.raises(ValueError, match="give --model M"):
        dcp_layout(index).ptc.relayout(ParallelConfig(tp=2))


def test_model_rules_read_a_scalai_model_under_its_own_names():
    from scalai.models import model_ptc

    ptc = model_ptc("llama-tiny", "tp=1")
    index = _index({f"model.{s.name}" if s.param is None else f"optim.state.{s.param}.{s.state}":
                    (s.shape, [((0,) * len(s.shape), s.shape)]) for s in ptc.specs})
    layout = dcp_layout(index, model_rules("llama-tiny"))
    new = layout.ptc.relayout(ParallelConfig(tp=2, pp=2))
    assert [(s.name, s.split, s.residence) for s in new.specs] == \
        [(s.name, s.split, s.residence) for s in ptc.relayout(ParallelConfig(tp=2, pp=2)).specs]


def test_a_blob_over_4_gib_uses_zip64_records(tmp_path):
    """Laid out only (a sparse file): the zip64 fields that Python's zipfile and the reader check."""
    import zipfile

    n = (5 << 30) // 4
    layout = TensorBlob("float32", (n,))
    assert layout.nbytes == 4 * n and layout.data_offset % 64 == 0
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.write(layout.header)
        f.seek(layout.trailer_offset)
        f.write(layout.trailer(0x1234ABCD))
        f.seek(layout.crc_offset)
        f.write(layout.crc_patch(0x1234ABCD))
    assert os.path.getsize(path) == layout.length
    with zipfile.ZipFile(path) as zf:
        data = zf.getinfo("archive/data/0")
        assert data.file_size == 4 * n and data.CRC == 0x1234ABCD
    fd = os.open(path, os.O_RDONLY)
    try:
        rec = read_tensor_record(fd, StoredBlob("big", 0, layout.length), "big")
    finally:
        os.close(fd)
    assert rec.shape == (n,) and rec.start == layout.data_offset and rec.crc == 0x1234ABCD


def test_metadata_beyond_the_limits_is_refused_before_it_is_built(small_dcp, monkeypatch):
    from scalai.limits import LimitError

    data = open(os.path.join(small_dcp[0], ".metadata"), "rb").read()
    monkeypatch.setenv("SCALAI_MAX_LOCAL_TENSORS", "5")  # the fixture has 12 tensors, one chunk each
    with pytest.raises(LimitError, match=r"has 12 \(rank, tensor\) pairs.*SCALAI_MAX_LOCAL_TENSORS"):
        parse_metadata(data)
    monkeypatch.setenv("SCALAI_MAX_TENSORS", "11")
    with pytest.raises(LimitError, match="has 12 tensors"):
        parse_metadata(data)
    # Before unpickling: a .metadata of len(data) bytes may hold len(data) // 256 chunks.
    monkeypatch.setenv("SCALAI_MAX_LOCAL_TENSORS", str(len(data) // 256 - 1))
    with pytest.raises(LimitError, match=r"DCP metadata .*bytes"):
        read_index(small_dcp[0])


@pytest.mark.parametrize("make, box", [
    (lambda: torch.arange(24.0).reshape(2, 3, 4), ((1, 1, 0), (1, 2, 4))),  # one contiguous run
    (lambda: torch.arange(24.0).reshape(2, 3, 4), ((0, 1, 1), (2, 2, 2))),  # a span, then strided
    (lambda: torch.arange(12.0).reshape(3, 4).t().clone(), ((1, 0), (2, 3))),  # stored transposed
    (lambda: torch.arange(600 * 1024, dtype=torch.float32).reshape(600, 1024), ((5, 7), (590, 3))),  # row by row
    (lambda: torch.arange(600 * 1024, dtype=torch.float32).reshape(600, 1024).t().clone(), ((2, 10), (3, 580))),
    (lambda: torch.tensor(7.0), ((), ())),
])
def test_boxes_are_read_in_place_whatever_the_strides(tmp_path, make, box):
    from scalai.interop.dcp.source import _read_box

    t = make()
    path, blob = _torch_blob(tmp_path, t)
    offsets, sizes = box
    want = t[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
    fd = os.open(path, os.O_RDONLY)
    try:
        rec = read_tensor_record(fd, blob, "t")
        out = np.zeros(sizes, np.uint32)
        _read_box(fd, rec, offsets, sizes, out, "t")
        assert torch.equal(torch.from_numpy(out.view(np.float32)), want)
        outT = np.zeros(sizes[::-1], np.uint32)  # into a strided view, as a transposed part is read
        _read_box(fd, rec, offsets, sizes, outT.T, "t")
        assert torch.equal(torch.from_numpy(np.array(outT.T, order="C").view(np.float32)), want)
    finally:
        os.close(fd)
