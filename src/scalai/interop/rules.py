"""Rules files: how a foreign checkpoint's tensors map onto scalai's tensor specs.

A checkpoint written by another framework (Hugging Face, Megatron-LM, PyTorch DCP from
torchtitan or any DTensor model) names and cuts its tensors its own way: separate
``q_proj``/``k_proj``/``v_proj`` where scalai keeps one fused QKV tensor, GPT-2's
``Conv1D`` weights stored transposed, a vocabulary padded or not. A :class:`Rules` object
(one JSON file, or a built-in table) says, tensor by tensor, which foreign tensors make
which scalai tensor and how that tensor is split across tensor-parallel ranks;
:func:`resolve` applies it to the foreign checkpoint's names and shapes and returns a
:class:`Mapping`: every scalai :class:`~scalai.layout.spec.TensorSpec` and, for each, the
foreign tensors (:class:`Part`) it is made of. Pure: no file is read here.

The format (``.json``; unknown keys are refused)::

    {
      "format": "scalai-rules/1",
      "model": "llama-tiny",
      "dims": {"num_layers": 32, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
               "ffn_hidden": 14336, "vocab_size": 128256, "vocab_multiple": 128,
               "tied_embeddings": false},
      "tensors": [
        {"name": "embedding.word_embeddings.weight", "split": "vocab", "where": "embedding",
         "from": ["tok_embeddings.weight"]},
        {"name": "decoder.layers.{layer}.self_attention.linear_qkv.weight", "split": "qkv",
         "from": ["layers.{layer}.attention.wq.weight", "layers.{layer}.attention.wk.weight",
                  "layers.{layer}.attention.wv.weight"]},
        {"name": "decoder.layers.{layer}.mlp.linear_fc2.weight", "split": "row",
         "from": [{"key": "h.{layer}.mlp.c_proj.weight", "transpose": true}]},
        {"name": "decoder.layers.{layer}.self_attention.linear_qkv.bias", "split": "qkv",
         "from": ["..."], "optional": true}
      ],
      "ignore": ["lm_head.weight", "layers.{layer}.attention.inv_freq"],
      "optimizer": {"exp_avg": "optimizer.state.{param}.exp_avg",
                    "exp_avg_sq": "optimizer.state.{param}.exp_avg_sq"}
    }

- ``model`` (optional): a scalai model (``scalai synth``'s names) the tensors belong to:
  its dimensions are the defaults of ``dims``, and an entry whose ``name`` is one of its
  parameters may leave out ``split`` and ``where`` (the model's own are used).
- ``dims``: what split rules need: ``num_heads``, ``num_kv_heads``, ``head_dim`` (``qkv``
  rules), ``ffn_hidden`` (``gate_up``), ``vocab_size``, ``vocab_multiple`` (Megatron's
  ``make_vocab_size_divisible_by``, default 128), ``tied_embeddings``; ``num_layers`` and
  ``vocab_size`` are read from the tensors when left out.
- ``tensors``, one entry per scalai tensor (per layer with ``{layer}``):

  - ``name``: the scalai tensor (default: the foreign key, when there is one). ``{layer}``
    is the global transformer-layer index; an entry with it matches every layer.
  - ``split``: how tensor-parallel ranks split it, as in :class:`scalai.layout.rules.Rule`:
    ``replicate``, ``column`` (dim 0), ``row`` (dim 1), ``vocab`` (dim 0, padded to a
    multiple of ``vocab_multiple * tp`` rows), ``qkv`` (fused Q, K, V, cut by key/value
    head group), ``gate_up`` (fused SwiGLU gate and up).
  - ``where``: which pipeline stage holds it: ``layer`` (implied by ``{layer}``), ``first``,
    ``last``, ``embedding`` (first; first and last when ``tied_embeddings``) or ``all``.
  - ``from``: the foreign tensors, concatenated along dim 0 in this order, that make the
    tensor (Q, K, V; gate, up). Each is a key or ``{"key": ..., "transpose": true}`` for a
    2-d tensor stored transposed (GPT-2's ``Conv1D`` keeps ``[in, out]``).
  - ``optional``: the whole entry may be absent (biases that some models of a family have).

- Padding: a ``vocab`` tensor stored with more rows than ``dims.vocab_size`` (padded, as
  Megatron-LM stores it) gives its first ``vocab_size`` rows; exports write exactly
  ``vocab_size`` rows. Padding inside scalai is the layout's business, never a rule's.
- ``ignore``: foreign keys that hold nothing to keep (buffers, a tied head's copy). Any
  other foreign key that no entry uses is an error: nothing is dropped or renamed silently.
- ``optimizer``: where the foreign checkpoint keeps each optimizer state (``master``,
  ``exp_avg``, ``exp_avg_sq``) of a parameter: ``{param}`` stands for the parameter's
  foreign key (each part of a fused tensor on its own). A state found for no parameter is
  left out; one found for some parameters only is an error.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping as TMapping, NamedTuple, Sequence

from ..layout.rules import AttentionDims, Rule
from ..layout.spec import OPTIMIZER_STATES, Residence, TensorSpec, optimizer_tensor_name
from ..regions import Region

__all__ = ["FORMAT", "Foreign", "Source", "TensorRule", "ModelDims", "Rules", "Part",
           "Mapped", "Mapping", "resolve", "foreign_tensors", "load_rules"]

FORMAT = "scalai-rules/1"
LAYER = "{layer}"
PARAM = "{param}"
SPLITS = ("replicate", "column", "row", "vocab", "qkv", "gate_up")
WHERE = ("layer", "first", "last", "embedding", "all")


class Foreign(NamedTuple):
    """A foreign tensor as stored: shape and dtype name (``"float32"``)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Source:
    """One foreign tensor of a rule: key template and whether it is stored transposed."""

    key: str
    transpose: bool = False

    def to_json(self) -> Any:
        return {"key": self.key, "transpose": True} if self.transpose else self.key


