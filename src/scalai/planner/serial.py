"""Plans as JSON: the part of a plan one host runs, shipped instead of planned again.

A distributed transformation is planned once, by its coordinator; each destination host
receives the copies into its own ranks (``copies_to_json(plan, host)``) and rebuilds them
against the two deployments it is told (``copies_from_json``). The encoding is compact
(one short list per copy, tensor names listed once) and parsed strictly: a malformed slice
is a ``ValueError`` naming what is wrong, never a crash; whether windows fit the layouts is
checked by the runner (:func:`scalai.storage.tasks.check_plan`) before any byte moves.

Layout::

    {"tensors": ["embedding.weight", ...],
     "copies": [[tensor index, src rank, dst rank, src window, dst window, from_new], ...]}

    window: [[offsets...], [sizes...]]                     a box of the local tensor
          | [[offsets...], [sizes...], [view...], [sub offsets...], [sub sizes...]]
                                                           a reshaped flat range, cut to sub
"""

from __future__ import annotations

from typing import Any

from ..dtypes import itemsize
from ..regions import Region
from .plan import Copy, Deployment, Plan, PlanStats, Window

__all__ = ["copies_to_json", "copies_from_json", "plan_slice"]

_MAX_DIMS = 64


def _window_to_json(w: Window) -> list:
    out = [list(w.region.offsets), list(w.region.sizes)]
    if w.view is not None:
        out += [list(w.view), list(w.sub.offsets), list(w.sub.sizes)]
    return out


def copies_to_json(plan: Plan, host: str | None = None) -> dict:
    """The copies of ``plan`` into ``host``'s ranks (every copy when ``host`` is None)."""
    names: dict[str, int] = {}
    rows = []
    for c in plan.copies:
        if host is not None and c.dst_host != host:
            continue
        index = names.setdefault(c.tensor, len(names))
        rows.append([index, c.src_rank, c.dst_rank, _window_to_json(c.src), _window_to_json(c.dst),
                     bool(c.from_new)])
    return {"tensors": list(names), "copies": rows}


def _ints(value: Any, what: str, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise ValueError(f"{what} must be a list of at most {_MAX_DIMS} integers >= {minimum}, got {value!r:.80}")
    return tuple(value)


def _window_from_json(obj: Any, what: str) -> Window:
    if not isinstance(obj, list) or len(obj) not in (2, 5):
        raise ValueError(f"{what} must be [offsets, sizes] or [offsets, sizes, view, sub offsets, sub sizes]")
    offsets, sizes = _ints(obj[0], f"{what} offsets"), _ints(obj[1], f"{what} sizes")
    if len(offsets) != len(sizes):
        raise ValueError(f"{what} has {len(offsets)} offsets and {len(sizes)} sizes")
    region = Region(offsets, sizes)
    if len(obj) == 2:
        return Window(region)
    view, sub_off, sub_sizes = (_ints(obj[2], f"{what} view", 1), _ints(obj[3], f"{what} sub offsets"),
                                _ints(obj[4], f"{what} sub sizes"))
    if not len(view) == len(sub_off) == len(sub_sizes):
        raise ValueError(f"{what}: view and sub box have different numbers of dimensions")
    return Window(region, view, Region(sub_off, sub_sizes))


def copies_from_json(obj: Any, old: Deployment, new: Deployment) -> tuple[Copy, ...]:
    """Rebuild copies encoded by :func:`copies_to_json` against the plan's deployments
    (byte counts from the tensors' dtypes, hosts from the placements).

    Raises:
        ValueError: the encoding is malformed, names a tensor the layouts do not hold, or a
            rank outside them.
    """
    if not isinstance(obj, dict) or set(obj) != {"tensors", "copies"}:
        raise ValueError("a plan slice must be {tensors: [...], copies: [...]}")
    names, rows = obj["tensors"], obj["copies"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("plan slice tensors must be a list of names")
    if not isinstance(rows, list):
        raise ValueError("plan slice copies must be a list")
    sizes = []
    for n in names:
        if n not in new.ptc:
            raise ValueError(f"plan slice names tensor {n!r}, which the layouts do not hold")
        sizes.append(itemsize(new.ptc.spec(n).dtype))
    old_world, new_world = old.ptc.config.world_size, new.ptc.config.world_size
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 6 or not isinstance(row[5], bool):
            raise ValueError(f"plan slice copy {i} must be [tensor, src rank, dst rank, src window, "
                             f"dst window, from_new]")
        t, src_rank, dst_rank = _ints(row[:3], f"plan slice copy {i}")
        from_new = row[5]
        if t >= len(names):
            raise ValueError(f"plan slice copy {i} names tensor #{t} of {len(names)}")
        if src_rank >= (new_world if from_new else old_world) or dst_rank >= new_world:
            raise ValueError(f"plan slice copy {i}: rank {src_rank} -> {dst_rank} lies outside "
                             f"{old.ptc.config} -> {new.ptc.config}")
        src, dst = _window_from_json(row[3], f"copy {i} source"), _window_from_json(row[4], f"copy {i} destination")
        src_host = (new if from_new else old).placement.host(src_rank)
        out.append(Copy(names[t], src_rank, dst_rank, src, dst, dst.volume * sizes[t], src_host,
                        new.placement.host(dst_rank), from_new))
    return tuple(out)


def plan_slice(old: Deployment, new: Deployment, copies: tuple[Copy, ...]) -> Plan:
    """A plan of only ``copies`` (a host's share), its statistics counted from them."""
    total = sum(c.nbytes for c in copies)
    same_host = sum(c.nbytes for c in copies if not c.crosses_hosts)
    same_device = sum(c.nbytes for c in copies if not c.from_new and not c.crosses_hosts
                      and old.placement.device(c.src_rank) == new.placement.device(c.dst_rank))
    return Plan(old, new, copies, PlanStats(total, same_device, same_host, total - same_host, 0, copies=len(copies)))
