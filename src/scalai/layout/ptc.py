"""The Parallelizable Tensor Collection: tensor specs laid out under one configuration.

``PTC(config, specs, num_layers)`` answers, for every tensor, which ranks hold what
(:meth:`PTC.holdings`) and, for every rank, what it stores (:meth:`PTC.rank_shards`).

Holdings group the ranks that store an identical local shard (data-parallel replicas, the
two copies of a tied embedding), so that the planner works per distinct shard rather than
per rank.

ZeRO-1 (``config.zero``): for each model shard (pipeline stage, tensor-parallel rank), the
stage's parameters are laid end to end in spec order, each as its flattened local shard
(padding included), into one flat buffer; the buffer is padded to a multiple of ``dp`` and
cut into ``dp`` contiguous parts. Data-parallel rank ``d`` keeps part ``d`` of every
optimizer state (fp32 master, Adam moments). A rank's local tensor for one optimizer state
of one parameter is therefore 1-d: the part of the parameter's flat range that falls in
the rank's part of the buffer.

Padding (``padding_shards``): a rank whose local shard holds no global element, only
padding (the last tensor-parallel ranks of a padded vocabulary, e.g. gpt-tiny at tp=4 or
gpt3-175b at tp=32; a ZeRO part that covers only such rows), still holds it, zero-filled,
as Megatron-LM gives every rank its padded rows: per-rank tensor lists equal Megatron's.
Checkpoints of format 1 and 2 were written without them and are read with
``padding_shards=False``.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Any, Callable, Hashable, Iterable, Sequence

from ..config import ParallelConfig
from ..limits import LOCAL_TENSORS, TENSORS, LimitError
from ..validate import integer
from ..regions import Region, contiguous_boxes, disjoint, flat_runs, subtract
from .spec import TensorSpec
from .splits import LocalShard, Piece, SplitRule

__all__ = ["PTC", "Holding", "LayoutError"]


class LayoutError(ValueError):
    """A configuration that the model's tensors cannot be laid out under."""


@dataclass(frozen=True, slots=True)
class Holding:
    """A local shard of one tensor and every rank that stores exactly it.

    ``key`` is a small hashable stand-in for the shard's geometry: two holdings with equal
    keys have equal shards, which lets the planner reuse region intersections across the
    many layers that share a shape and split.
    """

    tensor: str
    shard: LocalShard
    ranks: tuple[int, ...]
    key: tuple


