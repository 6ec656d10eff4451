"""Applying a rules file: foreign names and shapes in, scalai's tensor specs out. Pure.

:func:`resolve` matches a foreign checkpoint's tensors (``{key: Foreign(shape, dtype)}``)
against a :class:`~scalai.interop.rules.Rules` and returns a :class:`Mapping`: every
scalai :class:`~scalai.layout.spec.TensorSpec` and, for each, the foreign tensors
(:class:`Part`) it is made of, with where their rows land. :func:`foreign_tensors` is the
inverse, for exports: the foreign tensors that rules make of scalai's specs.
:meth:`Part.window` turns a box of a scalai tensor into the box of a foreign tensor that
fills it, which is all a source or sink of a foreign format needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping as TMapping, NamedTuple, Sequence

from ..layout.rules import Rule
from ..layout.spec import OPTIMIZER_STATES, Residence, TensorSpec, optimizer_tensor_name
from ..regions import Region
from .rules import LAYER, PARAM, ModelDims, Rules, TensorRule, key_pattern

__all__ = ["Foreign", "Part", "Mapped", "Mapping", "resolve", "foreign_tensors"]


class Foreign(NamedTuple):
    """A foreign tensor as stored: shape and dtype name (``"float32"``)."""

    shape: tuple[int, ...]
    dtype: str



@dataclass(frozen=True)
class Part:
    """One foreign tensor's place in a scalai tensor.

    Attributes:
        key: the foreign tensor.
        start, rows: the rows ``[start, start + rows)`` of dim 0 of the scalai tensor it gives.
        transpose: stored transposed (2-d): foreign element ``[j, i]`` is scalai ``[start + i, j]``.
        shape: the foreign tensor's stored shape (a padded vocabulary stores more than
            ``rows``; only the first ``rows`` are read).
    """

    key: str
    start: int
    rows: int
    transpose: bool
    shape: tuple[int, ...]

    def window(self, box: Region) -> tuple[Region, Region] | None:
        """For a box of the scalai tensor: the box of the foreign tensor this part gives
        to it (in stored order: transposed for a transposed part) and where that lands
        relative to ``box`` (in scalai order), or ``None`` when they do not meet."""
        lo, hi = max(box.offsets[0], self.start), min(box.ends[0], self.start + self.rows)
        if hi <= lo:
            return None
        rows = (lo - self.start, hi - lo)
        inside = Region((lo - box.offsets[0], *(0,) * (box.ndim - 1)), (hi - lo, *box.sizes[1:]))
        if self.transpose:
            return Region((box.offsets[1], rows[0]), (box.sizes[1], rows[1])), inside
        return Region((rows[0], *box.offsets[1:]), (rows[1], *box.sizes[1:])), inside


@dataclass(frozen=True)
class Mapped:
    """A scalai tensor and the foreign tensors it is made of (in row order)."""

    spec: TensorSpec
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Mapping:
    """What :func:`resolve` found: every scalai tensor in spec order, and the rest.

    Attributes:
        tensors: parameters in model order, then each optimizer state found (as
            :func:`~scalai.layout.spec.with_optimizer_state` orders them).
        num_layers: transformer layers.
        ignored: foreign keys left out on purpose (``ignore`` patterns).
    """

    tensors: tuple[Mapped, ...]
    num_layers: int
    ignored: tuple[str, ...] = ()
    _by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update((m.spec.name, m) for m in self.tensors)

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return tuple(m.spec for m in self.tensors)

    def __getitem__(self, name: str) -> Mapped:
        return self._by_name[name]

    def keys(self) -> list[str]:
        """Every foreign key some scalai tensor reads."""
        return [p.key for m in self.tensors for p in m.parts]


def resolve(rules: Rules, foreign: TMapping[str, Foreign], states: Iterable[str] | None = None) -> Mapping:
    """Apply ``rules`` to a foreign checkpoint's tensors (``{key: Foreign(shape, dtype)}``).

    Args:
        states: optimizer states to map (default: every state the rules place that the
            checkpoint holds); ``()`` maps parameters only and ignores optimizer keys.

    Raises:
        ValueError: a tensor that a rule needs is missing; shapes or dtypes of the parts of
            one tensor disagree with each other or with the model's dimensions; a foreign
            tensor matches no rule and no ignore pattern (the message names the first
            ones and how to fix the rules).
    """
    found = [_match(rule, foreign) for rule in rules.tensors]
    layers = {layer for f in found for layer in f if layer is not None}
    num_layers = rules.dims.num_layers if rules.dims.num_layers is not None else (max(layers) + 1 if layers else 0)
    built: list[tuple[int, int, Mapped]] = []  # (phase, order) sort keys
    for index, (rule, matches) in enumerate(zip(rules.tensors, found)):
        if not matches:
            if rule.optional:
                continue
            raise ValueError(f"the checkpoint has no {rule.sources[0].key.replace(LAYER, '0')!r} "
                             f"(rule for {rule.name}); is this the right model family or rules file?")
        want = range(num_layers) if rule.layered else (None,)
        missing = [layer for layer in want if layer not in matches]
        if missing or set(matches) - set(want):
            extra = sorted(set(matches) - set(want))
            what = (f"layer {missing[0]}" if missing else f"layer {extra[0]}, beyond the model's {num_layers}")
            raise ValueError(f"rule for {rule.name}: the checkpoint's tensors stop short or run over at {what}; "
                             f"check dims.num_layers and that the checkpoint is complete")
        for layer in want:
            mapped = _build(rule, layer, matches[layer], foreign, rules.dims)
            phase = 1 if rule.layered else (0 if rule.where in ("first", "embedding") else 2)
            built.append(((phase, layer or 0, index), mapped))
    built.sort(key=lambda x: x[0])
    params = [m for _, m in built]
    names = [m.spec.name for m in params]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two rules make {dup}; give each scalai tensor one rule")
    tensors = list(params)
    wanted = [(s, t) for s, t in rules.optimizer if states is None or s in states]
    for state, template in wanted:
        tensors.extend(_optimizer(state, template, params, foreign))
    order = {s: i for i, s in enumerate(OPTIMIZER_STATES)}
    tensors.sort(key=lambda m: -1 if m.spec.state is None else order[m.spec.state])  # stable
    used = {p.key for m in tensors for p in m.parts}
    ignore = [key_pattern(t) for t in rules.ignore]
    ignore += [key_pattern(t, param=True) for s, t in rules.optimizer if (s, t) not in wanted]
    ignored, unknown = [], []
    for key in foreign:
        if key in used:
            continue
        (ignored if any(p.fullmatch(key) for p in ignore) else unknown).append(key)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ValueError(f"no rule uses {', '.join(unknown[:3])}{more}; add a rule for them, or "
                         f"ignore patterns if they hold nothing to keep")
    return Mapping(tuple(tensors), num_layers, tuple(ignored))


def _match(rule: TensorRule, foreign: TMapping[str, Foreign]) -> dict[int | None, tuple[str, ...]]:
    """``{layer (None if unlayered): the foreign key of every source}`` for each complete match."""
    per_source: list[dict[int | None, str]] = []
    for source in rule.sources:
        pat, hits = key_pattern(source.key), {}
        for key in foreign:
            m = pat.fullmatch(key)
            if m:
                hits[int(m.group(1)) if rule.layered else None] = key
        per_source.append(hits)
    layers = set().union(*per_source)
    out = {}
    for layer in layers:
        keys = tuple(hits.get(layer) for hits in per_source)
        if None in keys:
            absent = rule.sources[keys.index(None)].key.replace(LAYER, str(layer))
            raise ValueError(f"the checkpoint has {next(k for k in keys if k)} but not {absent!r} "
                             f"(both make {rule.name.replace(LAYER, str(layer))})")
        out[layer] = keys  # type: ignore[assignment]
    return out


def _build(rule: TensorRule, layer: int | None, keys: tuple[str, ...], foreign: TMapping[str, Foreign],
           dims: ModelDims) -> Mapped:
    name = rule.name.replace(LAYER, str(layer)) if layer is not None else rule.name
    parts, start, trailing, dtype = [], 0, None, None
    for source, key in zip(rule.sources, keys):
        shape, dt = tuple(foreign[key].shape), foreign[key].dtype
        logical = shape
        if source.transpose:
            if len(shape) != 2:
                raise ValueError(f"{key} is marked transposed but has shape {list(shape)}; only 2-d tensors transpose")
            logical = (shape[1], shape[0])
        if not logical:
            raise ValueError(f"{key} is a scalar; rules map tensors of at least one dimension")
        rows = logical[0]
        if rule.split == "vocab" and dims.vocab_size is not None:
            if rows < dims.vocab_size:
                raise ValueError(f"{key} has {rows} rows, fewer than dims.vocab_size={dims.vocab_size}")
            rows = dims.vocab_size
        if trailing is not None and (logical[1:] != trailing or dt != dtype):
            raise ValueError(f"the parts of {name} disagree: {keys[0]} is {dtype}{list(trailing)} after dim 0, "
                             f"{key} is {dt}{list(logical[1:])}")
        trailing, dtype = logical[1:], dt
        parts.append(Part(key, start, rows, source.transpose, shape))
        start += rows
    shape = (start, *trailing)  # type: ignore[misc]
    split = Rule("", rule.split, "first").split_rule(dims.attention(rule))
    segments = getattr(split, "segments", ())
    if len(parts) > 1 and tuple(p.rows for p in parts) != tuple(segments):
        raise ValueError(f"{name}: its parts have {[p.rows for p in parts]} rows, the model's dimensions give "
                         f"{list(segments) or 'a tensor that is not fused'}; check the order in 'from' and "
                         f"the model section")
    if rule.where == "layer":
        residence = Residence.of_layer(layer)  # type: ignore[arg-type]
    elif rule.where == "embedding":
        residence = Residence("tied" if dims.tied_embeddings else "first")
    else:
        residence = Residence(rule.where)
    return Mapped(TensorSpec(name, shape, dtype, split, residence), tuple(parts))  # type: ignore[arg-type]


def _optimizer(state: str, template: str, params: list[Mapped], foreign: TMapping[str, Foreign]) -> list[Mapped]:
    """The optimizer state ``state`` of every parameter, where ``template`` finds it."""
    out, missing = [], []
    for m in params:
        keys = [template.replace(PARAM, p.key) for p in m.parts]
        present = [k in foreign for k in keys]
        if not any(present):
            missing.append(m.spec.name)
            continue
        if not all(present):
            raise ValueError(f"{state} of {m.spec.name}: the checkpoint has {keys[present.index(True)]} but not "
                             f"{keys[present.index(False)]}")
        parts = []
        for p, k in zip(m.parts, keys):
            if tuple(foreign[k].shape) != p.shape:
                raise ValueError(f"{k} has shape {list(foreign[k].shape)}, its parameter {p.key} {list(p.shape)}")
            parts.append(replace(p, key=k))
        dtypes = {foreign[k].dtype for k in keys}
        if len(dtypes) != 1:
            raise ValueError(f"{state} of {m.spec.name}: parts of dtypes {sorted(dtypes)}")
        spec = replace(m.spec, name=optimizer_tensor_name(state, m.spec.name), dtype=dtypes.pop(),
                       param=m.spec.name, state=state)
        out.append(Mapped(spec, tuple(parts)))
    if out and missing:
        raise ValueError(f"the checkpoint holds {state} for {out[0].spec.param} but not for {missing[0]}; "
                         f"it is incomplete")
    return out


def foreign_tensors(rules: Rules, specs: Sequence[TensorSpec], num_layers: int) -> dict[str, Foreign]:
    """The foreign tensors ``rules`` make of scalai's ``specs`` (parameters): what an export
    writes, the inverse of :func:`resolve` (``resolve(rules, foreign_tensors(...))`` maps
    them back). Fused tensors are cut by the model's dimensions; vocabularies keep their
    real rows.

    Raises:
        ValueError: a tensor a rule needs is missing, or a fused tensor does not cut into
            its parts.
    """
    by_name = {s.name: s for s in specs if not s.is_optimizer_state}
    out: dict[str, Foreign] = {}
    for rule in rules.tensors:
        for layer in (range(num_layers) if rule.layered else (None,)):
            name = rule.name.replace(LAYER, str(layer)) if layer is not None else rule.name
            spec = by_name.get(name)
            if spec is None:
                if rule.optional:
                    continue
                raise ValueError(f"the checkpoint has no {name}, which the rules need; is it a model of this family?")
            if len(rule.sources) == 1:
                rows = [spec.shape[0]]
            else:
                rows = list(getattr(Rule("", rule.split, "first").split_rule(rules.dims.attention(rule)),
                                    "segments", ()))
                if len(rows) != len(rule.sources) or sum(rows) != spec.shape[0]:
                    raise ValueError(f"{name} ({list(spec.shape)}) does not cut into the {len(rule.sources)} parts "
                                     f"of rows {rows} that the model's dimensions give")
            for source, r in zip(rule.sources, rows):
                shape = (r, *spec.shape[1:])
                key = source.key.replace(LAYER, str(layer)) if layer is not None else source.key
                out[key] = Foreign(shape[::-1] if source.transpose else shape, spec.dtype)
    return out
