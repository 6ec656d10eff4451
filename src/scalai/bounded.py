"""Reading untrusted input within bounds: regular files of at most N bytes, JSON of
bounded size and nesting depth.

Every reader of a file or a body that scalai did not just write itself goes through here,
so that a damaged or hostile input fails in one line naming it, instead of hanging (a
FIFO where a file was expected), reading without end (``/dev/zero``), recursing until the
interpreter gives up (JSON nested 100,000 deep) or allocating without bound.

- :func:`open_regular`: a read-only descriptor of a *regular* file (never blocks: a FIFO
  is refused, not waited on).
- :func:`read_regular`: its bytes, refused before reading when there are more than a
  limit.
- :func:`loads`: strict JSON: UTF-8, at most :data:`MAX_JSON_DEPTH` levels of nesting
  (checked before parsing), no ``NaN``/``Infinity`` (nor numbers that overflow to them),
  no integer of more digits than Python converts.
- :func:`read_json`: both together.

Each takes the exception type to raise (``error``): callers keep their own convention
(``CheckpointError`` for a damaged checkpoint, ``ValueError`` for a bad argument).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from typing import Any

import numpy as np

__all__ = ["MAX_JSON_DEPTH", "open_regular", "read_regular", "loads", "read_json", "file_kind",
           "may_continue"]

#: Deepest nesting of JSON arrays and objects accepted. scalai's own files nest about 6
#: deep; this leaves room for a caller's state and stays far below Python's recursion
#: limit, so that code walking a parsed value never recurses too deep.
MAX_JSON_DEPTH = 100

_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # a backslash and the character it escapes
_KEEP = b'[]{}"'
_TAIL = re.compile(r'[^\s,:\[\]{}"]*$')  # the last token, if it is a number or literal
_NUMBER_PREFIX = re.compile(r"-?(\d+(\.\d*)?([eE][+-]?\d*)?)?")
_DROP = bytes(c for c in range(256) if c not in _KEEP)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """``"a directory"``, ``"a FIFO (named pipe)"``, ... for an ``st_mode`` that is not a
    regular file (``"a regular file"`` for one)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


_FIX = "; replace it with the file it should be"


