"""Names and regions as they appear in store URLs: validation and text forms. Pure.

Everything a client puts in a path or query string passes through here, on the client
(to fail early with a clear message) and on the server (to answer 400 instead of touching
the file system). A name is never used as a path before :func:`check_name` accepted it:
no ``/``, no leading ``.``, so ``..`` and hidden files cannot be named.

Windows travel as three query parameters (see :func:`window_query`)::

    region=0:128,256:512      a box of the local tensor, one start:stop per dim
    view=16,64                the box (a flat range) reshaped to this shape ...
    sub=0:4,0:64              ... and cut to this box (ZeRO flat shards)
"""

from __future__ import annotations

import re
from math import prod
from typing import Mapping, Sequence

from ..dtypes import DTYPES
from ..planner.plan import Window
from ..regions import Region

__all__ = ["NameError_", "check_name", "check_tensor_name", "check_rank", "check_dtype",
           "parse_shape", "format_shape", "parse_box", "format_box", "window_query",
           "parse_window", "window_shape", "MAX_NAME", "MAX_TENSOR_NAME", "MAX_RANK", "MAX_DIMS"]

MAX_NAME = 128          # characters of a job, version or host name
MAX_TENSOR_NAME = 255   # characters of a tensor name (one file name)
MAX_RANK = 1 << 20      # ranks per job
MAX_DIMS = 16           # dimensions of a tensor

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_TENSOR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class NameError_(ValueError):
    """A name, rank, dtype, shape or region that the store refuses (HTTP 400)."""


def check_name(value: str, what: str = "name") -> str:
    """A job, version or host name: letters, digits, ``_ . -``, not starting with ``.``."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or not _NAME.fullmatch(value):
        raise NameError_(f"{what} {value!r} is not allowed: use 1-{MAX_NAME} letters, digits, "
                         f"'_', '.' or '-', starting with a letter or digit (no '/', no '..')")
    return value


def check_tensor_name(value: str) -> str:
    """A tensor name (e.g. ``decoder.layers.0.mlp.linear_fc1.weight``)."""
    if (not isinstance(value, str) or not value or len(value) > MAX_TENSOR_NAME
            or not _TENSOR.fullmatch(value) or value.startswith(".")):
        raise NameError_(f"tensor name {value!r} is not allowed: use 1-{MAX_TENSOR_NAME} letters, "
                         f"digits, '_', '.' or '-', not starting with '.' (no '/')")
    return value


def check_rank(value: str | int) -> int:
    """A rank as text or int: 0 <= rank < 2**20."""
    try:
        rank = int(value)
        ok = isinstance(value, int) or _digits(value)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= rank < MAX_RANK:
        raise NameError_(f"rank {value!r} is not an integer in [0, {MAX_RANK})")
    return rank


def check_dtype(value: str) -> str:
    if value not in DTYPES:
        raise NameError_(f"dtype {value!r} is not supported; use one of {', '.join(DTYPES)}")
    return value


def _digits(text) -> bool:
    return isinstance(text, str) and text.isascii() and text.isdigit()


def _ints(text: str, what: str) -> list[int]:
    if text == "":
        return []
    parts = text.split(",")
    if len(parts) > MAX_DIMS or not all(_digits(p) and len(p) <= 18 for p in parts):
        raise NameError_(f"{what} {text!r} is malformed: give up to {MAX_DIMS} comma-separated "
                         f"non-negative integers, e.g. 768,3072 (empty for a scalar)")
    return [int(p) for p in parts]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"768,3072"`` -> ``(768, 3072)``; ``""`` is a scalar."""
    return tuple(_ints(text, "shape"))


def format_shape(shape: Sequence[int]) -> str:
    return ",".join(str(int(s)) for s in shape)


def parse_box(text: str, what: str = "region") -> Region:
    """``"0:128,256:512"`` -> the box [0,128) x [256,512); ``""`` is the 0-d box."""
    if text == "":
        return Region((), ())
    dims = text.split(",")
    if len(dims) > MAX_DIMS:
        raise NameError_(f"{what} {text!r} has more than {MAX_DIMS} dimensions")
    offsets, sizes = [], []
    for d in dims:
        lo, sep, hi = d.partition(":")
        if not sep or not _digits(lo) or not _digits(hi) or len(lo) > 18 or len(hi) > 18:
            raise NameError_(f"{what} {text!r} is malformed: give start:stop per dimension, "
                             f"comma-separated, e.g. 0:128,256:512")
        if int(hi) < int(lo):
            raise NameError_(f"{what} {text!r}: stop {hi} is before start {lo}")
        offsets.append(int(lo))
        sizes.append(int(hi) - int(lo))
    return Region(tuple(offsets), tuple(sizes))


def format_box(region: Region) -> str:
    return ",".join(f"{o}:{o + s}" for o, s in zip(region.offsets, region.sizes))


def window_query(window: Window | Region | None) -> dict[str, str]:
    """Query parameters selecting ``window`` (none: the whole tensor)."""
    if window is None:
        return {}
    if isinstance(window, Region):
        return {"region": format_box(window)}
    query = {"region": format_box(window.region)}
    if window.view is not None:
        query["view"] = format_shape(window.view)
        query["sub"] = format_box(window.sub)
    return query


def parse_window(query: Mapping[str, str], shape: Sequence[int]) -> Window | None:
    """The window that ``query`` selects from a local tensor of ``shape`` (``None``: all).

    Raises:
        NameError_: malformed, out of bounds, or a view that does not fit (the message
            says which and what the tensor's shape is).
    """
    shape = tuple(shape)
    unknown = set(query) - {"region", "view", "sub"}
    if unknown:
        raise NameError_(f"unknown query parameters {sorted(unknown)}; use region, view, sub")
    if "region" not in query:
        if "view" in query or "sub" in query:
            raise NameError_("view and sub need a region (the flat range they reshape)")
        return None
    region = parse_box(query["region"])
    _inside(region, shape, "region", "the tensor's shape")
    if ("view" in query) != ("sub" in query):
        raise NameError_("give view and sub together (reshape the region to view, then cut sub)")
    if "view" not in query:
        return Window(region)
    if region.ndim != 1:
        raise NameError_(f"a view reshapes a flat (1-d) region; region {query['region']!r} has "
                         f"{region.ndim} dimensions")
    view = parse_shape(query["view"])
    if prod(view) != region.volume:
        raise NameError_(f"view {list(view)} has {prod(view)} elements but region "
                         f"{query['region']!r} has {region.volume}")
    sub = parse_box(query["sub"], "sub")
    _inside(sub, view, "sub", "view")
    return Window(region, view, sub)


def _inside(box: Region, shape: tuple[int, ...], what: str, of: str) -> None:
    if box.ndim != len(shape) or any(o + s > n for o, s, n in zip(box.offsets, box.sizes, shape)):
        raise NameError_(f"{what} {format_box(box)!r} does not lie inside {of} {list(shape)}")


def window_shape(window: Window | None, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of what ``window`` selects from a tensor of ``shape``."""
    return tuple(shape) if window is None else window.shape
