"""Property-based fuzzing of the parsers of files scalai reads (issue 11): the checkpoint
manifest, safetensors headers, Megatron ``.idx`` files, a sample index's ``index.json``
and ``.npy`` arrays. Random bytes, and valid files with a few values replaced, deleted,
nested or made extreme, or a few bytes flipped, inserted, deleted or cut off.

The property: a parser either accepts its input (and what it accepted then reads within
bounds) or raises the project's own error for it (``CheckpointError`` for checkpoint
files, ``ValueError`` for data inputs being indexed, ``ScalaiError`` for a damaged
index), never anything else, within a budget: every example finishes within a generous
watchdog (a hang guard, 30 s for inputs of kilobytes) and its Python allocations
(tracemalloc) peak below 64 MiB.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import struct
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalai.checkpoint import SafetensorsReader, SafetensorsWriter
from scalai.checkpoint.manifest import parse_manifest
from scalai.errors import CheckpointError, ScalaiError

# CI runs a fixed set of examples (derandomized); SCALAI_FUZZ_EXAMPLES=5000 SCALAI_FUZZ_RANDOM=1
# explores further.
_SETTINGS = settings(max_examples=int(os.environ.get("SCALAI_FUZZ_EXAMPLES", 60)), deadline=None,
                     derandomize=os.environ.get("SCALAI_FUZZ_RANDOM") != "1", database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])
_SECONDS = 30
_PEAK_BYTES = 64 << 20


class OverBudget(BaseException):
    """An example ran past the watchdog (BaseException: no parser may swallow it)."""


@contextmanager
def budget():
    """Fail an example that hangs (watchdog) or allocates more than :data:`_PEAK_BYTES`."""
    def alarm(signum, frame):
        raise OverBudget(f"still running after {_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, _SECONDS)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < _PEAK_BYTES, f"allocated {peak / 2**20:.0f} MiB"


def accepts_or_refuses(errors, parse, *args):
    """``parse(*args)`` within budget; its result, or None when it raised one of ``errors``."""
    with budget():
        try:
            return parse(*args)
        except errors:
            return None


# -- mutations ------------------------------------------------------------------------------
_LEAF = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10)
         | st.sampled_from([0, -1, 1, 7, 2**31, 2**63, 10**40, 1.5, 1100.5, "", "\x00", "tp=0,pp=1,dp=1",
                            "tp=1,pp=1,dp=4096", "layer:3", "layer:-1", "layer:99999999999999999999",
                            "vocab", "fused", "split", "mesh", "bfloat16", "float128", "F32", "U8",
                            "rank-00000.safetensors", "/dev/zero", "scalai-checkpoint", "crc32"]))
_JSON = st.recursive(_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                        max_size=4), max_leaves=10)


def _paths(root, max_depth: int = 12) -> list[tuple]:
    """Every path into ``root`` down to ``max_depth`` (iterative: mutations nest deeply)."""
    out, stack = [], [(root, ())]
    while stack:
        node, trail = stack.pop()
        out.append(trail)
        if len(trail) < max_depth:
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            stack.extend((value, trail + (key,)) for key, value in items)
    return out


@st.composite
def mutated_json(draw, template) -> bytes:
    """``template`` (parsed JSON) with one to three values replaced, deleted, added or
    nested deeply, serialized (NaN and infinities included, as a hostile writer might)."""
    obj = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(_paths(obj), key=repr)))
        parent, key = None, None
        node = obj
        for step in path:
            parent, key, node = node, step, node[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "nest"]))
        if action == "add" and isinstance(node, (dict, list)):
            value = draw(_JSON)
            node.__setitem__(draw(st.text(max_size=8)), value) if isinstance(node, dict) else node.append(value)
        elif parent is None:
            obj = draw(_JSON)
        elif action == "delete":
            del parent[key]
        elif action == "nest":
            for _ in range(draw(st.sampled_from([50, 101, 5000]))):
                node = [node]
            parent[key] = node
        else:
            parent[key] = draw(_JSON)
    try:
        return json.dumps(obj).encode()
    except RecursionError:
        return b"[" * 5000 + b"]" * 5000


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` with one to four bytes flipped, runs inserted or deleted, or the end cut."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if action == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif action == "truncate":
            del out[at:]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff" * 8, b"\x00" * 8]))
            out[at:at + len(chunk)] = chunk
    return bytes(out)


# -- the checkpoint manifest ----------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_text(tmp_path_factory) -> bytes:
    from scalai.config import ParallelConfig
    from scalai.models.synth import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    write_synthetic_checkpoint("gpt-tiny", path, ParallelConfig.parse("tp=2,pp=1,dp=2"), seed=9)
    text = (path / "manifest.json").read_bytes()
    obj = json.loads(text)
    # Keep examples small: two layers' tensors (and their optimizer state) suffice.
    keep = [t for t in obj["ptc"]["tensors"] if "layers.2." not in t["name"] and "layers.3." not in t["name"]]
    obj["ptc"]["tensors"], obj["ptc"]["num_layers"] = keep, 2
    obj["state"] = {"step": obj["state"]["step"], "data": obj["state"]["data"]}  # no RNG blobs
    names = {t["name"] for t in keep}
    for rank in obj["ranks"]:
        rank["tensors"] = {n: t for n, t in rank["tensors"].items() if n in names}
    small = json.dumps(obj).encode()
    assert parse_manifest(small).ptc.config.world_size == 4  # the template itself is valid
    return small


def _check_manifest(data: bytes):
    manifest = parse_manifest(data, "fuzz/manifest.json")
    # what was accepted is a consistent layout: every rank's shards can be computed
    for rank in range(manifest.ptc.config.world_size):
        manifest.ptc.rank_shards(rank)
    return manifest


@_SETTINGS
@given(data=st.data())
def test_manifest_parser_on_mutated_manifests(manifest_text, data):
    text = data.draw(mutated_json(json.loads(manifest_text)) | mutated_bytes(manifest_text))
    accepts_or_refuses(CheckpointError, _check_manifest, text)


@_SETTINGS
@given(text=st.binary(max_size=2000) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_manifest_parser_on_random_input(text):
    assert accepts_or_refuses(CheckpointError, _check_manifest, text) is None  # nothing random is a manifest


# -- safetensors headers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "t.safetensors"
    entries = [("a", "float32", (3, 4)), ("b", "bfloat16", (5,)), ("c", "int64", (2, 1, 2)), ("empty", "uint8", (0,))]
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        for name, _, _ in entries:
            view = w.view(name)
            view[...] = np.arange(view.size, dtype=view.dtype).reshape(view.shape)
    return path.read_bytes()


def _read_safetensors(path):
    with SafetensorsReader(path) as reader:
        for name in reader.entries:
            np.asarray(reader.view(name)).copy()  # every accepted entry reads within the file
        return reader.entries


def _with_header(original: bytes, header: bytes) -> bytes:
    n = int.from_bytes(original[:8], "little")
    return len(header).to_bytes(8, "little") + header + original[8 + n:]


@_SETTINGS
@given(data=st.data())
def test_safetensors_reader_on_mutated_files(tmp_path, safetensors_file, data):
    n = int.from_bytes(safetensors_file[:8], "little")
    header = json.loads(safetensors_file[8:8 + n])
    blob = data.draw(mutated_json(header).map(lambda h: _with_header(safetensors_file, h))
                     | mutated_bytes(safetensors_file))
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    accepts_or_refuses(CheckpointError, _read_safetensors, path)


@_SETTINGS
@given(blob=st.binary(max_size=300)
       | st.binary(max_size=200).map(lambda h: len(h).to_bytes(8, "little") + h)
       | _JSON.map(lambda v: json.dumps(v).encode()).map(lambda h: len(h).to_bytes(8, "little") + h))
def test_safetensors_reader_on_random_files(tmp_path, blob):
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    accepts_or_refuses(CheckpointError, _read_safetensors, path)


# -- Megatron .idx --------------------------------------------------------------------------
def _megatron(prefix, docs: list[list[int]]) -> None:
    sizes = np.array([len(d) for d in docs], "<i4")
    pointers = (np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]) * 2).astype("<i8")
    bounds = np.arange(len(docs) + 1, dtype="<i8")
    prefix.with_suffix(".bin").write_bytes(np.concatenate([np.asarray(d, "<u2") for d in docs]).tobytes())
    prefix.with_suffix(".idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sizes), len(bounds))
                                           + sizes.tobytes() + pointers.tobytes() + bounds.tobytes())


def _index_megatron(prefix):
    from scalai.data.sources import discover, documents

    sources = discover([prefix.with_suffix(".bin")], fmt="megatron")
    for source in sources:
        first, count = documents(source)
        assert (count >= 0).all() and (first >= 0).all()
    return sources


@_SETTINGS
@given(data=st.data())
def test_megatron_index_reader_on_mutated_files(tmp_path, data):
    prefix = tmp_path / "corpus"
    _megatron(prefix, [list(range(20)), list(range(7)), list(range(13))])
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(data.draw(mutated_bytes(idx.read_bytes())
                              | st.binary(max_size=200).map(lambda b: b"MMIDIDX\x00\x00" + b)))
    accepts_or_refuses(ValueError, _index_megatron, prefix)


# -- the sample index -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_index(tmp_path_factory):
    from scalai.data import build_index

    root = tmp_path_factory.mktemp("fuzz-index")
    (root / "a.txt").write_bytes(bytes(range(256)) * 3)
    (root / "b.txt").write_bytes(b"scalai " * 40)
    index = build_index([root / "a.txt", root / "b.txt"], root / "idx", 16)
    return {name: (index.path / name).read_bytes() for name in ("index.json", "sample_file.npy",
                                                                 "sample_offset.npy")}


def _open_index(path):
    from scalai.data import SampleIndex

    index = SampleIndex.open(path)
    for sample in range(min(index.num_samples, 50)):
        index.segments(sample)
    return index


@_SETTINGS
@given(data=st.data())
def test_sample_index_reader_on_mutated_files(tmp_path, sample_index, data):
    path = tmp_path / "idx"
    path.mkdir(exist_ok=True)
    victim = data.draw(st.sampled_from(sorted(sample_index)))
    for name, content in sample_index.items():
        if name != victim:
            (path / name).write_bytes(content)
    original = sample_index[victim]
    mutated = mutated_bytes(original)
    if victim == "index.json":
        mutated = mutated_json(json.loads(original)) | mutated
    (path / victim).write_bytes(data.draw(mutated))
    accepts_or_refuses(ScalaiError, _open_index, path)
