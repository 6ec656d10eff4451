"""Reading untrusted files and JSON within bounds (scalai.bounded)."""

import json
import os

import pytest

from scalai.bounded import MAX_JSON_DEPTH, loads, open_regular, read_json, read_regular
from scalai.errors import CheckpointError


@pytest.fixture
def specials(tmp_path):
    """A directory, a FIFO, a symbolic-link loop and a link to /dev/zero, each where a
    file was expected."""
    paths = {"dir": tmp_path / "dir", "fifo": tmp_path / "fifo", "loop": tmp_path / "loop",
             "zero": tmp_path / "zero"}
    paths["dir"].mkdir()
    os.mkfifo(paths["fifo"])
    os.symlink(paths["loop"], paths["loop"])
    os.symlink("/dev/zero", paths["zero"])
    return paths


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, fragment", [
    ("dir", "is a directory, not a regular file"),
    ("fifo", r"is a FIFO \(named pipe\), not a regular file"),  # must not wait for a writer
    ("loop", "cannot be opened: Too many levels of symbolic links"),
    ("zero", "is a character device, not a regular file"),  # must not read without end
])
def test_only_regular_files_are_read(specials, kind, fragment):
    with pytest.raises(CheckpointError, match=fragment) as info:
        read_regular(specials[kind], 1 << 20, "manifest", CheckpointError)
    assert str(specials[kind]) in str(info.value)
    with pytest.raises(CheckpointError, match=fragment):
        os.close(open_regular(specials[kind], "manifest", CheckpointError))


def test_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 101)
    assert read_regular(path, 101, "f") == b"x" * 101
    with pytest.raises(ValueError, match="holds 101 bytes, more than the 100 scalai reads"):
        read_regular(path, 100, "f")
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 100, "f")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("text, fragment", [
    (_nested(100_000), "nests JSON 100000 levels deep, more than the 100 accepted"),
    ('{"a": ' + _nested(MAX_JSON_DEPTH) + "}", f"nests JSON {MAX_JSON_DEPTH + 1} levels deep"),
    ('{"step": NaN}', "NaN is not a JSON number"),
    ('{"step": -Infinity}', "-Infinity is not a JSON number"),
    ('{"lr": 1e999}', "1e999 overflows a 64-bit float"),
    ('{"step": ' + "9" * 5000 + "}", "an integer has more than 4300 digits"),
    (b'{"a": "\xff"}', "not UTF-8 text"),
    ('{"a": [1, 2}', "not valid JSON: Expecting ',' delimiter at line 1 column 12"),
])
def test_bad_json_is_one_error_naming_its_source(text, fragment):
    with pytest.raises(CheckpointError, match=fragment) as info:
        loads(text, "x/manifest.json", error=CheckpointError, hint="; use an earlier checkpoint")
    message = str(info.value)
    assert message.startswith("x/manifest.json ") and message.endswith("; use an earlier checkpoint")
    assert "\n" not in message


@pytest.mark.parametrize("value", [
    {"a": "[[[[" * 100, "b": ['"{{{', "\\", "\\\"[["]},  # brackets, quotes, escapes in strings
    [[[[[1]]]]],
    {"deep": json.loads(_nested(MAX_JSON_DEPTH - 1))},
    "plain", 3, -2.5, None, [],
])
def test_valid_json_within_the_bounds_parses_as_json_does(value):
    text = json.dumps(value)
    assert loads(text, "x") == value == loads(text.encode(), "x")


def test_size_limit_of_json():
    assert loads(b"[1]", "body", max_bytes=3) == [1]
    with pytest.raises(ValueError, match="body holds 4 bytes of JSON, more than the 3 accepted"):
        loads(b"[1 ]", "body", max_bytes=3)


def test_read_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"seed": 1}')
    assert read_json(path, 100, "state file") == {"seed": 1}
    path.write_text("[" * 200 + "]" * 200)
    with pytest.raises(ValueError, match=f"state file {path} nests JSON 200 levels deep"):
        read_json(path, 1000, "state file")


@pytest.mark.parametrize("prefix, continues", [
    (b'{"dp": 4', True), (b'{"dp', True), (b'{"d\\"p', True), (b'{"a": [1, 2', True), (b"", True),
    (b'{"lr": 1e', True), (b'{"x": tr', True), (b'{"x": nul', True), (b'{"x": -', True),
    (b'{"a": "\xc3', True),                       # a character cut between its bytes
    (b"garbage", False), (b'{"dp": }', False), (b'{"dp": 4} x', False), (b'{"x": truex', False),
    (b'{"x" 1', False), (b"\xff", False), (b"[" * 200, False), (b'{"x": 1}', False),
])
def test_may_continue_tells_a_prefix_from_garbage(prefix, continues):
    from scalai.bounded import may_continue

    assert may_continue(prefix) is continues
