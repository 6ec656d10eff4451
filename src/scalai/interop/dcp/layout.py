"""A DCP checkpoint as a PTC: its stored chunks as the layout, the model's rules for any other. Pure.

A DCP chunk is a box of a global tensor whose bytes are stored together, row-major. scalai
reads a DCP checkpoint as a PTC whose configuration has one data-parallel *slot* per chunk
(``tp=1, pp=1, dp=K``, ``K`` the most chunks any tensor has): slot ``i`` of a tensor holds its
``i``-th chunk as its local tensor (:class:`Chunks`, a split rule of explicit boxes). The
planner then intersects those boxes with any destination layout, region by region, and the
source reads each chunk in place: nothing is consolidated.

Names go through the rules (:class:`~scalai.interop.rules.Rules`): a scalai tensor fused from
several DCP tensors (separate ``wq``/``wk``/``wv`` into one ``linear_qkv``) has the chunks of
all of them, each box shifted along the concatenation dim. Optimizer tensors
(``optim.state.<fqn>.<state>``) follow their parameter as ``optimizer.<state>.<name>``.

:class:`DcpPTC` is that stored layout, and its :meth:`~DcpPTC.relayout` gives the same
tensors under the model's own split rules (from the rules file or ``--model``), so that a
reshard plans from the chunks straight into any ``(tp, pp, dp, zero)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Collection, Mapping

from ...config import ParallelConfig
from ...errors import CheckpointError
from ...layout.ptc import PTC, union_volume
from ...layout.spec import OPTIMIZER_STATES, Residence, TensorSpec, optimizer_tensor_name
from ...layout.splits import LocalShard, Piece, SplitRule, register_split
from ...regions import Region
from ..mapping import Foreign, Part, resolve
from ..rules import FORMAT, PARAM, Rules
from .keys import Classified, classify
from .metadata import DcpChunk, DcpIndex

__all__ = ["Chunks", "DcpPTC", "DcpLayout", "SlotChunk", "dcp_layout", "model_rules"]


@register_split
@dataclass(frozen=True)
class Chunks(SplitRule):
    """A tensor as another system stored it: data-parallel slot ``i`` holds box ``boxes[i]``
    (its whole local tensor); slots past the last box hold nothing. Valid only at ``tp=1``
    and a ``dp`` of at least ``len(boxes)``: a stored layout is never re-split."""

    boxes: tuple[Region, ...] = ()
    kind: ClassVar[str] = "chunks"
    uses_dp: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", tuple(b if isinstance(b, Region) else Region.from_json(b)
                                                for b in self.boxes))

    def check(self, shape, tp, dp=1):
        if tp != 1 or dp < len(self.boxes):
            return (f"a stored chunk layout ({len(self.boxes)} chunks) is read as it is, at tp=1 and "
                    f"dp>={len(self.boxes)}; lay the tensor out with the model's rules instead")
        return None

    def shard(self, shape, tp, tp_rank, dp=1, dp_rank=0):
        if dp_rank >= len(self.boxes):
            return LocalShard((0,) * len(shape), ())
        box = self.boxes[dp_rank]
        if box.is_empty():
            return LocalShard(box.sizes, ())
        return LocalShard(box.sizes, (Piece(box, Region.full(box.sizes)),))

    def to_json(self) -> dict:
        return {"kind": self.kind, "boxes": [b.to_json() for b in self.boxes]}


@dataclass(frozen=True)
class SlotChunk:
    """What slot ``i`` of a scalai tensor reads: the DCP ``key``'s chunk, transposed or not,
    its first ``rows`` rows only (in scalai order; ``None``: all; a padded vocabulary)."""

    key: str
    chunk: DcpChunk
    transpose: bool = False
    rows: int | None = None


class DcpPTC(PTC):
    """The PTC of a DCP checkpoint as stored (see the module docstring).

    :meth:`relayout` lays the same tensors out under the model's split rules and stages
    (``target``: the specs and layer count the rules gave), for a reshard or a plan into
    any layout. Without rules (a checkpoint opened to inspect it, or to load it into a live
    job, whose own PTC is the target) there is none.
    """

    def __init__(self, config: ParallelConfig, specs, num_layers: int,
                 target: tuple[tuple[TensorSpec, ...], int] | None = None):
        super().__init__(config, specs, num_layers)
        self.target = target

    def relayout(self, config: ParallelConfig) -> PTC:
        if self.target is None:
            raise ValueError("how this DCP checkpoint's tensors split across ranks is not known; give "
                             "--model M (a scalai model) or --rules FILE (see docs/interop.md)")
        specs, layers = self.target
        return PTC(config, specs, layers)


@dataclass(frozen=True)
class DcpLayout:
    """A DCP checkpoint read as scalai tensors.

    Attributes:
        ptc: the stored layout (:class:`DcpPTC`).
        slots: ``(slot, tensor name) -> SlotChunk``: where each local tensor's bytes are.
        keys: the checkpoint's keys by role.
        mapped: DCP key -> the scalai tensor it went into.
        unmapped: DCP tensor keys that no scalai tensor holds, with why.
    """

    ptc: DcpPTC
    slots: Mapping[tuple[int, str], SlotChunk]
    keys: Classified
    mapped: Mapping[str, str]
    unmapped: Mapping[str, str]


@dataclass(frozen=True)
class _Entry:
    """A scalai tensor read from DCP tensors: its spec and, per part, (DCP key, rule part)."""

    spec: TensorSpec
    parts: tuple[tuple[str, Part], ...]


def model_rules(model: str) -> Rules:
    """Rules for a DCP checkpoint that holds scalai model ``model`` under scalai's own names
    (one that ``scalai export dcp`` wrote, say): split and staged as the model is."""
    return Rules.from_json({"format": FORMAT, "model": model}, where=f"model {model}")


def _with_optimizer(rules: Rules, keys: Classified) -> Rules:
    """The rules, with the checkpoint's own optimizer keys when the rules name none."""
    if rules.optimizer or keys.optimizer_prefix is None:
        return rules
    found = {s for _, s in keys.states}
    templates = tuple((s, f"{keys.optimizer_prefix}state.{PARAM}.{s}") for s in OPTIMIZER_STATES if s in found)
    return replace(rules, optimizer=templates)