@dataclass(frozen=True)
class TensorRule:
    """Foreign tensors ``sources`` make scalai tensor ``name``, split by ``split``, held ``where``."""

    name: str
    split: str
    sources: tuple[Source, ...]
    where: str = "layer"
    optional: bool = False

    def __post_init__(self) -> None:
        what = f"rule for {self.name!r}"
        if self.split not in SPLITS:
            raise ValueError(f"{what}: split {self.split!r} is unknown; use one of {', '.join(SPLITS)}")
        if self.where not in WHERE:
            raise ValueError(f"{what}: where {self.where!r} is unknown; use one of {', '.join(WHERE)}")
        if not self.sources:
            raise ValueError(f"{what}: 'from' lists no foreign tensor")
        layered = {LAYER in t for t in (self.name, *(s.key for s in self.sources))}
        if len(layered) != 1:
            raise ValueError(f"{what}: {LAYER} must appear in the name and in every key of 'from', or in none")
        if self.layered != (self.where == "layer"):
            raise ValueError(f"{what}: where='layer' goes with {LAYER} in the names, and only with it")
        for t in (self.name, *(s.key for s in self.sources)):
            _pattern(t)  # validates the template

    @property
    def layered(self) -> bool:
        return LAYER in self.name

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "split": self.split}
        if self.where != "layer":
            out["where"] = self.where
        out["from"] = [s.to_json() for s in self.sources]
        if self.optional:
            out["optional"] = True
        return out


@dataclass(frozen=True)
class ModelDims:
    """What split rules need to know about the model (``None``: read from the tensors, or
    not needed)."""

    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden: int | None = None
    vocab_size: int | None = None
    vocab_multiple: int = 128
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden", "vocab_size",
                     "vocab_multiple"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_layers" else 1)):
                raise ValueError(f"dims.{name}={v!r} is not a positive integer")
        if not isinstance(self.tied_embeddings, bool):
            raise ValueError(f"dims.tied_embeddings={self.tied_embeddings!r} must be true or false")
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"dims.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    def attention(self, rule: TensorRule) -> AttentionDims:
        need = {"qkv": ("num_heads", "num_kv_heads", "head_dim"), "gate_up": ("ffn_hidden",)}.get(rule.split, ())
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"rule for {rule.name!r} (split {rule.split}) needs dims.{', dims.'.join(missing)}; "
                             f"add them to the rules file's dims (or name its model)")
        return AttentionDims(self.num_heads or 1, self.num_kv_heads or 1, self.head_dim or 1,
                             self.ffn_hidden or 1, self.vocab_multiple, self.tied_embeddings)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}


