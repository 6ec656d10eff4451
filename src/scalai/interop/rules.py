"""Rules files: how a foreign checkpoint's tensors map onto scalai's tensor specs.

A checkpoint written by another framework (Hugging Face, Megatron-LM, PyTorch DCP from
torchtitan or any DTensor model) names and cuts its tensors its own way: separate
``q_proj``/``k_proj``/``v_proj`` where scalai keeps one fused QKV tensor, GPT-2's
``Conv1D`` weights stored transposed, a vocabulary padded or not. A :class:`Rules` object
(one JSON file, or a built-in table) says, tensor by tensor, which foreign tensors make
which scalai tensor and how that tensor is split across tensor-parallel ranks;
:func:`scalai.interop.mapping.resolve` applies it to the foreign checkpoint's names and
shapes. Pure: no file is read here.

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
  parameters may leave out ``split`` and ``where`` (the model's own are used). Without
  ``tensors``, the checkpoint holds the model's parameters under their own names.
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
from dataclasses import dataclass
from typing import Any

from ..layout.rules import AttentionDims
from ..layout.spec import OPTIMIZER_STATES

__all__ = ["FORMAT", "Source", "TensorRule", "ModelDims", "Rules", "load_rules", "key_pattern", "LAYER", "PARAM"]

FORMAT = "scalai-rules/1"
LAYER = "{layer}"
PARAM = "{param}"
_LAYER_NAME = re.compile(r"\.layers\.\d+\.")
SPLITS = ("replicate", "column", "row", "vocab", "qkv", "gate_up")
WHERE = ("layer", "first", "last", "embedding", "all")


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
            key_pattern(t)  # validates the template

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
            key_pattern(t)
        for state, template in self.optimizer:
            if state not in OPTIMIZER_STATES:
                raise ValueError(f"optimizer state {state!r} is unknown; use {', '.join(OPTIMIZER_STATES)}")
            if PARAM not in template:
                raise ValueError(f"optimizer template {template!r} for {state} has no {PARAM}")

    def rule_for(self, key: str) -> TensorRule | None:
        """The rule that reads foreign ``key`` (``None``: no rule does)."""
        return next((r for r in self.tensors if any(key_pattern(s.key).fullmatch(key) for s in r.sources)), None)

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
    _keys(obj, {"format"}, {"tensors", "model", "dims", "ignore", "optimizer"}, "the file")
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
    if "tensors" not in obj:
        if model is None:
            raise ValueError("the file has no tensors; list them, or name the scalai model whose tensors "
                             "the checkpoint holds under their own names (\"model\": ...)")
        entries = [{"from": [n]} for n in defaults["tensors"]]  # the model's names, {layer} templates
    else:
        entries = obj["tensors"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("tensors is not a non-empty list")
    tensors = []
    for i, t in enumerate(entries):
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
        known = defaults.get("tensors", {}).get(name, {})
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
        tensors[_LAYER_NAME.sub(f".layers.{LAYER}.", spec.name)] = {"split": kind, "where": where}
    return {"dims": dims, "tensors": tensors}


def _keys(obj: dict, required: set[str], optional: set[str], what: str) -> None:
    missing, unknown = required - set(obj), set(obj) - required - optional
    if missing or unknown:
        raise ValueError(f"{what}: " + "; ".join(
            ([f"missing {sorted(missing)}"] if missing else []) +
            ([f"unknown {sorted(unknown)} (known: {sorted(required | optional)})"] if unknown else [])))


def key_pattern(template: str, param: bool = False) -> re.Pattern:
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
