"""Compare two checkpoints by their global tensors, whatever their layouts.

The comparison is a plan from ``a``'s layout to ``b``'s, executed as comparisons instead
of copies: every element of every local tensor of ``b`` (every replica included) is
checked against the element of ``a`` that the plan would copy there, bit for bit.
Padding is not global state and is not compared. Non-tensor state must be equal too,
except per-rank RNG states when the layouts differ (see :mod:`scalai.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Placement
from .layout.splits import LocalShard
from .planner import Deployment, make_plan
from .storage.base import ArraySource, TensorSource

__all__ = ["Difference", "compare_checkpoints"]

_BLOCK = 1 << 24  # elements compared at once


@dataclass(frozen=True)
class Difference:
    """The first difference found: what, and where."""

    what: str

    def __str__(self) -> str:
        return self.what


def _selected(source: TensorSource, rank: int, tensor: str, window) -> np.ndarray:
    """The elements ``window`` selects: a view where the source's tensors are arrays, a copy
    read out otherwise (an object store)."""
    part = source.part(rank)
    if isinstance(part, ArraySource):
        return window.select(part.array(rank, tensor))
    return source.read_window(rank, tensor, window)


def compare_checkpoints(a: TensorSource, b: TensorSource) -> Difference | None:
    """``None`` when ``a`` and ``b`` hold the same state bit for bit, else the first difference
    (any two sources: directories, object stores, ...)."""
    a_specs = {s.name: s for s in a.ptc.specs}
    b_specs = {s.name: s for s in b.ptc.specs}
    for name in sorted(a_specs.keys() | b_specs.keys()):
        if name not in b_specs:
            return Difference(f"tensor {name} is in A but not in B")
        if name not in a_specs:
            return Difference(f"tensor {name} is in B but not in A")
        sa, sb = a_specs[name], b_specs[name]
        if (sa.shape, sa.dtype) != (sb.shape, sb.dtype):
            return Difference(f"tensor {name} is {sa.dtype}{list(sa.shape)} in A but {sb.dtype}{list(sb.shape)} in B")
    diff = _compare_state(a.state, b.state, a.ptc.config, b.ptc.config)
    if diff:
        return diff
    # One host holding every rank of both layouts: every copy reads A directly (no fan-out).
    place = Placement(max(a.ptc.config.world_size, b.ptc.config.world_size))
    plan = make_plan(Deployment(a.ptc, place), Deployment(b.ptc, place))
    shards = {(r, n): s for r in range(b.ptc.config.world_size) for n, s in b.ptc.rank_shards(r)}
    for c in sorted(plan.copies, key=lambda c: (c.tensor, c.dst_rank)):
        assert not c.from_new, "a single-host plan never fans out"
        where = _first_mismatch(_selected(a, c.src_rank, c.tensor, c.src),
                                _selected(b, c.dst_rank, c.tensor, c.dst))
        if where is not None:
            local = _window_index(c.dst, where)
            glob = _local_to_global(shards[(c.dst_rank, c.tensor)], local)
            return Difference(f"tensor {c.tensor} differs at global index {list(glob)} "
                              f"(rank {c.dst_rank} of B, local index {list(local)})")
    return None


def _first_mismatch(x: np.ndarray, y: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first unequal element (same-shape raw arrays), compared in row blocks."""
    if x.ndim == 0:
        return None if x == y else ()
    rows = max(1, _BLOCK // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, x.shape[0], rows):
        bx, by = x[start:start + rows], y[start:start + rows]
        if not np.array_equal(bx, by):
            idx = np.unravel_index(int(np.argmax(bx != by)), bx.shape)
            return (start + int(idx[0]),) + tuple(int(i) for i in idx[1:])
    return None


def _window_index(window, index: tuple[int, ...]) -> tuple[int, ...]:
    """Local index (in the local tensor) of ``index`` inside a window's selection."""
    if window.view is None:
        return tuple(o + i for o, i in zip(window.region.offsets, index))
    inner = tuple(o + i for o, i in zip(window.sub.offsets, index))
    flat = int(np.ravel_multi_index(inner, window.view))
    return (window.region.offsets[0] + flat,)


def _local_to_global(shard: LocalShard, local: tuple[int, ...]) -> tuple[int, ...]:
    for p in shard.pieces:
        loc, glob = p.local_region, p.global_region
        if all(o <= i < o + s for o, s, i in zip(loc.offsets, loc.sizes, local)):
            rel = tuple(i - o for i, o in zip(local, loc.offsets))
            if loc.sizes != glob.sizes:  # flat ZeRO shard: row-major position in the global box
                rel = tuple(int(v) for v in np.unravel_index(rel[0], glob.sizes))
            return tuple(o + r for o, r in zip(glob.offsets, rel))
    return local


def _compare_state(sa: dict, sb: dict, ca, cb) -> Difference | None:
    """Equal non-tensor state. RNG: the seed, and under equal degrees every rank's effective
    generator states on load (restored or re-seeded, see :mod:`scalai.state`)."""
    from .state import effective_rng

    same_degrees = (ca.tp, ca.pp, ca.dp) == (cb.tp, cb.pp, cb.dp)
    for key in sorted(set(sa) | set(sb)):
        va, vb = sa.get(key), sb.get(key)
        if key == "rng" and isinstance(va, dict) and isinstance(vb, dict):
            va, vb = {"seed": va.get("seed")}, {"seed": vb.get("seed")}
            if same_degrees and va == vb:
                va, vb = effective_rng(sa, ca), effective_rng(sb, cb)
                if va != vb:
                    rank = next(r for r in va if va[r] != vb.get(r))
                    return Difference(f"the RNG states of rank {rank} differ")
                continue
        if va != vb:
            return Difference(f"non-tensor state {key!r} differs: A has {_short(va)}, B has {_short(vb)}")
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