class PTC:
    """Tensor specs laid out under a :class:`~scalai.config.ParallelConfig`.

    Args:
        config: the parallel configuration.
        specs: every tensor of the job (parameters and optimizer state).
        num_layers: transformer layers of the model (to place ``layer`` residences).
        padding_shards: ranks whose local shard is all padding hold it (see the module
            docstring); ``False`` only to read layouts written before they did.

    Raises:
        LayoutError: a tensor cannot be split under ``config`` (the message names the
            tensor, why, and which degrees would work).
        LimitError: more tensors, layers or (rank, tensor) pairs than
            :mod:`scalai.limits` allows (checked before anything per rank is built).
    """

    def __init__(self, config: ParallelConfig, specs: Iterable[TensorSpec], num_layers: int,
                 *, padding_shards: bool = True):
        self.config = config
        self.padding_shards = bool(padding_shards)
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        TENSORS.check(len(self.specs), "the job state")
        try:
            self.num_layers = integer("num_layers", num_layers, 0, hint=" (transformer layers of the model)")
        except ValueError as exc:
            raise LayoutError(str(exc)) from None
        self._by_name = {s.name: s for s in self.specs}
        if len(self._by_name) != len(self.specs):
            seen: set[str] = set()
            dup = next(s.name for s in self.specs if s.name in seen or seen.add(s.name))  # type: ignore[func-returns-value]
            raise LayoutError(f"tensor {dup!r} is specified twice")
        try:
            stage_layers = config.stage_layers(self.num_layers)
        except LimitError:
            raise
        except ValueError as exc:
            raise LayoutError(str(exc)) from None
        self.stage_of_layer = tuple(s for s, layers in enumerate(stage_layers) for _ in layers)
        LOCAL_TENSORS.check(self._pairs_bound(), f"the job state under {config} "
                                                 f"({len(self.specs):,} tensors, {config.world_size:,} ranks)")
        for spec in self.specs:
            problem = spec.split.check(spec.shape, config.tp, config.dp)
            if problem:
                raise LayoutError(f"{spec.name} (shape {list(spec.shape)}) cannot be laid out "
                                  f"under {config}: {problem}")
            if spec.residence.kind == "layer" and spec.residence.layer >= self.num_layers:
                raise LayoutError(f"{spec.name} belongs to layer {spec.residence.layer}, but the model has "
                                  f"{self.num_layers} layers (0..{self.num_layers - 1})")
            if spec.param is not None and spec.param not in self._by_name:
                raise LayoutError(f"optimizer state {spec.name} follows unknown parameter {spec.param}")
        self._holdings: dict[str, tuple[Holding, ...]] = {}
        self._zero: dict[tuple[int, int], tuple[dict[str, int], int]] = {}
        self._rank_view: list[list[tuple[str, LocalShard]]] | None = None
        self._owners: dict[Any, dict[str, dict[int, int]]] = {}  # replica group -> owner maps
        self._replicas_of: PTC | None = None  # set on a stored_replicas() view
        self._replica_group: Callable[[int], Hashable] | None = None  # ... kept once per group

    def _pairs_bound(self) -> int:
        """At most how many (rank, local tensor) pairs this layout has, from the specs alone:
        a tensor is held by the ``tp x dp`` ranks of each stage it resides on."""
        per_stage = self.config.tp * self.config.dp
        total = 0
        for spec in self.specs:
            try:
                stages = len(self.stages_of(spec))
            except ValueError as exc:  # a layer the model does not have
                raise LayoutError(f"{spec.name}: {exc}") from None
            total += stages * per_stage
        return total

    # -- lookup ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not part of this job's state") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def stages_of(self, spec: TensorSpec) -> tuple[int, ...]:
        return spec.residence.stages(self.stage_of_layer, self.config.pp)

    # -- holdings --------------------------------------------------------------------
    def holdings(self, name: str) -> tuple[Holding, ...]:
        """Every distinct local shard of tensor ``name`` and the ranks holding it."""
        cached = self._holdings.get(name)
        if cached is None:
            cached = self._holdings[name] = tuple(self._compute_holdings(self.spec(name)))
        return cached

    def _compute_holdings(self, spec: TensorSpec) -> list[Holding]:
        if self._replicas_of is not None:
            owners = self._replicas_of._owner_maps(self._replica_group)[spec.name]
            return [h if len(h.ranks) == 1 else  # a shard without replicas stays where it is
                    Holding(h.tensor, h.shard, tuple(sorted({owners[r] for r in h.ranks})), h.key)
                    for h in self._replicas_of.holdings(spec.name)]
        cfg = self.config
        stages = self.stages_of(spec)
        if spec.is_optimizer_state and cfg.zero and not spec.split.uses_dp:
            return self._zero_holdings(spec, stages)
        groups: dict[tuple, tuple[LocalShard, list[int]]] = {}
        dp_ranks = range(cfg.dp) if spec.split.uses_dp else (None,)
        for stage in stages:
            for t in range(cfg.tp):
                for d in dp_ranks:
                    if d is None:
                        key = ("tp", spec.split, spec.shape, cfg.tp, t)
                        shard = _tp_shard(spec.split, spec.shape, cfg.tp, t)
                        ranks = [cfg.rank(t, dd, stage) for dd in range(cfg.dp)]
                    else:
                        shard = spec.split.shard(spec.shape, cfg.tp, t, cfg.dp, d)
                        key = ("mesh", spec.shape, shard)  # equal shards group as replicas
                        ranks = [cfg.rank(t, d, stage)]
                    if not shard.pieces and not (self.padding_shards and prod(shard.shape)):
                        continue
                    entry = groups.setdefault(key, (shard, []))
                    entry[1].extend(ranks)
        return [Holding(spec.name, shard, tuple(sorted(ranks)), key)
                for key, (shard, ranks) in groups.items()]

    def _zero_layout(self, stage: int, tp_rank: int) -> tuple[dict[str, int], int]:
        """Flat-buffer offset of every parameter of a model shard, and the part size."""
        cached = self._zero.get((stage, tp_rank))
        if cached is None:
            offsets: dict[str, int] = {}
            total = 0
            for spec in self.specs:
                if spec.is_optimizer_state or spec.split.uses_dp or stage not in self.stages_of(spec):
                    continue  # dp-sharded (FSDP) parameters keep their state out of the buffer
                offsets[spec.name] = total
                total += prod(_tp_shard(spec.split, spec.shape, self.config.tp, tp_rank).shape)
            part = -(-total // self.config.dp)
            cached = self._zero[(stage, tp_rank)] = (offsets, part)
        return cached

    def _zero_holdings(self, spec: TensorSpec, stages: Sequence[int]) -> list[Holding]:
        cfg = self.config
        out = []
        for stage in stages:
            for t in range(cfg.tp):
                offsets, part = self._zero_layout(stage, t)
                param_shard = _tp_shard(spec.split, spec.shape, cfg.tp, t)
                start, n = offsets[spec.param], prod(param_shard.shape)
                for d in range(cfg.dp):
                    lo, hi = max(start, d * part), min(start + n, (d + 1) * part)
                    if hi <= lo:
                        continue
                    shard = _zero_shard(spec.split, spec.shape, cfg.tp, t, lo - start, hi - start)
                    if shard.pieces or self.padding_shards:
                        key = ("zero", spec.split, spec.shape, cfg.tp, t, lo - start, hi - start)
                        out.append(Holding(spec.name, shard, (cfg.rank(t, d, stage),), key))
        return out

    def replica_owner(self, name: str, rank: int) -> int:
        """The rank among those holding the same local shard of ``name`` as ``rank`` that
        stores it in a checkpoint (each replica once). Owners are chosen greedily, tensor by
        tensor in spec order, as the holder with the fewest bytes so far (ties: the lowest
        rank), so every rank writes its share when replicas are many (a pure function of
        the PTC: every rank computes the same owners)."""
        return self._owner_maps(None)[name][rank]

    def _owner_maps(self, group: Callable[[int], Hashable] | None) -> dict[str, dict[int, int]]:
        """``{tensor: {holder: the rank storing its replica}}``, one owner among the holders
        of each ``group(rank)`` (``None``: among all), chosen as :meth:`replica_owner` says."""
        if group not in self._owners:
            from ..dtypes import itemsize

            load = [0] * self.config.world_size
            maps: dict[str, dict[int, int]] = {}
            for spec in self.specs:
                owners = maps[spec.name] = {}
                for h in self.holdings(spec.name):
                    members: dict[Hashable, list[int]] = {}
                    for r in h.ranks:
                        members.setdefault(None if group is None else group(r), []).append(r)
                    for ranks in members.values():  # one holder (no replica): it stores the shard
                        owner = ranks[0] if len(ranks) == 1 else min(ranks, key=lambda r: (load[r], r))
                        load[owner] += prod(h.shard.shape) * itemsize(spec.dtype)
                        owners.update((r, owner) for r in ranks)
            self._owners[group] = maps
        return self._owners[group]

    def stored_replicas(self, group: Callable[[int], Hashable] | None = None) -> PTC:
        """This layout with every replica held only by the rank that stores it
        (:meth:`replica_owner`): what a checkpoint holds on disk, and the layout to plan
        into when writing one, so that no byte is copied twice into the same file.

        ``group`` (rank -> key, e.g. ``placement.host``): keep one replica per group
        instead, the holder with the fewest bytes so far among the group's holders: what
        per-host stores keep, so that a host which held a replica still holds it and no
        byte has to cross hosts that did not have to before."""
        view = PTC(self.config, self.specs, self.num_layers, padding_shards=self.padding_shards)
        view._replicas_of = self.full
        view._replica_group = group
        return view

    @property
    def full(self) -> PTC:
        """The layout with every replica (this PTC unless it is a :meth:`stored_replicas` view)."""
        return self._replicas_of if self._replicas_of is not None else self

    # -- per-rank view ----------------------------------------------------------------
    def rank_shards(self, rank: int) -> list[tuple[str, LocalShard]]:
        """``(tensor name, local shard)`` for every tensor that ``rank`` stores, spec order."""
        if self._rank_view is None:
            view: list[list[tuple[str, LocalShard]]] = [[] for _ in range(self.config.world_size)]
            for spec in self.specs:
                for h in self.holdings(spec.name):
                    for r in h.ranks:
                        view[r].append((spec.name, h.shard))
            self._rank_view = view
        return self._rank_view[rank]

    def rank_nbytes(self, rank: int) -> int:
        """Bytes of the local tensors of ``rank`` (padding included)."""
        from ..dtypes import itemsize

        return sum(prod(s.shape) * itemsize(self.spec(n).dtype) for n, s in self.rank_shards(rank))

    def total_nbytes(self) -> int:
        """Bytes of every rank's local tensors (padding included); of a
        :meth:`stored_replicas` view, what a checkpoint of this layout stores."""
        return sum(self.rank_nbytes(r) for r in range(self.config.world_size))

    def validate(self) -> None:
        """Check that every tensor is covered exactly and every shard is well formed.

        Raises:
            LayoutError: naming the first tensor that is not.
        """
        for spec in self.specs:
            boxes: dict[Region, None] = {}
            for h in self.holdings(spec.name):
                local_regions = [p.local_region for p in h.shard.pieces]
                if not disjoint(local_regions):
                    raise LayoutError(f"{spec.name}: overlapping pieces in one local shard")
                for p in h.shard.pieces:
                    if p.global_region.volume != p.local_region.volume:
                        raise LayoutError(f"{spec.name}: piece {p} maps unequal volumes")
                    if not Region.full(h.shard.shape).contains(p.local_region):
                        raise LayoutError(f"{spec.name}: piece {p} lies outside local shape {h.shard.shape}")
                    if not Region.full(spec.shape).contains(p.global_region):
                        raise LayoutError(f"{spec.name}: piece {p} lies outside global shape {spec.shape}")
                    boxes[p.global_region] = None
            covered = union_volume(list(boxes))
            if covered != spec.numel:
                raise LayoutError(f"{spec.name}: the layout covers {covered} of {spec.numel} elements")

    # -- serialization ----------------------------------------------------------------
    def to_json(self, explicit: bool = False) -> dict:
        """Config and specs (enough to rebuild everything); ``explicit`` adds every rank's shards."""
        out = {"config": str(self.config), "num_layers": self.num_layers,
               "tensors": [s.to_json() for s in self.specs]}
        if explicit:
            out["ranks"] = [
                [{"tensor": n, "local_shape": list(s.shape), "pieces": [p.to_json() for p in s.pieces]}
                 for n, s in self.rank_shards(r)]
                for r in range(self.config.world_size)
            ]
        return out

    @classmethod
    def from_json(cls, obj: dict, padding_shards: bool = True) -> PTC:
        """Parse :meth:`to_json`'s object; raises ValueError (``LayoutError``), KeyError or
        TypeError for anything else. ``padding_shards=False`` reads a layout of checkpoint
        formats 1 and 2 (see :class:`PTC`)."""
        if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), list):
            raise ValueError("a PTC is a JSON object with config, num_layers and a list of tensors")
        return cls(ParallelConfig.parse(obj["config"]),
                   [TensorSpec.from_json(t) for t in obj["tensors"]], obj["num_layers"],
                   padding_shards=padding_shards)

    def relayout(self, config: ParallelConfig) -> PTC:
        """The same tensors under another configuration."""
        return PTC(config, self.specs, self.num_layers)


