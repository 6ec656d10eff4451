"""Tensor specs from PyTorch DTensor placements (``Shard``, ``Replicate``, ``_StridedShard``).

A model parallelized with PyTorch's own APIs (``parallelize_module`` for tensor
parallelism, ``fully_shard`` for FSDP2) carries its layout on every parameter: a
``DeviceMesh`` and one placement per mesh axis. :class:`MeshSplit` keeps those placements
as plain data tied to axis *names* (our data-parallel axis ``"dp"`` and tensor-parallel
axis ``"tp"``), never to degrees, so one rule lays the tensor out at any ``(tp, dp)``.

Semantics (those of torch's DTensor, checked against torch 2.13; releases before the
rework of uneven ``_StridedShard``, pytorch/pytorch#163843, read uneven strided shards
differently): placements apply left to right in mesh order, each to what the previous ones
left on this rank.

- ``Shard(d)`` over an axis of ``n`` ranks cuts the current local extent ``L`` of dim ``d``
  like ``torch.chunk``: chunks of ``ceil(L / n)``; trailing ranks get less, or nothing
  (an empty local tensor, e.g. shape ``(0, 6)``).
- ``_StridedShard(d, split_factor=f)`` first cuts the extent into ``f`` chunks (the shards
  of the axes to its right, as if those had been applied first), cuts each of those into
  ``n`` chunks, and gives rank ``c`` chunk ``c`` of every one, concatenated: one rank owns
  up to ``f`` non-contiguous slices. FSDP2 + TP produce ``(_StridedShard(0, tp), Shard(0))``
  on mesh ``("dp", "tp")`` for column-parallel weights; :class:`AxisPlacement` records
  ``f`` as the names of the axes whose degrees multiply to it (``split_by=("tp",)``).

FSDP2 stores a strided dim as ``chunk(chunk(rows, tp)[t], dp)[d]``; torch's left-to-right
reading of its own label agrees with that except for some uneven sizes over ``dp >= 3``
(7 rows, tp=2, dp=3). :meth:`MeshSplit.check` refuses those layouts rather than guess.

The per-dimension bookkeeping is a list of runs ``(global start, length)`` in local order,
so that even a 50k-row vocabulary costs a handful of integers, not an index list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from math import prod
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from ..dtypes import name_of
from ..regions import Region
from .spec import Residence, TensorSpec
from .splits import LocalShard, Piece, Replicate, SplitRule, register_split

__all__ = ["AxisPlacement", "MeshSplit", "split_from_placements", "specs_from_module",
           "DEFAULT_AXIS_NAMES", "AXES"]

#: Our two mesh axes: ``"dp"`` (data parallel, FSDP sharding) and ``"tp"`` (tensor parallel).
AXES = ("dp", "tp")

#: Torch mesh axis name -> our axis, accepted unless the caller maps names otherwise.
DEFAULT_AXIS_NAMES: Mapping[str, str] = {"dp": "dp", "dp_shard": "dp", "fsdp": "dp", "tp": "tp"}

_KINDS = ("replicate", "shard", "strided")

# (global start, length) runs of one tensor dimension, in the order the local tensor holds them.
_Runs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class AxisPlacement:
    """The placement of a tensor over one mesh axis, as plain data.

    Attributes:
        axis: ``"dp"`` or ``"tp"``.
        kind: ``"replicate"``, ``"shard"`` (torch ``Shard(dim)``) or ``"strided"`` (torch
            ``_StridedShard(dim, split_factor)``).
        dim: the tensor dimension cut (``None`` for ``"replicate"``).
        split_by: for ``"strided"`` from FSDP2 + TP, the later mesh axes that also shard
            ``dim``; the split factor is the product of their degrees (FSDP2's definition),
            which keeps the rule valid at other degrees.
        factor: for ``"strided"`` from views (e.g. flattening a tensor sharded on its inner
            dim), a split factor that comes from the tensor's shape, not from any degree.
            Exactly one of ``split_by`` and ``factor > 1`` is given.
    """

    axis: str
    kind: str
    dim: int | None = None
    split_by: tuple[str, ...] = ()
    factor: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "split_by", tuple(self.split_by))
        if self.axis not in AXES:
            raise ValueError(f"mesh axis {self.axis!r} is not one of {AXES}; map torch's axis "
                             f"names to these with axis_names={{...}}")
        if self.kind not in _KINDS:
            raise ValueError(f"placement kind {self.kind!r} on axis {self.axis!r} is not one of {_KINDS}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"split factor {self.factor!r} on axis {self.axis!r} must be a positive integer")
        if self.kind == "replicate":
            if self.dim is not None or self.split_by or self.factor != 1:
                raise ValueError(f"a replicate placement on axis {self.axis!r} takes no dim, split_by or factor")
            return
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"{self.kind} placement on axis {self.axis!r} needs a non-negative "
                             f"tensor dim, got {self.dim!r} (normalize negative dims first)")
        if self.kind == "strided" and bool(self.split_by) == (self.factor > 1):
            raise ValueError(f"strided placement on axis {self.axis!r} needs either split_by (the "
                             f"axes whose degrees give its split factor, e.g. split_by=('tp',)) or "
                             f"a fixed factor > 1, not {'both' if self.split_by else 'neither'}")
        if self.kind == "shard" and (self.split_by or self.factor != 1):
            raise ValueError(f"a plain shard on axis {self.axis!r} takes no split_by or factor; "
                             f"use kind='strided'")

    @classmethod
    def replicate(cls, axis: str) -> AxisPlacement:
        return cls(axis, "replicate")

    @classmethod
    def shard(cls, axis: str, dim: int) -> AxisPlacement:
        return cls(axis, "shard", dim)

    @classmethod
    def strided(cls, axis: str, dim: int, split_by: Sequence[str] = (), factor: int = 1) -> AxisPlacement:
        return cls(axis, "strided", dim, tuple(split_by), factor)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"axis": self.axis, "kind": self.kind}
        if self.dim is not None:
            out["dim"] = self.dim
        if self.split_by:
            out["split_by"] = list(self.split_by)
        if self.factor != 1:
            out["factor"] = self.factor
        return out

    def __str__(self) -> str:
        if self.kind == "replicate":
            return f"{self.axis}:R"
        if self.kind == "shard":
            return f"{self.axis}:S({self.dim})"
        return f"{self.axis}:_S({self.dim},{'*'.join(self.split_by) or self.factor})"


@register_split
@dataclass(frozen=True)
class MeshSplit(SplitRule):
    """A tensor laid out over a ``("dp", "tp")`` mesh (or one of its axes) the DTensor way.

    Args:
        placements: one :class:`AxisPlacement` per mesh axis, in mesh order (dicts are
            accepted, as read from JSON). Examples, for a ``(rows, cols)`` weight:

            - FSDP2 + TP column-parallel: ``(strided("dp", 0, ("tp",)), shard("tp", 0))``
            - FSDP2 + TP row-parallel: ``(shard("dp", 0), shard("tp", 1))``
            - TP only, row-parallel: ``(shard("tp", 1),)``
            - FSDP only: ``(shard("dp", 0),)``

    A mesh without a ``"dp"`` axis leaves the data-parallel ranks as replicas (and likewise
    for ``"tp"``). ``shard`` returns exactly the global regions and local shape that
    ``DTensor.to_local()`` has on the rank at those coordinates.
    """

    placements: tuple[AxisPlacement, ...] = ()
    kind: ClassVar[str] = "mesh"
    uses_dp: ClassVar[bool] = True

    def __post_init__(self) -> None:
        placements = tuple(AxisPlacement(**_from_json_dict(p)) if isinstance(p, Mapping) else p
                           for p in self.placements)
        object.__setattr__(self, "placements", placements)
        if not placements:
            raise ValueError("a MeshSplit needs one placement per mesh axis; got none")
        axes = [p.axis for p in placements]
        if len(set(axes)) != len(axes):
            raise ValueError(f"mesh axes {axes} repeat; each of {AXES} may appear once")
        for i, p in enumerate(placements):
            for name in p.split_by:
                later = {q.axis: q for q in placements[i + 1:]}
                q = later.get(name)
                if q is None or q.kind == "replicate" or q.dim != p.dim:
                    raise ValueError(
                        f"{p} is split by axis {name!r}, which must come later in the mesh "
                        f"and shard the same dim {p.dim}; placements are {self}"
                    )

    # -- layout -------------------------------------------------------------------------
    def check(self, shape, tp, dp=1):
        """Why ``shape`` cannot be laid out at ``tp``, ``dp``, or ``None``.

        Uneven sizes are fine (torch.chunk semantics). Refused: a placement on a dim the
        tensor lacks, and an FSDP2-style strided dim whose uneven chunks torch and FSDP2
        place differently (see :func:`_strided_ambiguity`).
        """
        shape = tuple(shape)
        problem = self._dim_problem(shape)
        if problem:
            return problem
        for p in self.placements:
            if p.kind == "strided" and p.split_by:
                problem = _strided_ambiguity(self, p.dim, shape[p.dim], tp, dp)
                if problem:
                    return problem
        return None

    def _dim_problem(self, shape: tuple[int, ...]) -> str | None:
        for p in self.placements:
            if p.kind != "replicate" and p.dim >= len(shape):
                return (f"placement {p} shards dim {p.dim} but the tensor has {len(shape)} "
                        f"dims (shape {list(shape)})")
        return None

    def shard(self, shape, tp, tp_rank, dp=1, dp_rank=0):
        """The local tensor of the rank at (``tp_rank``, ``dp_rank``) of a ``tp`` x ``dp`` mesh.

        Returns:
            ``LocalShard(shape, pieces)``: ``shape`` is ``to_local().shape`` (a dim may be 0:
            an empty local tensor, then no pieces); one piece per combination of the
            contiguous runs each dim holds (several along a strided dim), each mapping a
            global box to the same-sized local box.
        """
        shape = tuple(int(s) for s in shape)
        degrees, coords = _degrees(tp, tp_rank, dp, dp_rank)
        problem = self._dim_problem(shape)
        if problem:
            raise ValueError(problem)
        runs = [_dim_runs(self, d, size, degrees, coords) for d, size in enumerate(shape)]
        local = tuple(sum(n for _, n in r) for r in runs)
        if any(n == 0 for n in local):
            return LocalShard(local, ())
        # One piece per combination of runs: a box in the global tensor and in the local one.
        per_dim = []
        for r in runs:
            at, boxes = 0, []
            for start, n in r:
                boxes.append((start, at, n))
                at += n
            per_dim.append(boxes)
        pieces = tuple(
            Piece(Region(tuple(b[0] for b in combo), tuple(b[2] for b in combo)),
                  Region(tuple(b[1] for b in combo), tuple(b[2] for b in combo)))
            for combo in product(*per_dim)
        )
        return LocalShard(local, pieces)

    # -- serialization --------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"kind": self.kind, "placements": [p.to_json() for p in self.placements]}

    def __str__(self) -> str:
        return "MeshSplit(" + ", ".join(str(p) for p in self.placements) + ")"


def _from_json_dict(obj: Mapping) -> dict:
    known = {"axis", "kind", "dim", "split_by", "factor"}
    extra = set(obj) - known
    if extra:
        raise ValueError(f"unknown placement fields {sorted(extra)} in {dict(obj)}; known: {sorted(known)}")
    return dict(obj)


def _degrees(tp: int, tp_rank: int, dp: int, dp_rank: int) -> tuple[dict[str, int], dict[str, int]]:
    for name, n, r in (("tp", tp, tp_rank), ("dp", dp, dp_rank)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}={n!r} is not a positive degree")
        if not 0 <= r < n:
            raise ValueError(f"{name}_rank={r} lies outside {name}={n}; use 0..{n - 1}")
    return {"tp": tp, "dp": dp}, {"tp": tp_rank, "dp": dp_rank}


def _chunk(length: int, n: int, c: int) -> tuple[int, int]:
    """Bounds ``[lo, hi)`` of chunk ``c`` of ``torch.chunk(range(length), n)`` (maybe empty)."""
    size = -(-length // n)
    lo = min(length, c * size)
    return lo, min(length, lo + size)


def _take(runs: _Runs, lo: int, hi: int) -> list[tuple[int, int]]:
    """Positions ``[lo, hi)`` of the concatenated ``runs``, as runs."""
    out, pos = [], 0
    for start, n in runs:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((start + a - pos, b - a))
        pos += n
        if pos >= hi:
            break
    return out


def _merge(runs: Iterable[tuple[int, int]]) -> _Runs:
    out: list[tuple[int, int]] = []
    for start, n in runs:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return tuple(out)


def _dim_runs(rule: MeshSplit, dim: int, size: int, degrees: Mapping[str, int],
              coords: Mapping[str, int], nested: bool = False) -> _Runs:
    """The runs of global ``dim`` (of ``size``) that one rank holds, in local order.

    ``nested=True`` reads every strided placement with ``split_by`` the way FSDP2 stores it
    (shard by the ``split_by`` axes first, then chunk each such shard again) instead of
    torch's left-to-right reading; the two agree whenever :meth:`MeshSplit.check` passes.
    """
    runs: _Runs = ((0, size),) if size else ()
    for p in _nested_order(rule.placements) if nested else rule.placements:
        if p.kind == "replicate" or p.dim != dim:
            continue
        n, c = degrees[p.axis], coords[p.axis]
        length = sum(k for _, k in runs)
        if p.kind == "shard" or (nested and p.split_by):
            runs = _merge(_take(runs, *_chunk(length, n, c)))
            continue
        factor = p.factor * prod(degrees[a] for a in p.split_by)
        first = -(-length // factor)
        pieces: list[tuple[int, int]] = []
        for j in range(factor):
            a = min(length, j * first)
            sub = min(length, a + first) - a
            lo, hi = _chunk(sub, n, c)
            pieces.extend(_take(runs, a + lo, a + hi))
        runs = _merge(pieces)
    return runs


def _nested_order(placements: Sequence[AxisPlacement]) -> list[AxisPlacement]:
    """Placements in the order they were physically applied: split_by axes before theirs."""
    done: list[AxisPlacement] = []
    waiting = list(placements)
    while waiting:
        ready = next(p for p in waiting if all(a in {q.axis for q in done} for a in p.split_by))
        waiting.remove(ready)
        done.append(ready)
    return done


@lru_cache(maxsize=4096)
def _strided_ambiguity(rule: MeshSplit, dim: int, size: int, tp: int, dp: int) -> str | None:
    """Why torch's reading of a strided dim differs from how FSDP2 stores it, if it does.

    FSDP2 shards the tensor-parallel shard again (``torch.chunk`` of a chunk) and labels it
    ``_StridedShard``; for some uneven sizes torch's left-to-right reading of that label
    gives other rows to a rank (e.g. 7 rows, tp=2, dp=3). Data written by one and read by
    the other would land in the wrong place, so such layouts are refused.
    """
    degrees = {"tp": tp, "dp": dp}
    if size % prod(degrees[p.axis] * p.factor for p in rule.placements if p.dim == dim) == 0:
        return None  # even splits agree
    for t in range(tp):
        for d in range(dp):
            coords = {"tp": t, "dp": d}
            torch_view = _dim_runs(rule, dim, size, degrees, coords)
            stored = _dim_runs(rule, dim, size, degrees, coords, nested=True)
            if torch_view != stored:
                return (f"{rule} is ambiguous for dim {dim} of size {size} at tp={tp}, dp={dp}: "
                        f"torch's _StridedShard gives tp rank {t}, dp rank {d} rows "
                        f"{_show(torch_view)} but FSDP2 stores rows {_show(stored)} there; "
                        f"use degrees whose product divides {size} or whose uneven chunks agree")
    return None


def _show(runs: _Runs) -> str:
    return "[" + ", ".join(f"{s}:{s + n}" for s, n in runs) + "]" if runs else "[]"


# -- from torch placements ----------------------------------------------------------------

def split_from_placements(mesh_dim_names: Sequence[str] | None, placements: Sequence[Any], *,
                          mesh_shape: Sequence[int] | None = None, ndim: int | None = None,
                          axis_names: Mapping[str, str] | None = None) -> SplitRule:
    """The split rule of a DTensor with ``placements`` over a mesh with ``mesh_dim_names``.

    Args:
        mesh_dim_names: the mesh's axis names (``DeviceMesh.mesh_dim_names``).
        placements: torch placements, one per mesh axis (``DTensor.placements``).
        mesh_shape: the mesh's sizes; when given, a ``_StridedShard``'s split factor is
            checked to be the product of the later axes sharding the same dim.
        ndim: the tensor's rank, to normalize negative dims.
        axis_names: torch axis name -> ``"dp"``/``"tp"``, on top of
            :data:`DEFAULT_AXIS_NAMES` (e.g. ``{"dp_shard_cp": "dp"}``).

    Returns:
        :class:`~scalai.layout.splits.Replicate` when every axis replicates, else a
        :class:`MeshSplit`.

    Raises:
        ValueError: unnamed or unknown axes, ``Partial`` placements, or a strided split
            factor that no later axis explains.
    """
    Partial, TReplicate, Shard, _StridedShard = _torch_placement_types()
    placements = list(placements)
    if mesh_dim_names is None:
        raise ValueError("the DTensor's mesh has no axis names; build it with "
                         "init_device_mesh(..., mesh_dim_names=('dp', 'tp'))")
    names = list(mesh_dim_names)
    if len(names) != len(placements):
        raise ValueError(f"{len(placements)} placements {placements} for a mesh with "
                         f"{len(names)} axes {names}; give one placement per axis")
    mapping = {**DEFAULT_AXIS_NAMES, **(axis_names or {})}
    axes = []
    for name in names:
        if name not in mapping:
            raise ValueError(f"mesh axis {name!r} is neither data- nor tensor-parallel; accepted "
                             f"names are {sorted(mapping)}; map others with "
                             f"axis_names={{{name!r}: 'dp' or 'tp'}}")
        axes.append(mapping[name])
    if len(set(axes)) != len(axes):
        raise ValueError(f"mesh axes {names} map to {axes}; each of {AXES} may appear once")

    def dim_of(p: Any, axis: str) -> int:
        dim = int(p.dim)
        if dim < 0:
            if ndim is None:
                raise ValueError(f"{p} on axis {axis!r} has a negative dim; pass ndim= to normalize it")
            dim += ndim
        return dim

    shard_dims = [dim_of(p, a) if isinstance(p, (Shard, _StridedShard)) else None
                  for p, a in zip(placements, names)]
    out = []
    for i, (p, axis, name) in enumerate(zip(placements, axes, names)):
        # _StridedShard subclassed Shard in older torch releases: test it first.
        if isinstance(p, _StridedShard):
            factor = int(p.split_factor)
            later = [j for j in range(i + 1, len(names)) if shard_dims[j] == shard_dims[i]]
            if factor == 1:
                out.append(AxisPlacement.shard(axis, shard_dims[i]))
                continue
            if not later:
                # A split factor that no axis explains comes from a view of the tensor
                # (e.g. flattening dims sharded on the inner one): it is part of the shape.
                out.append(AxisPlacement.strided(axis, shard_dims[i], factor=factor))
                continue
            if mesh_shape is not None:
                expected = prod(int(mesh_shape[j]) for j in later)
                if factor != expected:
                    raise ValueError(f"{p} on mesh axis {name!r} has split factor {factor}, not the "
                                     f"product {expected} of the later axes {[names[j] for j in later]} "
                                     f"sharding dim {shard_dims[i]}; only the FSDP2 + TP form "
                                     f"(split factor = degrees of the axes it interleaves with) "
                                     f"can be laid out at other degrees")
            out.append(AxisPlacement.strided(axis, shard_dims[i], [axes[j] for j in later]))
        elif isinstance(p, Shard):
            out.append(AxisPlacement.shard(axis, shard_dims[i]))
        elif isinstance(p, TReplicate):
            out.append(AxisPlacement.replicate(axis))
        elif isinstance(p, Partial):
            raise ValueError(f"{p} on mesh axis {name!r} holds unreduced partial values, not a shard "
                             f"of the tensor; redistribute it to Replicate() or Shard() first")
        else:
            raise ValueError(f"placement {p!r} on mesh axis {name!r} is not supported; "
                             f"supported are Shard, _StridedShard and Replicate")
    if all(p.kind == "replicate" for p in out):
        return Replicate()
    return MeshSplit(tuple(out))


def _torch_placement_types() -> tuple[type, type, type, type]:
    """Torch's ``Partial``, ``Replicate``, ``Shard`` and ``_StridedShard`` classes.

    Torch 2.4 keeps them under ``torch.distributed._tensor`` and has no ``_StridedShard``
    (nothing can then match it).
    """
    try:
        from torch.distributed.tensor import placement_types as pt
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import placement_types as pt  # type: ignore[no-redef]
    strided = getattr(pt, "_StridedShard", None) or type("_NoStridedShard", (), {})
    return pt.Partial, pt.Replicate, pt.Shard, strided


# -- from a module ------------------------------------------------------------------------

def specs_from_module(module: Any, *, residence_of: Callable[[str], Residence | None] | None = None,
                      buffers: bool = False, axis_names: Mapping[str, str] | None = None,
                      layer_containers: Sequence[str] = ("layers",)) -> list[TensorSpec]:
    """Tensor specs of a module whose parameters are DTensors (plain tensors: replicated).

    Args:
        module: a ``torch.nn.Module``, parallelized with ``parallelize_module`` and/or
            ``fully_shard`` (or not at all).
        residence_of: name -> :class:`~scalai.layout.spec.Residence`, or ``None`` to use
            the defaults below.
        buffers: include persistent buffers.
        axis_names: extra torch mesh axis names, see :func:`split_from_placements`.
        layer_containers: module names whose integer-keyed children are transformer layers.

    Residence defaults, without per-model code: a ``<container>.<i>.`` component gives
    layer ``i`` (layers keep their global index on every pipeline stage). Other tensors
    sit by registration order: before the first layer -> ``"first"`` (embeddings), after the
    last -> ``"last"`` (final norm, output head); a tensor registered under two names on
    both sides (tied input/output embedding) -> ``"tied"``; no layers at all -> ``"all"``.

    Returns:
        One :class:`~scalai.layout.spec.TensorSpec` per distinct tensor, named by its first
        name, with the global shape and torch's dtype name. Call it between steps (FSDP2
        parameters resharded), or on a model built on the meta device.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]

    layer_re = re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, layer_containers)) + r")\.(\d+)(?:\.|$)")
    # Every (name, tensor) in registration order; shared tensors appear under every name.
    entries: list[tuple[str, Any]] = []
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        entries.extend((dot + n, p) for n, p in mod.named_parameters(recurse=False, remove_duplicate=False))
        if buffers:
            skip = getattr(mod, "_non_persistent_buffers_set", set())
            entries.extend((dot + n, b) for n, b in mod.named_buffers(recurse=False, remove_duplicate=False)
                           if n not in skip and b is not None)
    aliases: dict[int, list[int]] = {}
    for pos, (_, t) in enumerate(entries):
        aliases.setdefault(id(t), []).append(pos)
    layer_of = [_layer_index(layer_re, name) for name, _ in entries]
    layer_pos = [i for i, layer in enumerate(layer_of) if layer is not None]

    specs = []
    for positions in aliases.values():
        name, tensor = entries[positions[0]]
        residence = residence_of(name) if residence_of is not None else None
        if residence is None:
            residence = _default_residence([layer_of[i] for i in positions], positions, layer_pos)
        try:
            dtype = name_of(tensor.dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if isinstance(tensor, DTensor):
            mesh = tensor.device_mesh
            try:
                split = split_from_placements(mesh.mesh_dim_names, tensor.placements,
                                              mesh_shape=tuple(mesh.shape), ndim=tensor.ndim,
                                              axis_names=axis_names)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        else:
            split = Replicate()
        specs.append(TensorSpec(name, tuple(tensor.shape), dtype, split, residence))
    return specs


def _layer_index(pattern: re.Pattern, name: str) -> int | None:
    match = pattern.search(name)
    return int(match.group(1)) if match else None


def _default_residence(layers: list[int | None], positions: list[int],
                       layer_pos: list[int]) -> Residence:
    """Residence of a tensor from its names' layer indices and registration positions."""
    known = {layer for layer in layers if layer is not None}
    if len(known) == 1 and None not in layers:
        return Residence.of_layer(known.pop())
    if not layer_pos:
        return Residence("all")
    before = any(p < layer_pos[0] for p in positions)
    after = any(p > layer_pos[-1] for p in positions)
    if before and after:
        return Residence("tied")
    if before and not known:
        return Residence("first")
    if after and not known:
        return Residence("last")
    return Residence("all")