def open_regular(path: str | os.PathLike, what: str, error: type[Exception] = ValueError, hint: str = _FIX) -> int:
    """Open ``path`` read-only and return the descriptor, if it is a regular file.

    Opens without blocking (``O_NONBLOCK``: a FIFO with no writer would otherwise wait
    forever) and checks the opened file itself (``fstat``), so a file swapped in between
    cannot slip through. Symbolic links to regular files are followed.

    Raises:
        FileNotFoundError: ``path`` does not exist (callers often have a better message).
        error: ``path`` is a directory, FIFO, device or socket, or cannot be opened
            (permissions, a symbolic-link loop), naming ``what`` and ``path``; ``hint``
            (how to fix it) is appended.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{what} {path} cannot be opened: {exc.strerror or exc}{hint}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}{hint}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{what} {path} is {file_kind(mode)}, not a regular file{hint}")
    return fd


def read_regular(path: str | os.PathLike, limit: int, what: str, error: type[Exception] = ValueError,
                 hint: str = _FIX) -> bytes:
    """All bytes of the regular file ``path``, refused when it holds more than ``limit``.

    The size is checked before reading (and again while reading, should the file grow),
    so at most ``limit`` bytes are ever read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        error: not a regular file, unreadable, or larger than ``limit`` bytes.
    """
    fd = open_regular(path, what, error, hint)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{what} {path} holds {size} bytes, more than the {limit} scalai reads{hint}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(limit + 1 - total, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{what} {path} grew past the {limit} bytes scalai reads while being read{hint}")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}{hint}") from None
    finally:
        os.close(fd)


def _depth(data: bytes) -> int:
    """Deepest nesting of arrays and objects in the JSON ``data`` (brackets inside strings
    do not count). Linear and vectorized: about a hundredth of the time parsing takes."""
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)  # escapes occur only inside strings; \" must not end one
    kept = data.translate(None, _DROP)  # brackets and quotes only
    brackets = b"".join(kept.split(b'"')[0::2])  # what lies outside strings
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int8)
    return int(np.cumsum(steps, dtype=np.int64).max())


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a 64-bit float")
    return value


def loads(data: bytes | str, where: str, *, error: type[Exception] = ValueError, hint: str = "",
          max_bytes: int | None = None, max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False) -> Any:
    """Parse JSON ``data`` strictly and within bounds.

    Args:
        data: UTF-8 bytes or text.
        where: what the data is, for messages (a path, ``"--state"``, ``"request body"``).
        error: exception type raised for every problem.
        hint: appended to every message (how to fix it, e.g. ``"; rebuild the index"``).
        max_bytes: refuse longer data (``None``: no limit beyond the caller's read).
        max_depth: refuse deeper nesting of arrays and objects.
        allow_nan: accept ``NaN`` and infinities (Python's own JSON dialect, e.g. the loss
            of a diverged run in a metrics file); strict JSON otherwise.

    Raises:
        error: not UTF-8, longer than ``max_bytes``, nested deeper than ``max_depth``,
            not valid JSON, or holding ``NaN``, ``Infinity``, a number that overflows a
            float or an integer of more than 4300 digits.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{where} holds {len(data)} bytes of JSON, more than the {max_bytes} accepted{hint}")
    if isinstance(data, str):
        raw, text = data.encode("utf-8", "surrogatepass"), data
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where} is not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start}){hint}") \
                from None
    depth = _depth(raw)
    if depth > max_depth:
        raise error(f"{where} nests JSON {depth} levels deep, more than the {max_depth} accepted{hint}")
    try:
        if allow_nan:
            return json.loads(text)
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}{hint}") \
            from None
    except RecursionError:  # cannot happen below the depth limit; kept as a guard
        raise error(f"{where} nests JSON too deeply{hint}") from None
    except ValueError as exc:  # NaN, Infinity, overflowing floats, integers too long to convert
        reason = str(exc)
        if "integer string conversion" in reason:
            digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
            reason = f"an integer has more than {digits} digits"
        raise error(f"{where} is not valid JSON: {reason}{hint}") from None


def may_continue(data: bytes) -> bool:
    """Whether ``data``, not valid JSON itself, is the start of some valid JSON text that
    more bytes could complete (a write arriving in pieces), rather than garbage already.

    ``b'{"dp": 4'``, ``b'{"x": tr'`` and ``b'{"lr": 1e'`` may continue; ``b"garbage"``,
    ``b'{"dp": }'`` and anything nested deeper than :data:`MAX_JSON_DEPTH` may not.
    """
    if _depth(data) > MAX_JSON_DEPTH:
        return False
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end may continue
        return exc.reason == "unexpected end of data" and may_continue(data[:exc.start])
    in_string = re.sub(r"\\.", "", text).count('"') % 2 == 1
    tail = "" if in_string else _TAIL.search(text).group()
    if tail:  # a number or literal still being written: judge what precedes it
        if not (_NUMBER_PREFIX.fullmatch(tail) or any(w.startswith(tail) for w in ("true", "false", "null"))):
            return False
        text = text[: len(text) - len(tail)] + "0"
    try:
        json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text) or exc.msg.startswith("Unterminated string")
    return bool(tail)  # complete only once the tail is: may continue; else trailing data


def read_json(path: str | os.PathLike, limit: int, what: str, *, error: type[Exception] = ValueError,
              hint: str = "", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """:func:`read_regular` then :func:`loads` (messages name ``what`` and ``path``)."""
    data = read_regular(path, limit, what, error, hint or _FIX)
    return loads(data, f"{what} {os.fspath(path)}", error=error, hint=hint, max_depth=max_depth)
