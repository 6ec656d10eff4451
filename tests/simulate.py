"""In-memory simulation of layouts and plans, independent of the file-based executor.

Tests use it to check plans element by element: build every rank's local tensors from
global arrays through the PTC, run a plan's copies on numpy arrays, and read global
tensors back.
"""

from __future__ import annotations

import numpy as np

from scalai.layout.ptc import PTC
from scalai.planner.plan import Plan


def global_arrays(ptc: PTC, seed: int = 0) -> dict[str, np.ndarray]:
    """A distinct random int64 array per tensor (values identify their global position)."""
    rng = np.random.default_rng(seed)
    return {s.name: rng.integers(1, 2**62, size=s.shape, dtype=np.int64) for s in ptc.specs}


def scatter(ptc: PTC, glob: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every rank's local tensors (padding = 0)."""
    ranks: list[dict[str, np.ndarray]] = []
    for r in range(ptc.config.world_size):
        local = {}
        for name, shard in ptc.rank_shards(r):
            arr = np.zeros(shard.shape, dtype=np.int64)
            for p in shard.pieces:
                part = glob[name][p.global_region.to_slices()]
                arr[p.local_region.to_slices()] = part.reshape(p.local_region.sizes)
            local[name] = arr
        ranks.append(local)
    return ranks


def gather(ptc: PTC, ranks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Global tensors read back from the locals; asserts that replicas agree."""
    out = {s.name: np.full(s.shape, -1, dtype=np.int64) for s in ptc.specs}
    for r in range(ptc.config.world_size):
        for name, shard in ptc.rank_shards(r):
            for p in shard.pieces:
                vals = ranks[r][name][p.local_region.to_slices()].reshape(p.global_region.sizes)
                dst = out[name][p.global_region.to_slices()]
                seen = dst != -1
                assert np.array_equal(dst[seen], vals[seen]), f"replicas of {name} disagree on rank {r}"
                out[name][p.global_region.to_slices()] = vals
    return out


def execute(plan: Plan, old_ranks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run the plan's copies on numpy arrays (from_new copies last); padding stays 0."""
    ptc = plan.new.ptc
    new = [{name: np.zeros(s.shape, dtype=np.int64) for name, s in ptc.rank_shards(r)}
           for r in range(ptc.config.world_size)]
    for from_new in (False, True):
        for c in plan.copies:
            if c.from_new != from_new:
                continue
            src = (new if from_new else old_ranks)[c.src_rank][c.tensor]
            dst = new[c.dst_rank][c.tensor]
            c.dst.select(dst)[...] = c.src.select(src)
    return new


def padding_is_zero(ptc: PTC, ranks: list[dict[str, np.ndarray]]) -> bool:
    for r in range(ptc.config.world_size):
        for name, shard in ptc.rank_shards(r):
            mask = np.ones(shard.shape, dtype=bool)
            for p in shard.pieces:
                mask[p.local_region.to_slices()] = False
            if np.any(ranks[r][name][mask] != 0):
                return False
    return True


def _cuts(shape, boxes) -> list[np.ndarray]:
    """Per dimension, every coordinate where a box starts or ends (0 and the size included)."""
    cuts = [{0, n} for n in shape]
    for b in boxes:
        for d, (o, s) in enumerate(zip(b.offsets, b.sizes)):
            cuts[d].update((o, o + s))
    return [np.array(sorted(c)) for c in cuts]


def _mask(cuts: list[np.ndarray], boxes) -> np.ndarray:
    """The elements covered by ``boxes``, on the grid of cells between ``cuts``."""
    mask = np.zeros([len(c) - 1 for c in cuts], dtype=bool)
    for b in boxes:
        mask[tuple(slice(int(np.searchsorted(c, o)), int(np.searchsorted(c, o + s)))
                   for c, o, s in zip(cuts, b.offsets, b.sizes))] = True
    return mask


def _cell_volumes(cuts: list[np.ndarray]) -> np.ndarray:
    """Elements in every cell of the grid (an outer product of the cut widths)."""
    volumes = np.ones((), dtype=np.int64)
    for c in cuts:
        volumes = np.multiply.outer(volumes, np.diff(c).astype(np.int64))
    return volumes


def _boxes_by_host(dep, ranks) -> dict[str, dict[str, list]]:
    """``{tensor: {host: [global boxes]}}`` that ``ranks`` of deployment ``dep`` store."""
    out: dict[str, dict[str, list]] = {}
    for r in ranks:
        host = dep.placement.host(r)
        for name, shard in dep.ptc.rank_shards(r):
            out.setdefault(name, {}).setdefault(host, []).extend(p.global_region for p in shard.pieces)
    return out


def host_lower_bounds(old, new, unavailable=()) -> dict[str, int]:
    """Cross-host lower bound per destination host, by element masks: for every host of
    ``new``, the elements of each tensor that its new ranks store and that no available
    old rank on the same host stores, times the element size. Hosts that need nothing
    from elsewhere are left out.

    Independent of the planner: built only from each rank's local shards (their global
    boxes, ``PTC.rank_shards``) and the placements, never from fragment groups, copies or
    statistics. Masks are kept on the grid of cells cut by the boxes' edges (each cell
    weighted by its element count), which is exact and keeps large models cheap.
    """
    from scalai.dtypes import itemsize

    lost = set(unavailable)
    need = _boxes_by_host(new, range(new.ptc.config.world_size))
    have = _boxes_by_host(old, [r for r in range(old.ptc.config.world_size) if r not in lost])
    out: dict[str, int] = {}
    for name, by_host in need.items():
        spec = new.ptc.spec(name)
        held = have.get(name, {})
        cuts = _cuts(spec.shape, [b for boxes in (*by_host.values(), *held.values()) for b in boxes])
        volumes = _cell_volumes(cuts)
        for host, boxes in by_host.items():
            missing = _mask(cuts, boxes) & ~_mask(cuts, held.get(host, []))
            nbytes = int(volumes[missing].sum()) * itemsize(spec.dtype)
            if nbytes:
                out[host] = out.get(host, 0) + nbytes
    return out


def lower_bound_bytes(old, new, unavailable=()) -> int:
    """The cross-host lower bound summed over destination hosts (:func:`host_lower_bounds`)."""
    return sum(host_lower_bounds(old, new, unavailable).values())


def elements_without_a_source(old, unavailable=()) -> list[str]:
    """Tensors of which some element is stored by no available old rank (a plan must fail)."""
    lost = set(unavailable)
    held = _boxes_by_host(old, [r for r in range(old.ptc.config.world_size) if r not in lost])
    out = []
    for spec in old.ptc.specs:
        boxes = [b for bs in held.get(spec.name, {}).values() for b in bs]
        cuts = _cuts(spec.shape, boxes)
        if not _mask(cuts, boxes).all():
            out.append(spec.name)
    return out


def cross_host_received(plan: Plan) -> dict[str, int]:
    """Bytes each destination host receives from other hosts under ``plan``, counted from
    its copies alone: the source rank's host (old placement, or the new one for a fan-out
    copy) against the destination rank's host, and the destination window's element count
    times the element size (not the plan's own labels, byte counts or statistics)."""
    from scalai.dtypes import itemsize

    out: dict[str, int] = {}
    for c in plan.copies:
        src = (plan.new if c.from_new else plan.old).placement.host(c.src_rank)
        dst = plan.new.placement.host(c.dst_rank)
        if src != dst:
            nbytes = c.dst.volume * itemsize(plan.new.ptc.spec(c.tensor).dtype)
            if nbytes:
                out[dst] = out.get(dst, 0) + nbytes
    return out


def host_unchanged_bytes(old, new, unavailable=()) -> dict[str, int]:
    """Per host of ``new``, the bytes of the tensors its new ranks store that an available
    old rank on the same host stores unchanged: the same dtype, local shape and pieces
    (every global box at the same local box), the pieces covering the whole local tensor
    (a shard with padding is copied: the copy zeroes what the old file holds there). What
    stores link instead of copying. Hosts with none are left out.

    Independent of the planner and the runner: built only from each rank's local shards
    (``PTC.rank_shards``), the specs' dtypes and the placements.
    """
    from math import prod

    from scalai.dtypes import itemsize

    lost = set(unavailable)
    held: dict[tuple[str, str], set] = {}
    for r in range(old.ptc.config.world_size):
        if r in lost:
            continue
        for name, shard in old.ptc.rank_shards(r):
            key = (shard.shape, old.ptc.spec(name).dtype,
                   frozenset((p.global_region, p.local_region) for p in shard.pieces))
            held.setdefault((old.placement.host(r), name), set()).add(key)
    out: dict[str, int] = {}
    for r in range(new.ptc.config.world_size):
        host = new.placement.host(r)
        for name, shard in new.ptc.rank_shards(r):
            dtype = new.ptc.spec(name).dtype
            whole = sum(p.local_region.volume for p in shard.pieces) == prod(shard.shape) > 0
            key = (shard.shape, dtype, frozenset((p.global_region, p.local_region) for p in shard.pieces))
            if whole and key in held.get((host, name), ()):
                out[host] = out.get(host, 0) + prod(shard.shape) * itemsize(dtype)
    return out
