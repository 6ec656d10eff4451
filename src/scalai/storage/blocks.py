"""Cutting windows into blocks: where a window's elements lie, and pieces of bounded size.

Pure helpers of the plan runner. A :class:`~scalai.planner.Window` selects elements of a
local tensor (a box, optionally a reshaped view of a flat range); the runner needs to know
when that selection is one contiguous run of the tensor's bytes (then it is one ``write``),
and how to cut a large copy into blocks of at most a few MiB (so that buffers, ranged reads
and uploads stay bounded).
"""

from __future__ import annotations

from math import prod
from typing import Iterator, Sequence

import numpy as np

from ..planner.plan import Window
from ..regions import Region

__all__ = ["CHUNK_BYTES", "window_span", "blocks", "split_window", "select"]

#: Bytes of each worker's buffer: the most one block or one ``write`` moves.
CHUNK_BYTES = 4 << 20


def _box_start(shape: Sequence[int], region: Region) -> int | None:
    """Row-major start element of ``region`` in ``shape`` if the box is contiguous there."""
    offsets, sizes, nd = region.offsets, region.sizes, len(shape)
    k = 0
    while k < nd and sizes[k] == 1:
        k += 1
    for d in range(k + 1, nd):  # after the first dimension of more than one: whole
        if offsets[d] or sizes[d] != shape[d]:
            return None
    start, stride = 0, 1
    for d in range(nd - 1, -1, -1):
        start += offsets[d] * stride
        stride *= shape[d]
    return start


def window_span(shape: Sequence[int], window: Window) -> int | None:
    """Start element of ``window`` in a local tensor of ``shape`` when its selection is one
    contiguous row-major run (in the window's own row-major order), else ``None``."""
    start = _box_start(shape, window.region)
    if start is None or window.view is None:
        return start
    inner = _box_start(window.view, window.sub)
    return None if inner is None else start + inner


def blocks(shape: tuple[int, ...], max_elems: int) -> Iterator[tuple]:
    """Index tuples cutting an array of ``shape`` into blocks of at most ``max_elems``
    elements (at least one element each), each contiguous once copied out, row-major order."""
    nd = len(shape)
    if nd == 0:
        yield ()
        return
    suffix = [1] * (nd + 1)
    for i in range(nd - 1, -1, -1):
        suffix[i] = suffix[i + 1] * shape[i]
    axis = next(i for i in range(nd) if suffix[i + 1] <= max_elems)
    step = max(1, max_elems // suffix[axis + 1])
    for prefix in np.ndindex(*shape[:axis]):
        for lo in range(0, shape[axis], step):
            yield prefix + (slice(lo, min(lo + step, shape[axis])),)


def _sub(window: Window, box: Region) -> Window:
    """The part of ``window`` whose selection is ``box`` (box in selection coordinates)."""
    if window.view is None:
        return Window(Region(tuple(o + b for o, b in zip(window.region.offsets, box.offsets)), box.sizes))
    return Window(window.region, window.view,
                  Region(tuple(o + b for o, b in zip(window.sub.offsets, box.offsets)), box.sizes))


def split_window(src: Window, dst: Window, itemsize: int, max_bytes: int) -> list[tuple[Window, Window]]:
    """Cut a copy's (source, destination) windows into pairs of at most ``max_bytes`` each
    (at least one element), in row-major order of the selection."""
    shape = src.shape
    if prod(shape) * itemsize <= max_bytes:
        return [(src, dst)]
    out = []
    for index in blocks(shape, max(1, max_bytes // itemsize)):
        offsets, sizes = [], []
        for i in index:
            if isinstance(i, slice):
                offsets.append(i.start)
                sizes.append(i.stop - i.start)
            else:
                offsets.append(i)
                sizes.append(1)
        k = len(index)
        box = Region(tuple(offsets) + (0,) * (len(shape) - k), tuple(sizes) + tuple(shape[k:]))
        out.append((_sub(src, box), _sub(dst, box)))
    return out


#: ``select(window, local)``: :meth:`Window.select` (a view, also for 0-d selections).
select = Window.select