def _ordered_states(states: Collection[str]) -> list[str]:
    known = [s for s in OPTIMIZER_STATES if s in states]
    return known + sorted(set(states) - set(known))


def _identity(index: DcpIndex, keys: Classified) -> list[_Entry]:
    """Every parameter under its own name, every optimizer tensor of a parameter's shape
    as ``optimizer.<state>.<name>`` (no rules: nothing fused, nothing renamed)."""
    entries, params = [], {}
    for fqn, key in keys.params.items():
        t = index.tensors[key]
        spec = TensorSpec(fqn, t.shape, t.dtype)
        params[fqn] = spec
        entries.append(_Entry(spec, ((key, _whole(t)),)))
    states = _ordered_states({s for _, s in keys.states})
    for state in states:
        for fqn, spec in params.items():
            key = keys.states.get((fqn, state))
            if key is None or index.tensors[key].shape != spec.shape:
                continue
            t = index.tensors[key]
            entries.append(_Entry(TensorSpec(optimizer_tensor_name(state, fqn), t.shape, t.dtype, param=fqn,
                                             state=state), ((key, _whole(t)),)))
    return entries


def _whole(t) -> Part:
    return Part(t.key, 0, t.shape[0] if t.shape else 1, False, t.shape)


def _resolved(index: DcpIndex, keys: Classified, rules: Rules) -> tuple[list[_Entry], Mapping[str, str], tuple]:
    """The tensors ``rules`` make of the checkpoint's parameters and optimizer state."""
    rules = _with_optimizer(rules, keys)
    known = {s for s, _ in rules.optimizer}
    foreign = {fqn: Foreign(index.tensors[key].shape, index.tensors[key].dtype) for fqn, key in keys.params.items()}
    unmapped = {}
    for (fqn, state), key in keys.states.items():
        if state in known:
            foreign[key] = Foreign(index.tensors[key].shape, index.tensors[key].dtype)
        else:
            unmapped[key] = f"optimizer state {state!r}, which scalai does not keep"
    mapping = resolve(rules, foreign)
    for key in mapping.ignored:
        unmapped[keys.params.get(key, key)] = "ignored by the rules"
    entries = [_Entry(m.spec, tuple((keys.params.get(p.key, p.key), p) for p in m.parts)) for m in mapping.tensors]
    return entries, unmapped, (mapping.specs, mapping.num_layers)