@lru_cache(maxsize=65536)
def _tp_shard(split: SplitRule, shape: tuple[int, ...], tp: int, tp_rank: int) -> LocalShard:
    return split.shard(shape, tp, tp_rank)


@lru_cache(maxsize=65536)
def _zero_shard(split: SplitRule, shape: tuple[int, ...], tp: int, tp_rank: int,
                start: int, stop: int) -> LocalShard:
    """Flat elements ``[start, stop)`` of a tensor-parallel shard, as a 1-d ZeRO shard."""
    return _flat_shard(_tp_shard(split, shape, tp, tp_rank), start, stop)


@lru_cache(maxsize=16384)
def _flat_index(shard: LocalShard) -> tuple[list[int], list[tuple[int, int, tuple[int, ...]]]]:
    """Row-major runs of ``shard``'s pieces, sorted: (starts, [(start, stop, global delta)])."""
    runs = []
    for piece in shard.pieces:
        loc, glob = piece.local_region, piece.global_region
        if loc.sizes != glob.sizes:
            raise LayoutError("cannot flatten a shard that is itself flattened")
        delta = tuple(g - l for g, l in zip(glob.offsets, loc.offsets))
        runs.extend((a, b, delta) for a, b in flat_runs(shard.shape, loc))
    runs.sort()
    return [r[0] for r in runs], runs


