"""The planner: copies that turn one deployment of the job state into another. Pure.

For every tensor, :func:`~scalai.planner.geometry.fragment_groups` cuts it into fragment
groups with known old owners and new owners. Then, for every destination rank that needs
a group, a source is chosen:

1. an old rank on the same device (the bytes do not move at all);
2. an old rank on the same host (a memory copy; the least-read one);
3. a rank of the same host that already fetched the group in this plan (``from_new``
   copy: bytes needed by several ranks of a host cross the network once);
4. otherwise a remote old rank on the host that has sent the fewest bytes so far, so that
   the load spreads over all replicas and hosts instead of landing on data-parallel rank 0.

Because every fragment lies wholly inside or outside every holding, rule 3 makes the
cross-host bytes equal the lower bound exactly: per destination host, the distinct bytes
its new shards need that no old shard on the host holds.

Cost: geometry is computed once per distinct (old layout, new layout, shape, split) and
reused across layers; decisions are made per (fragment group, destination rank), and
where none of a tensor's weighed the running totals (every source was forced: on the
destination's device, or the only one on its host), the tensor's copies are a template
that every later tensor with the same holdings (the same layer's tensor in every other
layer of the stage) replays under its own name. Plan time grows linearly with ``tensors x
ranks holding each tensor``; see the README for figures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields

from ..dtypes import itemsize
from ..errors import PlanError
from ..layout.ptc import Holding
from .geometry import Group, fragment_groups
from .plan import Copy, Deployment, Plan, PlanStats

__all__ = ["make_plan", "check_coverage"]


def make_plan(old: Deployment, new: Deployment, validate: bool = True, fanout: bool = True,
              unavailable: frozenset[int] | set[int] = frozenset(), subset: bool = False) -> Plan:
    """Plan the copies from ``old`` to ``new`` (same tensors, any configurations/placements).

    Args:
        old: the deployment that holds the state now.
        new: the deployment to produce.
        validate: check that every destination element is written exactly once.
        fanout: use rule 3 (``from_new`` copies from a rank of the same host that fetched
            the bytes already). Turn it off when every destination rank loads on its own
            (no rank can read another's new tensors); cross-host bytes may then exceed
            the lower bound.
        unavailable: old ranks that cannot be read (their host is lost); their bytes come
            from surviving replicas.
        subset: the new layout may hold only some of the old tensors (an export of the
            weights without the optimizer state); the others are not read. Off by
            default: a reshard or a load must never drop state silently.

    Raises:
        PlanError: the two deployments do not describe the same tensors, or (with
            ``validate``) the plan would not cover the destination exactly once.
    """
    _check_same_tensors(old, new, subset)
    builder = _Builder(old, new, fanout=fanout, unavailable=frozenset(unavailable))
    for spec in new.ptc.specs:
        builder.add_tensor(spec.name, itemsize(spec.dtype))
    plan = Plan(old, new, tuple(builder.copies), builder.stats())
    if validate:
        check_coverage(plan)
    return plan


def _check_same_tensors(old: Deployment, new: Deployment, subset: bool = False) -> None:
    old_specs = {s.name: s for s in old.ptc.specs}
    for spec in new.ptc.specs:
        src = old_specs.get(spec.name)
        if src is None:
            raise PlanError(f"tensor {spec.name} is needed by the new layout but the old state "
                            f"does not have it; both sides must describe the same model")
        if src.shape != spec.shape or src.dtype != spec.dtype:
            raise PlanError(f"tensor {spec.name} is {src.dtype}{list(src.shape)} in the old state "
                            f"but {spec.dtype}{list(spec.shape)} in the new layout")
    extra = set(old_specs) - {s.name for s in new.ptc.specs}
    if extra and not subset:
        raise PlanError(f"the old state has {len(extra)} tensors that the new layout drops "
                        f"(e.g. {sorted(extra)[0]}); both sides must describe the same model")


@dataclass
class _Sources:
    """Where the old ranks of one fragment group are: by device, by host."""

    by_device: dict[object, int]
    by_host: dict[str, list[int]]


@dataclass(frozen=True)
class _Template:
    """A tensor's copies without its name (each copy's fields after ``tensor``), and what
    it added to the cross-host lower bound (the other totals follow from the copies)."""

    copies: tuple[tuple, ...]
    lower_bound: int


@dataclass
class _Builder:
    old: Deployment
    new: Deployment
    fanout: bool = True
    unavailable: frozenset[int] = frozenset()
    copies: list[Copy] = field(default_factory=list)
    total: int = 0
    same_device: int = 0
    same_host: int = 0
    cross_host: int = 0
    lower_bound: int = 0
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rank_read: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # (size, old holdings, new holdings) -> the tensor's template; None: a decision weighed totals
    templates: dict[tuple, _Template | None] = field(default_factory=dict)
    weighed: bool = False  # a decision of the tensor being added compared candidates' totals
    replay: bool = True  # reuse templates (off: every tensor decided afresh, for tests)

    def __post_init__(self) -> None:
        old_world, new_world = self.old.ptc.config.world_size, self.new.ptc.config.world_size
        self.old_host = [self.old.placement.host(r) for r in range(old_world)]
        self.old_device = [self.old.placement.device(r) for r in range(old_world)]
        self.new_host = [self.new.placement.host(r) for r in range(new_world)]
        self.new_device = [self.new.placement.device(r) for r in range(new_world)]

    def add_tensor(self, name: str, size: int) -> None:
        old_h = self.old.ptc.holdings(name)
        new_h = self.new.ptc.holdings(name)
        key = (size, tuple((h.key, h.ranks) for h in old_h), tuple((h.key, h.ranks) for h in new_h))
        if not self.replay or key in self.templates:
            template = self.templates.get(key)
            if template is not None:
                self._replay(name, template)
            else:  # its decisions weigh the running totals: made afresh every time
                self._plan_tensor(name, size, old_h, new_h)
            return
        first, lower_bound = len(self.copies), self.lower_bound
        self.weighed = False
        self._plan_tensor(name, size, old_h, new_h)
        self.templates[key] = None if self.weighed else _Template(
            tuple(tuple(getattr(c, f) for f in _COPY_FIELDS) for c in self.copies[first:]),
            self.lower_bound - lower_bound)

    def _replay(self, name: str, t: _Template) -> None:
        """Add ``t``'s copies as ``name``'s, counted as any copy is (:meth:`_add`)."""
        for fields_ in t.copies:
            self._add(Copy(name, *fields_))
        self.lower_bound += t.lower_bound

    def _plan_tensor(self, name: str, size: int, old_h: tuple[Holding, ...], new_h: tuple[Holding, ...]) -> None:
        groups = fragment_groups(old_h, new_h)
        covered = sum(g.volume for g in groups)
        numel = self.new.ptc.spec(name).numel
        if covered != numel:
            raise PlanError(f"tensor {name}: the old state covers {covered} of {numel} elements; "
                            f"the checkpoint is incomplete")
        for group in groups:
            self._add_group(name, size, group, old_h, new_h)

    def _sources(self, group: Group, old_h: tuple[Holding, ...]) -> _Sources:
        by_device: dict[object, int] = {}
        by_host: dict[str, list[int]] = defaultdict(list)
        for oi in group.old:
            for r in old_h[oi].ranks:
                if r in self.unavailable:
                    continue
                by_device.setdefault(self.old_device[r], r)
                by_host[self.old_host[r]].append(r)
        return _Sources(by_device, by_host)

    def _add_group(self, name: str, size: int, group: Group, old_h, new_h) -> None:
        sources = self._sources(group, old_h)
        if not sources.by_host:
            lost = sorted(r for oi in group.old for r in old_h[oi].ranks)
            raise PlanError(f"tensor {name}: {group.volume} elements are held only by unavailable old ranks "
                            f"{lost}; no replica survives, so restore the job from a persistent checkpoint")
        owner_of = {r: oi for oi in group.old for r in old_h[oi].ranks}
        fetched: dict[str, tuple[int, int]] = {}  # host -> (rank that fetched, its new holding)
        need_hosts = set()
        for ni in group.new:
            for dst in new_h[ni].ranks:
                host = self.new_host[dst]
                need_hosts.add(host)
                src = sources.by_device.get(self.new_device[dst])
                if src is None and host in sources.by_host:
                    src = self._least_read(sources.by_host[host])
                if src is not None:
                    self._emit(name, size, group, owner_of[src], ni, src, dst, host, host)
                elif self.fanout and host in fetched:
                    peer, peer_ni = fetched[host]
                    for sw, dw in group.fanout_pairs(peer_ni, ni):
                        self._add(Copy(name, peer, dst, sw, dw, dw.volume * size, host, host, True))
                else:
                    hosts = sources.by_host
                    self.weighed |= len(hosts) > 1
                    src_host = min(hosts, key=lambda h: (self.sent[h], h))
                    src = self._least_read(hosts[src_host])
                    self._emit(name, size, group, owner_of[src], ni, src, dst, src_host, host)
                    fetched[host] = (dst, ni)
        self.lower_bound += group.volume * size * len(need_hosts - sources.by_host.keys())

    def _least_read(self, ranks: list[int]) -> int:
        """The rank of ``ranks`` that has been read least so far (ties: the lowest)."""
        if len(ranks) == 1:
            return ranks[0]
        self.weighed = True
        return min(ranks, key=lambda r: (self.rank_read[r], r))

    def _emit(self, name, size, group: Group, oi, ni, src, dst, src_host, dst_host) -> None:
        for sw, dw in group.pairs(oi, ni):
            self._add(Copy(name, src, dst, sw, dw, sw.volume * size, src_host, dst_host))

    def _add(self, c: Copy) -> None:
        """Add a copy to the plan and count its bytes: read from its old rank, within a
        device, a host (a host fan-out's too) or across hosts."""
        self.copies.append(c)
        n = c.nbytes
        self.total += n
        if c.from_new:
            self.same_host += n
            return
        self.rank_read[c.src_rank] += n
        if c.src_host == c.dst_host:
            self.same_host += n
            if self.old_device[c.src_rank] == self.new_device[c.dst_rank]:
                self.same_device += n
        else:
            self.cross_host += n
            self.sent[c.src_host] += n
            self.received[c.dst_host] += n

    def stats(self) -> PlanStats:
        return PlanStats(self.total, self.same_device, self.same_host, self.cross_host,
                         self.lower_bound, dict(self.sent), dict(self.received), len(self.copies))


_COPY_FIELDS = tuple(f.name for f in fields(Copy))[1:]  # after ``tensor``


def check_coverage(plan: Plan) -> None:
    """Check that every destination element holding global data is written exactly once.

    Works on boxes, never on elements: per (rank, tensor), the plain destination windows
    and the flat ZeRO pieces written through views must be pairwise disjoint, lie where
    the shard holds global data, and add up to exactly the shard's covered volume; inside
    each flat piece, the views' sub-boxes must be disjoint and fill it.

    Raises:
        PlanError: naming the first (rank, tensor) written twice, outside, or left short.
    """
    from math import prod

    from ..regions import Region, disjoint, subtract

    plain: dict[tuple[int, str], list] = defaultdict(list)
    viewed: dict[tuple[int, str], dict] = defaultdict(dict)
    for c in plan.copies:
        key = (c.dst_rank, c.tensor)
        if c.dst.view is None:
            plain[key].append(c.dst.region)
        else:
            viewed[key].setdefault((c.dst.region, c.dst.view), []).append(c.dst.sub)
    ptc = plan.new.ptc
    for rank in range(ptc.config.world_size):
        for name, shard in ptc.rank_shards(rank):
            key = (rank, name)
            boxes = plain.pop(key, [])
            flat = viewed.pop(key, None)
            if flat is None and len(boxes) == 1 and len(shard.pieces) == 1 and not any(boxes[0].offsets) \
                    and boxes[0].sizes == shard.shape and shard.pieces[0].local_region == boxes[0]:
                continue  # one window writes the whole tensor, which is all global data
            pieces = {p.local_region: p for p in shard.pieces} if flat else {}
            for (region, view), subs in (flat or {}).items():
                piece = pieces.get(region)
                if len(subs) == 1:  # one window fills the piece
                    filled = not any(subs[0].offsets) and subs[0].sizes == view
                else:
                    whole = Region.full(view)
                    filled = disjoint(subs) and sum(b.volume for b in subs) == prod(view) \
                        and all(whole.contains(b) for b in subs)
                if piece is None or piece.global_region.sizes != view or not filled:
                    raise PlanError(f"plan does not fill flat piece {region} of {name} on rank "
                                    f"{rank} exactly once")
                boxes.append(region)
            shape = shard.shape
            written, covered = sum(b.volume for b in boxes), shard.covered
            ok = written == covered and all(
                all(o + n <= d for o, n, d in zip(b.offsets, b.sizes, shape)) for b in boxes) and disjoint(boxes)
            if ok and covered != prod(shape):  # padding exists: nothing may land on it
                holes = [p.local_region for p in shard.pieces]
                ok = all(not _outside(b, holes, subtract) for b in boxes)
            if not ok:
                raise PlanError(f"plan writes {written} elements of {name} on rank {rank} "
                                f"where {covered} are needed exactly once")
    leftover = next(iter(plain), None) or next(iter(viewed), None)
    if leftover:
        raise PlanError(f"plan writes {leftover[1]} on rank {leftover[0]}, which does not hold it")


def _outside(box, pieces, subtract) -> bool:
    """Whether part of ``box`` lies outside every one of ``pieces``."""
    rest = [box]
    for p in pieces:
        rest = [q for r in rest for q in subtract(r, p)]
        if not rest:
            return False
    return True
