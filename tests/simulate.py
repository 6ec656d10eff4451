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


def lower_bound_bytes(old, new) -> int:
    """Cross-host lower bound by brute force over element masks."""
    total = 0
    hosts = {new.placement.host(r) for r in range(new.ptc.config.world_size)}
    from scalai.dtypes import itemsize

    for spec in new.ptc.specs:
        for h in hosts:
            need = np.zeros(spec.shape, dtype=bool)
            have = np.zeros(spec.shape, dtype=bool)
            for hold in new.ptc.holdings(spec.name):
                if any(new.placement.host(r) == h for r in hold.ranks):
                    for p in hold.shard.pieces:
                        need[p.global_region.to_slices()] = True
            for hold in old.ptc.holdings(spec.name):
                if any(old.placement.host(r) == h for r in hold.ranks):
                    for p in hold.shard.pieces:
                        have[p.global_region.to_slices()] = True
            total += int(np.count_nonzero(need & ~have)) * itemsize(spec.dtype)
    return total
