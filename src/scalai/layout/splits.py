"""How one tensor is split across the tensor-parallel ranks of a model shard.

A split rule maps ``(global shape, tp, tp_rank)`` to a :class:`LocalShard`: the shape of the
tensor that rank stores and the :class:`Piece` s that say which global region lands where
in it. Rules are frozen dataclasses, serializable to JSON, and pure.

Rules:

- :class:`Replicate`: every rank holds the whole tensor (norms, row-parallel biases).
- :class:`Split`: even split of one dimension (``dim=0`` column-parallel linears,
  ``dim=1`` row-parallel linears).
- :class:`VocabSplit`: vocabulary-parallel embeddings and output heads. The vocabulary is
  padded to a multiple of ``multiple * tp`` (Megatron's ``make_vocab_size_divisible_by``);
  padding rows exist only in local tensors and are never part of the global tensor.
- :class:`Fused`: several logical tensors stored as one along ``dim`` (fused QKV,
  fused gate/up). The global tensor is their plain concatenation (``[Q; K; V]``,
  ``[gate; up]``), the layout of an unfused model; locally the parts are interleaved the
  way Megatron stores them, so one rank owns several non-contiguous slices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..regions import Region
from ..validate import integer

__all__ = ["Piece", "LocalShard", "SplitRule", "Replicate", "Split", "VocabSplit", "Fused",
           "split_from_json", "SPLIT_KINDS", "padded_vocab"]


@dataclass(frozen=True, slots=True)
class Piece:
    """One box of a global tensor and where it sits in a rank's local tensor.

    ``global_region`` and ``local_region`` have the same volume; element ``k`` of one in
    row-major order is element ``k`` of the other. Usually both have the same sizes; a
    flattened (ZeRO) local tensor has a 1-d ``local_region``.
    """

    global_region: Region
    local_region: Region

    def to_json(self) -> list:
        return [self.global_region.to_json(), self.local_region.to_json()]

    @classmethod
    def from_json(cls, obj: list) -> Piece:
        return cls(Region.from_json(obj[0]), Region.from_json(obj[1]))


@dataclass(frozen=True, slots=True)
class LocalShard:
    """What one rank stores of one global tensor.

    Attributes:
        shape: shape of the local tensor (may include padding that no piece covers).
        pieces: disjoint local regions and the global regions they hold.
    """

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def covered(self) -> int:
        """Elements of the local tensor that hold global data."""
        return sum(p.local_region.volume for p in self.pieces)


class SplitRule(ABC):
    """Base of split rules: ``shard(shape, tp, tp_rank)`` and ``check(shape, tp)``.

    Rules that also split across data-parallel ranks (FSDP-style, from DTensor placements)
    set ``uses_dp`` and read ``dp``/``dp_rank``; for all others every data-parallel rank
    holds the same shard.
    """

    kind: ClassVar[str] = ""
    uses_dp: ClassVar[bool] = False

    def check(self, shape: tuple[int, ...], tp: int, dp: int = 1) -> str | None:
        """Why ``shape`` cannot be split over ``tp`` ranks, or ``None`` when it can."""
        return _dim_problem(self, shape)

    @abstractmethod
    def shard(self, shape: tuple[int, ...], tp: int, tp_rank: int,
              dp: int = 1, dp_rank: int = 0) -> LocalShard:
        """The local shard of tensor-parallel rank ``tp_rank`` (and ``dp_rank``)."""

    def to_json(self) -> dict:
        body = {k: getattr(self, k) for k in self.__dataclass_fields__}  # type: ignore[attr-defined]
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}}


@dataclass(frozen=True)
class Replicate(SplitRule):
    kind: ClassVar[str] = "replicate"

    def shard(self, shape, tp, tp_rank, dp=1, dp_rank=0):
        full = Region.full(shape)
        return LocalShard(tuple(shape), (Piece(full, full),))


@dataclass(frozen=True)
class Split(SplitRule):
    """Even split of dimension ``dim`` in ``tp`` contiguous parts."""

    dim: int = 0
    kind: ClassVar[str] = "split"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", integer("split dim", self.dim, 0))

    def check(self, shape, tp, dp=1):
        problem = _dim_problem(self, shape)
        if problem:
            return problem
        if shape[self.dim] % tp:
            return (f"tp={tp} does not divide dim {self.dim} of size {shape[self.dim]}; "
                    f"{divisor_hint(shape[self.dim])}")
        return None

    def shard(self, shape, tp, tp_rank, dp=1, dp_rank=0):
        part = shape[self.dim] // tp
        local = tuple(part if d == self.dim else s for d, s in enumerate(shape))
        offsets = tuple(tp_rank * part if d == self.dim else 0 for d in range(len(shape)))
        return LocalShard(local, (Piece(Region(offsets, local), Region.full(local)),))


def _dim_problem(rule: SplitRule, shape: tuple[int, ...]) -> str | None:
    """Why ``rule``'s ``dim`` (if it has one) does not exist in ``shape``."""
    dim = getattr(rule, "dim", None)
    if dim is not None and dim >= len(shape):
        return f"{rule.kind} dim {dim} is out of range for shape {list(shape)} ({len(shape)} dims)"
    return None