def dcp_layout(index: DcpIndex, rules: Rules | None = None, keep: Collection[str] | None = None) -> DcpLayout:
    """Read the chunks of ``index`` as scalai tensors: named and split by ``rules``, or
    (without) under their own names with no split rules.

    Args:
        keep: only these scalai tensors (a live job's): the checkpoint may hold more, as a
            DCP state dict may hold more than a loader asks for; ``None``: all.

    Raises:
        CheckpointError: a tensor's chunks leave a gap.
        ValueError: the rules do not fit the checkpoint (see
            :func:`~scalai.interop.rules.resolve`).
    """
    keys = classify(index.tensors, index.objects)
    unmapped: dict[str, str] = {}
    target = None
    if rules is None:
        entries = _identity(index, keys)
    else:
        entries, unmapped, target = _resolved(index, keys, rules)
    used = {k for e in entries for k, _ in e.parts}
    for (fqn, state), key in keys.states.items():
        if key not in used and key not in unmapped:
            unmapped[key] = f"optimizer state {state!r} of {fqn!r}, which no parameter of the checkpoint takes"
    for key in keys.other:
        if key in index.tensors:
            unmapped[key] = "neither a model parameter nor optimizer state"
    if keep is not None:
        keep = set(keep)
        for e in entries:
            if e.spec.name not in keep:
                for k, _ in e.parts:
                    unmapped[k] = "the destination does not hold it"
        entries = [e for e in entries if e.spec.name in keep]
    slots: dict[tuple[int, str], SlotChunk] = {}
    specs, width = [], 1
    for e in entries:
        boxes = []
        for key, part in e.parts:
            _check_cover(key, index.tensors[key])
            for chunk in index.tensors[key].chunks:
                box, rows = _placed(chunk, part)
                if box is None:
                    continue  # rows of a padded vocabulary that the model does not have
                slots[(len(boxes), e.spec.name)] = SlotChunk(key, chunk, part.transpose, rows)
                boxes.append(box)
        width = max(width, len(boxes))
        specs.append(replace(e.spec, split=Chunks(tuple(boxes)), residence=Residence("all")))
    mapped = {k: e.spec.name for e in entries for k, _ in e.parts}
    layers = target[1] if target else 1
    ptc = DcpPTC(ParallelConfig(dp=width), specs, layers, target)
    return DcpLayout(ptc, slots, keys, mapped, unmapped)


def _placed(chunk: DcpChunk, part: Part) -> tuple[Region | None, int | None]:
    """Where a stored chunk of ``part`` lands in the scalai tensor, and how many of its rows
    (in scalai order) are read (``None``: all); ``(None, None)`` if none are."""
    box = Region(chunk.offsets, chunk.sizes)
    if part.transpose:
        box = Region(box.offsets[::-1], box.sizes[::-1])
    if box.ndim == 0:
        return box, None
    lo, n = box.offsets[0], box.sizes[0]
    take = max(0, min(n, part.rows - lo))
    if take == 0 and n:
        return None, None
    box = Region((part.start + lo,) + box.offsets[1:], (take,) + box.sizes[1:])
    return box, (take if take < n else None)


def _check_cover(key: str, tensor) -> None:
    """Every element of the tensor is in a chunk (chunks that overlap, which DCP allows,
    hold the same elements; the planner reads each from one of them)."""
    boxes = [Region(c.offsets, c.sizes) for c in tensor.chunks]
    covered = union_volume([b for b in boxes if not b.is_empty()]) if boxes else 0
    numel = Region.full(tensor.shape).volume
    if covered != numel:
        raise CheckpointError(
            f"DCP tensor {key!r} {list(tensor.shape)}: its {len(boxes)} chunks hold {covered} of its {numel} "
            f"elements; the checkpoint is incomplete or was saved from a sharding DCP cannot record as boxes")
