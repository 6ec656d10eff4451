"""N-dimensional boxes over tensor index space.

A :class:`Region` is a half-open box ``[offsets, offsets + sizes)`` of a tensor's index
space. Regions are the one currency of the layout and planning core: a rank's shard of a
global tensor is a set of disjoint regions of it, and a plan moves regions between ranks.

Everything here is pure and allocation-light; no tensor data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable, Sequence

__all__ = [
    "Region",
    "subtract",
    "flat_runs",
    "gaps",
    "contiguous_boxes",
    "disjoint",
    "bounding_box",
]


@dataclass(frozen=True, slots=True)
class Region:
    """A box ``[offsets[i], offsets[i] + sizes[i])`` in each dimension ``i``.

    A 0-d region (``offsets == sizes == ()``) stands for a scalar and has volume 1.
    Sizes may be 0 (an empty region); offsets and sizes are never negative.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise ValueError(
                f"region offsets {self.offsets} and sizes {self.sizes} differ in rank"
            )
        if any(o < 0 for o in self.offsets) or any(s < 0 for s in self.sizes):
            raise ValueError(f"region {self.offsets}+{self.sizes} has a negative extent")

    @classmethod
    def full(cls, shape: Sequence[int]) -> Region:
        """The region covering a whole tensor of ``shape``."""
        return cls((0,) * len(shape), tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def volume(self) -> int:
        """Number of elements (1 for a scalar)."""
        return prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    def intersect(self, other: Region) -> Region | None:
        """The common box of two regions, or ``None`` when they do not overlap."""
        offsets = []
        sizes = []
        for a, sa, b, sb in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo = a if a > b else b
            hi = min(a + sa, b + sb)
            if hi <= lo:
                return None
            offsets.append(lo)
            sizes.append(hi - lo)
        return Region(tuple(offsets), tuple(sizes))

    def contains(self, other: Region) -> bool:
        """Whether ``other`` lies entirely inside this region."""
        return all(
            a <= b and b + sb <= a + sa
            for a, sa, b, sb in zip(self.offsets, self.sizes, other.offsets, other.sizes)
        )

    def shift(self, delta: Sequence[int]) -> Region:
        """This region moved by ``delta`` (may be negative; the result must stay >= 0)."""
        return Region(tuple(o + d for o, d in zip(self.offsets, delta)), self.sizes)

    def relative_to(self, origin: Region) -> Region:
        """This region in the coordinates of ``origin``'s corner."""
        return Region(tuple(o - p for o, p in zip(self.offsets, origin.offsets)), self.sizes)

    def to_slices(self) -> tuple[slice, ...]:
        """Slices that index this region out of an array holding the whole index space."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def to_json(self) -> list[list[int]]:
        return [list(self.offsets), list(self.sizes)]

    @classmethod
    def from_json(cls, obj: Sequence[Sequence[int]]) -> Region:
        offsets, sizes = obj
        return cls(tuple(int(x) for x in offsets), tuple(int(x) for x in sizes))

    def __repr__(self) -> str:
        inner = ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes))
        return f"Region[{inner}]"


def subtract(a: Region, b: Region) -> list[Region]:
    """``a`` minus ``b`` as at most ``2 * ndim`` disjoint boxes (``[a]`` if they miss)."""
    cut = a.intersect(b)
    if cut is None:
        return [a]
    pieces: list[Region] = []
    offsets = list(a.offsets)
    sizes = list(a.sizes)
    for d in range(a.ndim):
        lo, hi = offsets[d], offsets[d] + sizes[d]
        clo, chi = cut.offsets[d], cut.offsets[d] + cut.sizes[d]
        if clo > lo:
            pieces.append(Region(tuple(offsets[:d]) + (lo,) + tuple(offsets[d + 1 :]),
                                 tuple(sizes[:d]) + (clo - lo,) + tuple(sizes[d + 1 :])))
        if chi < hi:
            pieces.append(Region(tuple(offsets[:d]) + (chi,) + tuple(offsets[d + 1 :]),
                                 tuple(sizes[:d]) + (hi - chi,) + tuple(sizes[d + 1 :])))
        offsets[d], sizes[d] = clo, chi - clo
    return pieces


def disjoint(regions: Sequence[Region]) -> bool:
    """Whether no two of ``regions`` overlap (sweep over dimension 0; O(n log n) typical)."""
    if len(regions) < 2:
        return True
    if regions[0].ndim == 0:
        return len(regions) <= 1
    order = sorted(regions, key=lambda r: r.offsets[0])
    active: list[Region] = []
    for r in order:
        start = r.offsets[0]
        active = [a for a in active if a.offsets[0] + a.sizes[0] > start]
        if any(a.intersect(r) is not None for a in active):
            return False
        active.append(r)
    return True


def flat_runs(shape: Sequence[int], region: Region) -> list[tuple[int, int]]:
    """Row-major element ranges ``[start, stop)`` that ``region`` occupies in ``shape``.

    Adjacent runs are merged, so a region spanning whole trailing dimensions gives one run.
    The number of runs is the product of the region's sizes over the leading dimensions
    that it does not span fully.
    """
    ndim = len(shape)
    if ndim == 0:
        return [(0, 1)]
    # Innermost dimensions that the region spans completely merge into one run.
    d = ndim - 1
    run = 1
    while d >= 0 and region.offsets[d] == 0 and region.sizes[d] == shape[d]:
        run *= shape[d]
        d -= 1
    if d < 0:
        return [(0, run)]
    run *= region.sizes[d]
    strides = [1] * ndim
    for i in range(ndim - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    starts = [sum(o * s for o, s in zip(region.offsets, strides))]
    for i in range(d - 1, -1, -1):
        starts = [s + k * strides[i] for k in range(region.sizes[i]) for s in starts]
    starts.sort()
    runs: list[tuple[int, int]] = []
    for s in starts:
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + run)
        else:
            runs.append((s, s + run))
    return runs


def gaps(runs: Iterable[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The ranges ``[start, stop)`` of ``0..n`` that none of ``runs`` (``[start, stop)``
    ranges, overlapping or not, in any order) covers, in order."""
    out, pos = [], 0
    for a, b in sorted(runs):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < n:
        out.append((pos, n))
    return out


def contiguous_boxes(shape: Sequence[int], start: int, stop: int) -> list[Region]:
    """The flat element range ``[start, stop)`` of a row-major ``shape`` as boxes.

    Each box is contiguous in row-major order, and the boxes are listed in flat order, so
    that concatenating their row-major contents gives the flat range. At most
    ``2 * ndim - 1`` boxes.
    """
    ndim = len(shape)
    if stop <= start:
        return []
    if ndim == 0:
        return [Region((), ())]
    return _boxes(tuple(shape), 0, start, stop, ())


def _boxes(shape: tuple[int, ...], d: int, start: int, stop: int,
           prefix: tuple[int, ...]) -> list[Region]:
    """Boxes for flat ``[start, stop)`` of the sub-array at index ``prefix``, dims ``d:``."""
    inner = prod(shape[d + 1 :])
    rest = len(shape) - d - 1
    first, last = start // inner, (stop - 1) // inner
    starts_aligned, stops_aligned = start % inner == 0, stop % inner == 0
    if first == last and not (starts_aligned and stops_aligned):
        return _boxes(shape, d + 1, start - first * inner, stop - first * inner, prefix + (first,))
    out: list[Region] = []
    if not starts_aligned:
        out.extend(_boxes(shape, d + 1, start - first * inner, inner, prefix + (first,)))
    mid_lo = first if starts_aligned else first + 1
    mid_hi = last + 1 if stops_aligned else last
    if mid_hi > mid_lo:
        out.append(Region(prefix + (mid_lo,) + (0,) * rest,
                          (1,) * len(prefix) + (mid_hi - mid_lo,) + shape[d + 1 :]))
    if not stops_aligned:
        out.extend(_boxes(shape, d + 1, 0, stop - last * inner, prefix + (last,)))
    return out


def bounding_box(regions: Iterable[Region]) -> Region | None:
    """The smallest region containing all of ``regions`` (``None`` for none)."""
    regions = list(regions)
    if not regions:
        return None
    lo = [min(r.offsets[d] for r in regions) for d in range(regions[0].ndim)]
    hi = [max(r.offsets[d] + r.sizes[d] for r in regions) for d in range(regions[0].ndim)]
    return Region(tuple(lo), tuple(h - l for l, h in zip(lo, hi)))