def _flat_shard(shard: LocalShard, start: int, stop: int) -> LocalShard:
    """The flat element range ``[start, stop)`` of ``shard``'s local tensor, as a 1-d shard."""
    shape = shard.shape
    strides = [prod(shape[i + 1:]) for i in range(len(shape))]
    starts, runs = _flat_index(shard)
    pieces = []
    for run_lo, run_hi, delta in runs[max(0, bisect_right(starts, start) - 1):]:
        if run_lo >= stop:
            break
        lo, hi = max(run_lo, start), min(run_hi, stop)
        if hi <= lo:
            continue
        for box in contiguous_boxes(shape, lo, hi):
            flat = sum(o * s for o, s in zip(box.offsets, strides))
            pieces.append(Piece(box.shift(delta), Region((flat - start,), (box.volume,))))
    return LocalShard((stop - start,), tuple(pieces))


def union_volume(boxes: Sequence[Region]) -> int:
    """Number of elements covered by ``boxes`` (which may overlap)."""
    if disjoint(boxes):
        return sum(b.volume for b in boxes)
    parts: list[Region] = []
    for box in boxes:
        pending = [box]
        for p in parts:
            pending = [q for r in pending for q in subtract(r, p)]
            if not pending:
                break
        parts.extend(pending)
    return sum(p.volume for p in parts)
