"""Region geometry of one tensor between two layouts, independent of ranks and hosts.

For one tensor, :func:`fragment_groups` intersects the old holdings' pieces with the new
holdings' pieces and returns *groups*: sets of disjoint global boxes ("fragments") that
have the same old owners (the holdings that store them now) and the same new owners (the
holdings that need them). Every element of the tensor lies in exactly one fragment, and a
fragment lies wholly inside or wholly outside every piece, so planning decisions can be
made per group and per destination rank rather than per element.

The result depends only on the holdings' geometry (their keys), not on which ranks hold
them, so it is cached across the many layers that share a shape and split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from ..layout.ptc import Holding
from ..layout.splits import Piece
from ..regions import Region, disjoint, subtract
from .plan import Window

__all__ = ["Group", "fragment_groups", "window_of"]

# (global box, {holding index: piece holding it})
_Cell = tuple[Region, dict[int, Piece]]


@dataclass
class Group:
    """Fragments with the same old owners and the same new owners.

    Attributes:
        old: indices (into the old holdings) of the holdings storing these fragments.
        new: indices (into the new holdings) of the holdings needing them.
        fragments: ``(global box, {old index: piece}, {new index: piece})``.
        volume: elements in all fragments.
    """

    old: tuple[int, ...]
    new: tuple[int, ...]
    fragments: list[tuple[Region, dict[int, Piece], dict[int, Piece]]]
    volume: int = 0
    _pairs: dict[tuple, list[tuple[Window, Window]]] = field(default_factory=dict)

    def pairs(self, old_index: int, new_index: int) -> list[tuple[Window, Window]]:
        """(source window, destination window) pairs moving this group from an old holding
        into a new one, coalesced."""
        return self._paired(("old", old_index, new_index), 1, old_index, new_index)

    def fanout_pairs(self, peer_index: int, new_index: int) -> list[tuple[Window, Window]]:
        """Pairs copying this group from one new holding (filled earlier) into another."""
        return self._paired(("new", peer_index, new_index), 2, peer_index, new_index)

    def _paired(self, key, src_side: int, src_index: int, new_index: int):
        cached = self._pairs.get(key)
        if cached is None:
            raw = [(window_of(frag[src_side][src_index], frag[0]), window_of(frag[2][new_index], frag[0]))
                   for frag in self.fragments]
            cached = self._pairs[key] = coalesce(raw)
        return cached


def window_of(piece: Piece, box: Region) -> Window:
    """The local window of ``piece`` that holds global ``box`` (which lies inside it)."""
    g, loc = piece.global_region, piece.local_region
    if g.sizes == loc.sizes:
        return Window(Region(tuple(b - o + l for b, o, l in zip(box.offsets, g.offsets, loc.offsets)),
                             box.sizes))
    return Window(loc, g.sizes, box.relative_to(g))


def coalesce(pairs: list[tuple[Window, Window]]) -> list[tuple[Window, Window]]:
    """Merge pairs whose source and destination windows are adjacent along the same dim."""
    if len(pairs) < 2:
        return pairs
    pairs = sorted(pairs, key=lambda p: (p[1].region.offsets, p[1].sub.offsets if p[1].sub else ()))
    out = [pairs[0]]
    for src, dst in pairs[1:]:
        psrc, pdst = out[-1]
        d = _adjacent_dim(psrc, src)
        if d is not None and d == _adjacent_dim(pdst, dst):
            out[-1] = (_merge(psrc, src, d), _merge(pdst, dst, d))
        else:
            out.append((src, dst))
    return out


def _adjacent_dim(a: Window, b: Window) -> int | None:
    """The dim along which plain window ``b`` directly follows ``a``, if any."""
    if a.view is not None or b.view is not None:
        return None
    ra, rb = a.region, b.region
    found = None
    for d in range(ra.ndim):
        if ra.offsets[d] == rb.offsets[d] and ra.sizes[d] == rb.sizes[d]:
            continue
        if found is not None or ra.offsets[d] + ra.sizes[d] != rb.offsets[d]:
            return None
        found = d
    return found


def _merge(a: Window, b: Window, d: int) -> Window:
    r = a.region
    sizes = r.sizes[:d] + (r.sizes[d] + b.region.sizes[d],) + r.sizes[d + 1:]
    return Window(Region(r.offsets, sizes))


def fragment_groups(old: tuple[Holding, ...], new: tuple[Holding, ...]) -> list[Group]:
    """Groups of fragments of one tensor (see the module docstring). Cached by geometry."""
    return _groups_cached(tuple(h.key for h in old), tuple(h.key for h in new), old, new)


_CACHE: dict[tuple, list[Group]] = {}
_CACHE_LIMIT = 4096


def _groups_cached(old_keys: tuple, new_keys: tuple, old: tuple[Holding, ...],
                   new: tuple[Holding, ...]) -> list[Group]:
    key = (old_keys, new_keys)
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        hit = _CACHE[key] = _compute_groups(old, new)
    return hit


def _cells(holdings: tuple[Holding, ...]) -> list[_Cell]:
    """Disjoint global boxes, each with every holding (and its piece) that stores it."""
    cells: list[_Cell] = [(p.global_region, {i: p}) for i, h in enumerate(holdings) for p in h.shard.pieces]
    if disjoint([c[0] for c in cells]):
        return cells
    # Overlapping holdings (a tied embedding's two ZeRO-sharded copies): refine into an
    # arrangement where each cell lies wholly inside or outside every piece.
    refined: list[_Cell] = []
    for box, owners in cells:
        pending = [box]
        next_refined: list[_Cell] = []
        for cbox, cowners in refined:
            hit = [(b, cbox.intersect(b)) for b in pending]
            if not any(i is not None for _, i in hit):
                next_refined.append((cbox, cowners))
                continue
            rest = [cbox]
            new_pending = []
            for b, inter in hit:
                if inter is None:
                    new_pending.append(b)
                    continue
                next_refined.append((inter, {**cowners, **owners}))
                rest = [q for r in rest for q in subtract(r, inter)]
                new_pending.extend(subtract(b, inter))
            next_refined.extend((r, cowners) for r in rest)
            pending = new_pending
        refined = next_refined + [(b, dict(owners)) for b in pending]
    return refined


def _bounds(cells: list[_Cell]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([c[0].offsets for c in cells], dtype=np.int64).reshape(len(cells), -1)
    hi = lo + np.array([c[0].sizes for c in cells], dtype=np.int64).reshape(len(cells), -1)
    return lo, hi


def _compute_groups(old: tuple[Holding, ...], new: tuple[Holding, ...]) -> list[Group]:
    old_cells, new_cells = _cells(old), _cells(new)
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], Group] = {}
    if not old_cells or not new_cells:
        return []
    olo, ohi = _bounds(old_cells)
    nlo, nhi = _bounds(new_cells)
    # Candidate pairs by vectorized box overlap; (n_new, n_old) booleans.
    overlap = np.all((nlo[:, None, :] < ohi[None, :, :]) & (olo[None, :, :] < nhi[:, None, :]), axis=2)
    for ni, oi in zip(*np.nonzero(overlap)):
        nbox, nowners = new_cells[ni]
        obox, oowners = old_cells[oi]
        box = nbox.intersect(obox)
        if box is None:  # touching only
            continue
        key = (tuple(sorted(oowners)), tuple(sorted(nowners)))
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(key[0], key[1], [])
        group.fragments.append((box, oowners, nowners))
        group.volume += box.volume
    return list(groups.values())
