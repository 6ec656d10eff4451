"""Damaged or hostile checkpoint files: one line naming the file, never a traceback, a
hang or an unbounded read; the input untouched, nothing written (issue 11, item 6)."""

import json
import os
import shutil

import pytest

from cli_helpers import run, tree_digest
from scalai.checkpoint import SafetensorsReader
from scalai.config import ParallelConfig
from scalai.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """gpt-tiny in tp=2,pp=1,dp=1 (a vocabulary-parallel embedding, 4 layers)."""
    from scalai.models.synth import write_synthetic_checkpoint

    path = tmp_path_factory.mktemp("hostile") / "gpt"
    write_synthetic_checkpoint("gpt-tiny", path, ParallelConfig.parse("tp=2,pp=1,dp=1"), seed=1)
    return path


def _text(replace):
    def mutate(ckpt):
        path = ckpt / "manifest.json"
        path.write_text(replace(path.read_text()))
    return mutate


def _edit(change):
    def mutate(ckpt):
        path = ckpt / "manifest.json"
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))
    return mutate


def _vocab(**fields):
    def change(obj):
        for spec in obj["ptc"]["tensors"]:
            if spec["split"]["kind"] == "vocab":
                spec["split"].update(fields)
    return _edit(change)


def _replace_manifest(make):
    def mutate(ckpt):
        path = ckpt / "manifest.json"
        path.unlink()
        make(path)
    return mutate


def _deep_header(ckpt):
    """Rank 0's safetensors header replaced by arrays nested as deep as its length allows
    (thousands of levels), the file size unchanged so that only the header parser sees it."""
    path = ckpt / "rank-00000.safetensors"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    depth = n // 2
    data[8:8 + n] = (b"[" * depth + b"]" * depth).ljust(n)
    path.write_bytes(bytes(data))


def _symlink_loop(ckpt):
    path = ckpt / "rank-00001.safetensors"
    path.unlink()
    os.symlink(path, path)


_DEEP = "[" * 100_000 + "]" * 100_000
CASES = {
    "manifest nested 1e5 deep": (_text(lambda t: _DEEP), "manifest.json nests JSON 100000 levels deep"),
    "state nested 1e5 deep": (_text(lambda t: t.replace('"state": {', '"state": {"x": ' + _DEEP + ",")),
                              "manifest.json nests JSON 100002 levels deep"),
    "safetensors header nested": (_deep_header, "rank-00000.safetensors is truncated or corrupt: header nests JSON"),
    "vocab split multiple 0": (_vocab(multiple=0), "manifest.json is invalid: .*vocab split multiple=0"),
    "vocab split dim 7": (_vocab(dim=7), "manifest.json is invalid: .*vocab dim 7 is out of range for shape"),
    "rank file symlink loop": (_symlink_loop, "rank-00001.safetensors cannot be read .Too many levels of symbolic"),
    "manifest a directory": (_replace_manifest(os.mkdir), "manifest.json is a directory, not a regular file"),
    "manifest a FIFO": (_replace_manifest(os.mkfifo), r"manifest.json is a FIFO \(named pipe\)"),
    "manifest /dev/zero": (_replace_manifest(lambda p: os.symlink("/dev/zero", p)),
                           "manifest.json is a character device"),
    "5000-digit integer": (_text(lambda t: t.replace('"step": 1000', '"step": ' + "9" * 5000)),
                           "manifest.json is not valid JSON: an integer has more than 4300 digits"),
    "fractional size": (_text(lambda t: t.replace('"shape": [1100, 64]', '"shape": [1100.5, 64]', 1)),
                        r"manifest.json is invalid: .*shape \[1100.5, 64\] must hold non-negative integer"),
    "negative num_layers": (_edit(lambda m: m["ptc"].update(num_layers=-4)),
                            "manifest.json is invalid: .*num_layers=-4 is out of range"),
    "NaN in state": (_text(lambda t: t.replace('"step": 1000', '"step": NaN')),
                     "manifest.json is not valid JSON: NaN is not a JSON number"),
    "state.step a string": (_edit(lambda m: m["state"].update(step="1000")),
                            "manifest.json is invalid: state.step '1000' is not a non-negative integer"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["inspect", "reshard", "plan"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_files_get_one_line(capsys, tmp_path, tiny, case, command):
    import re

    mutate, fragment = CASES[case]
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    mutate(bad)
    before = tree_digest(bad) if case not in ("manifest a FIFO", "manifest /dev/zero", "rank file symlink loop") \
        else sorted(os.listdir(bad))
    args = {"inspect": ["inspect", bad, "--verify"],
            "reshard": ["reshard", bad, tmp_path / "out", "--to", "tp=1,pp=1,dp=1"],
            "plan": ["plan", bad, "--to", "tp=1,pp=1,dp=1"]}[command]
    r = run(capsys, *args)
    if command == "plan" and case == "safetensors header nested":
        assert r.code == 0, r.err  # planning reads shapes from the manifest only
        return
    assert r.code == 1, r.err
    assert r.err.startswith("scalai: error: ") and len(r.err.strip().splitlines()) == 1, r.err
    assert re.search(fragment, r.err), r.err
    assert str(bad) in r.err  # names the checkpoint
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    after = tree_digest(bad) if case not in ("manifest a FIFO", "manifest /dev/zero", "rank file symlink loop") \
        else sorted(os.listdir(bad))
    assert after == before


@pytest.mark.parametrize("entry", [
    b'{"dtype": "U8", "shape": [false], "data_offsets": [0, 0]}',  # found by the fuzz test
    b'{"dtype": "U8", "shape": [1.5], "data_offsets": [0, 1]}',
    b'{"dtype": "U8", "shape": [1], "data_offsets": [true, 1]}',
])
def test_a_safetensors_header_entry_of_wrong_types(tmp_path, entry):
    header = b'{"a": ' + entry + b"}"
    path = tmp_path / "f.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"x")
    with pytest.raises(CheckpointError, match="f.safetensors is truncated or corrupt: bad header entry for 'a'"):
        SafetensorsReader(path)


def test_a_safetensors_header_nested_1e5_deep(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "f.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="f.safetensors is truncated or corrupt: header nests JSON "
                                              "100000 levels deep, more than the 100 accepted"):
        SafetensorsReader(path)


@pytest.mark.parametrize("make, fragment", [
    (os.mkdir, "is a directory"),
    (os.mkfifo, r"is a FIFO \(named pipe\)"),
    (lambda p: os.symlink("/dev/zero", p), "is a character device"),
])
@pytest.mark.timeout(60)
def test_a_safetensors_file_that_is_not_a_file(tmp_path, make, fragment):
    path = tmp_path / "f.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=f"f.safetensors {fragment}, not a regular file"):
        SafetensorsReader(path)


def test_writers_refuse_what_readers_refuse(tmp_path):
    """A state that could not be read back (NaN, nested past the limit) is refused when
    saving, not discovered at the next load."""
    from scalai.checkpoint import save_arrays
    from scalai.models import model_ptc

    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    deep: list = []
    for _ in range(200):
        deep = [deep]
    for state, fragment in (({"lr": float("nan")}, "Out of range float"), ({"x": deep}, "nests JSON 202 levels")):
        with pytest.raises(ValueError, match=fragment):
            save_arrays(tmp_path / "c", ptc, {}, state)
        assert not os.listdir(tmp_path)