@dataclass(frozen=True)
class Rules:
    """A whole rules file: model dimensions, tensor rules, ignored keys, optimizer keys,
    and the scalai model they describe (if one is named)."""

    dims: ModelDims
    tensors: tuple[TensorRule, ...]
    ignore: tuple[str, ...] = ()
    optimizer: tuple[tuple[str, str], ...] = ()
    model: str | None = None

    def __post_init__(self) -> None:
        for t in self.ignore:
            _pattern(t)
        for state, template in self.optimizer:
            if state not in OPTIMIZER_STATES:
                raise ValueError(f"optimizer state {state!r} is unknown; use {', '.join(OPTIMIZER_STATES)}")
            if PARAM not in template:
                raise ValueError(f"optimizer template {template!r} for {state} has no {PARAM}")

    def rule_for(self, key: str) -> TensorRule | None:
        """The rule that reads foreign ``key`` (``None``: no rule does)."""
        return next((r for r in self.tensors if any(_pattern(s.key).fullmatch(key) for s in r.sources)), None)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"format": FORMAT}
        if self.model is not None:
            out["model"] = self.model
        out["dims"] = self.dims.to_json()
        out["tensors"] = [t.to_json() for t in self.tensors]
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.optimizer:
            out["optimizer"] = dict(self.optimizer)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str = "rules") -> Rules:
        """Parse strictly; ``ValueError`` names ``where``, the entry and what is wrong."""
        try:
            return _parse(obj)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{where}: {exc}") from None