def divisor_hint(count: int, degree: str = "tp") -> str:
    """``"use tp in {1, 2, 4}"``: the degrees that divide ``count`` (up to 64)."""
    options = [d for d in range(1, min(count, 64) + 1) if count % d == 0]
    return f"use {degree} in {{{', '.join(map(str, options))}}}"


def padded_vocab(vocab: int, multiple: int, tp: int) -> int:
    """Megatron's padded vocabulary: ``vocab`` rounded up to a multiple of ``multiple * tp``."""
    step = multiple * tp
    return -(-vocab // step) * step


@dataclass(frozen=True)
class VocabSplit(SplitRule):
    """Vocabulary-parallel split of ``dim`` with padding to ``multiple * tp`` rows."""

    dim: int = 0
    multiple: int = 128
    kind: ClassVar[str] = "vocab"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", integer("vocab split dim", self.dim, 0))
        object.__setattr__(self, "multiple", integer(
            "vocab split multiple", self.multiple, 1,
            hint=" (the vocabulary is padded to a multiple of multiple * tp; Megatron's default is 128)"))

    def shard(self, shape, tp, tp_rank, dp=1, dp_rank=0):
        vocab = shape[self.dim]
        rows = padded_vocab(vocab, self.multiple, tp) // tp
        local = tuple(rows if d == self.dim else s for d, s in enumerate(shape))
        start = tp_rank * rows
        real = max(0, min(rows, vocab - start))
        if real == 0:
            return LocalShard(local, ())
        sizes = tuple(real if d == self.dim else s for d, s in enumerate(shape))
        g = tuple(start if d == self.dim else 0 for d in range(len(shape)))
        return LocalShard(local, (Piece(Region(g, sizes), Region((0,) * len(shape), sizes)),))


@dataclass(frozen=True)
class Fused(SplitRule):
    """Several tensors concatenated along ``dim`` (global order: segment after segment).

    Args:
        segments: size of each fused part along ``dim`` (``(q, k, v)`` rows, ``(gate, up)``).
        groups: ``0`` splits every segment into ``tp`` contiguous parts and stores a rank's
            parts segment after segment (fused gate/up). ``n > 0`` cuts every segment into
            ``n`` equal chunks (one per key/value head group), gives each rank ``n / tp``
            consecutive groups and stores them group after group, each group's chunks in
            segment order: Megatron's fused QKV ``[q_g, k_g, v_g]`` per query group.
        unit: what a group is, for error messages (``"key/value heads"``).
    """

    dim: int = 0
    segments: tuple[int, ...] = ()
    groups: int = 0
    unit: str = "rows"
    kind: ClassVar[str] = "fused"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", integer("fused dim", self.dim, 0))
        if isinstance(self.segments, (str, bytes)) or not hasattr(self.segments, "__iter__"):
            raise ValueError(f"fused segments {self.segments!r} must be a list of sizes")
        object.__setattr__(self, "segments", tuple(integer("fused segment", s, 1) for s in self.segments))
        if not self.segments:
            raise ValueError("fused segments are empty; list the size of every fused part")
        object.__setattr__(self, "groups", integer("fused groups", self.groups, 0))
        if not isinstance(self.unit, str):
            raise ValueError(f"fused unit {self.unit!r} must be a string")

    def check(self, shape, tp, dp=1):
        problem = _dim_problem(self, shape)
        if problem:
            return problem
        if sum(self.segments) != shape[self.dim]:
            return (f"fused segments {list(self.segments)} sum to {sum(self.segments)}, "
                    f"not to dim {self.dim} of size {shape[self.dim]}")
        if self.groups:
            if any(s % self.groups for s in self.segments):
                return f"segments {list(self.segments)} do not cut into {self.groups} groups"
            if self.groups % tp:
                return f"tp={tp} does not divide {self.groups} {self.unit}; {divisor_hint(self.groups)}"
        elif any(s % tp for s in self.segments):
            return (f"tp={tp} does not divide the fused parts {list(self.segments)} ({self.unit}); "
                    f"{divisor_hint(min(self.segments))}")
        return None

    def shard(self, shape, tp, tp_rank, dp=1, dp_rank=0):
        seg_start = [sum(self.segments[:i]) for i in range(len(self.segments))]
        if self.groups:
            per_rank = self.groups // tp
            chunks = [s // self.groups for s in self.segments]
            spans = [(seg_start[j] + g * chunks[j], chunks[j])
                     for g in range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
                     for j in range(len(self.segments))]
        else:
            spans = [(seg_start[j] + tp_rank * (s // tp), s // tp) for j, s in enumerate(self.segments)]
        pieces = []
        local_pos = 0
        nd = len(shape)
        for gpos, size in spans:
            sizes = tuple(size if d == self.dim else shape[d] for d in range(nd))
            g = tuple(gpos if d == self.dim else 0 for d in range(nd))
            loc = tuple(local_pos if d == self.dim else 0 for d in range(nd))
            pieces.append(Piece(Region(g, sizes), Region(loc, sizes)))
            local_pos += size
        local = tuple(local_pos if d == self.dim else shape[d] for d in range(nd))
        return LocalShard(local, tuple(pieces))


SPLIT_KINDS: dict[str, type[SplitRule]] = {
    cls.kind: cls for cls in (Replicate, Split, VocabSplit, Fused)
}


def register_split(cls: type[SplitRule]) -> type[SplitRule]:
    """Make a split rule known to :func:`split_from_json` (used by DTensor-derived rules)."""
    SPLIT_KINDS[cls.kind] = cls
    _PARSED.clear()
    return cls


#: Rules parsed, by their JSON's items (a manifest names a few rules for hundreds of tensors;
#: rules are immutable, so one object serves them all). Emptied when full.
_PARSED: dict[tuple, SplitRule] = {}
_PARSED_MAX = 4096


def split_from_json(obj: dict) -> SplitRule:
    """The rule ``obj`` (as :meth:`SplitRule.to_json` writes it) describes.

    Raises:
        ValueError: not an object, an unknown kind, unknown fields or invalid values.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a split rule must be a JSON object, not {obj!r}")
    try:  # types in the key: 1, 1.0 and true are equal in Python, not as fields of a rule
        key = tuple((k, tuple((type(x), x) for x in v) if type(v) is list else (type(v), v))
                    for k, v in obj.items())
        rule = _PARSED.get(key)
    except TypeError:  # a value that does not hash (nested lists): parsed, and refused, below
        key, rule = None, None
    if rule is None:
        rule = _parse_split(obj)
        if key is not None:
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[key] = rule
    return rule


def _parse_split(obj: dict) -> SplitRule:
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; known: {', '.join(SPLIT_KINDS)}")
    cls = SPLIT_KINDS[kind]
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items() if k != "kind"}
    unknown = sorted(set(args) - set(cls.__dataclass_fields__))  # type: ignore[attr-defined]
    if unknown:
        raise ValueError(f"split kind {kind!r} takes no {unknown}; it takes "
                         f"{sorted(cls.__dataclass_fields__)}")  # type: ignore[attr-defined]
    return cls(**args)