def load_rules(path: str | os.PathLike) -> Rules:
    """Read a rules file (see the module docstring).

    Raises:
        ValueError: the file is missing, not JSON, or not a valid rules file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(f"rules file {path} does not exist; give the path of a JSON rules file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"rules file {path} is not readable JSON ({exc})") from None
    return Rules.from_json(obj, path)


def _parse(obj: Any) -> Rules:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else None
        raise ValueError(f"not a rules file of this scalai: it needs \"format\": \"{FORMAT}\""
                         + (f" (it has {got!r})" if got else ""))
    _keys(obj, {"format", "tensors"}, {"model", "dims", "ignore", "optimizer"}, "the file")
    model, defaults = obj.get("model"), {}
    if model is not None:
        if not isinstance(model, str):
            raise ValueError("model is not the name of a scalai model")
        defaults = _model_defaults(model)
    dims = obj.get("dims", {})
    if not isinstance(dims, dict):
        raise ValueError("dims is not an object")
    _keys(dims, set(), set(ModelDims.__dataclass_fields__), "dims")
    dims = {**defaults.get("dims", {}), **dims}
    if not isinstance(obj["tensors"], list) or not obj["tensors"]:
        raise ValueError("tensors is not a non-empty list")
    tensors = []
    for i, t in enumerate(obj["tensors"]):
        if not isinstance(t, dict):
            raise ValueError(f"tensors[{i}] is not an object")
        _keys(t, {"from"}, {"name", "split", "where", "optional"}, f"tensors[{i}]")
        sources = t["from"] if isinstance(t["from"], list) else None
        if not sources:
            raise ValueError(f"tensors[{i}].from is not a non-empty list")
        parsed = []
        for s in sources:
            if isinstance(s, str):
                parsed.append(Source(s))
            elif isinstance(s, dict) and isinstance(s.get("key"), str):
                _keys(s, {"key"}, {"transpose"}, f"tensors[{i}].from")
                if not isinstance(s.get("transpose", False), bool):
                    raise ValueError(f"tensors[{i}].from: transpose must be true or false")
                parsed.append(Source(s["key"], s.get("transpose", False)))
            else:
                raise ValueError(f"tensors[{i}].from holds {s!r}; give a key or {{\"key\": ..., \"transpose\": true}}")
        if "name" not in t and len(parsed) != 1:
            raise ValueError(f"tensors[{i}] has several foreign tensors and no name")
        name = t.get("name", parsed[0].key)
        if not isinstance(name, str):
            raise ValueError(f"tensors[{i}].name is not a string")
        known = defaults.get("tensors", {}).get(name.replace(LAYER, "0"), {})
        split, where = t.get("split", known.get("split")), t.get("where", known.get("where"))
        if split is None:
            raise ValueError(f"tensors[{i}] ({name}) has no split" +
                             (f", and {model} has no such parameter" if model else "; say how tp splits it"))
        where = where or ("layer" if LAYER in name else None)
        if where is None:
            raise ValueError(f"tensors[{i}] ({name}) has no {LAYER} and no where; say where it lives "
                             f"(first, last, embedding or all)")
        if not isinstance(split, str) or not isinstance(where, str) or not isinstance(t.get("optional", False), bool):
            raise ValueError(f"tensors[{i}] has a field of the wrong type")
        tensors.append(TensorRule(name, split, tuple(parsed), where, t.get("optional", False)))
    ignore = obj.get("ignore", [])
    optimizer = obj.get("optimizer", {})
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise ValueError("ignore is not a list of keys")
    if not isinstance(optimizer, dict) or not all(isinstance(v, str) for v in optimizer.values()):
        raise ValueError("optimizer is not an object of key templates")
    return Rules(ModelDims(**dims), tuple(tensors), tuple(ignore), tuple(optimizer.items()), model)


def _model_defaults(model: str) -> dict:
    """A named scalai model's dimensions, and each parameter's split and where (layer 0
    standing for every layer)."""
    from ..layout.splits import Fused, Replicate, Split, VocabSplit
    from ..models import get_model_shape, model_specs

    shape = get_model_shape(model)
    dims = {"num_layers": shape.num_layers, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "ffn_hidden": shape.ffn_hidden, "vocab_size": shape.vocab_size,
            "vocab_multiple": shape.vocab_multiple, "tied_embeddings": shape.tied_embeddings}
    tensors = {}
    for spec in model_specs(shape, optimizer=False):
        split = spec.split
        kind = ("replicate" if isinstance(split, Replicate) else "vocab" if isinstance(split, VocabSplit)
                else ("qkv" if split.groups else "gate_up") if isinstance(split, Fused)
                else ("column" if split.dim == 0 else "row") if isinstance(split, Split) else None)
        where = {"tied": "embedding"}.get(spec.residence.kind, spec.residence.kind)
        tensors[spec.name] = {"split": kind, "where": where}
    return {"dims": dims, "tensors": tensors}


def _keys(obj: dict, required: set[str], optional: set[str], what: str) -> None:
    missing, unknown = required - set(obj), set(obj) - required - optional
    if missing or unknown:
        raise ValueError(f"{what}: " + "; ".join(
            ([f"missing {sorted(missing)}"] if missing else []) +
            ([f"unknown {sorted(unknown)} (known: {sorted(required | optional)})"] if unknown else [])))


def _pattern(template: str, param: bool = False) -> re.Pattern:
    """The regular expression of a key template: ``{layer}`` matches a layer index (group
    1); with ``param``, ``{param}`` matches any key."""
    if param:
        return re.compile(".+".join(re.escape(p) for p in template.split(PARAM)))
    pieces = template.split(LAYER)
    if len(pieces) > 2:
        raise ValueError(f"key {template!r} uses {LAYER} more than once")
    if any(c in p for p in pieces for c in "{}"):
        raise ValueError(f"key {template!r} has a placeholder other than {LAYER}")
    return re.compile(r"(\d+)".join(re.escape(p) for p in pieces))


# -- resolving ---------------------------------------------------------------------------------

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
    ignore = [_pattern(t) for t in rules.ignore]
    ignore += [_pattern(t, param=True) for s, t in rules.optimizer if (s, t) not in wanted]
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
        pat, hits = _pattern(source.key), {}
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
