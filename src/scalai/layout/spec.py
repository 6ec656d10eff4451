"""Tensor specs: name, global shape, dtype, split rule and pipeline residence.

A job's state is a list of :class:`TensorSpec`. Model parameters come from a model (see
:mod:`scalai.layout.rules` and :mod:`scalai.layout.dtensor`); their optimizer state is
derived here with :func:`with_optimizer_state`, so that every Adam moment and fp32 master
copy follows its parameter through every change of layout.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterable, Sequence

from ..dtypes import itemsize
from ..limits import DIMS, ELEMENTS
from ..validate import integer
from .splits import Replicate, SplitRule, split_from_json

__all__ = ["Residence", "TensorSpec", "with_optimizer_state", "OPTIMIZER_STATES",
           "optimizer_tensor_name"]

#: Adam state kept per parameter, in fp32; ``master`` only when the parameter is not fp32.
OPTIMIZER_STATES = ("master", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True, slots=True)
class Residence:
    """Which pipeline stages hold a tensor.

    ``kind`` is ``"layer"`` (the stage of transformer layer ``layer``), ``"first"``
    (embeddings), ``"last"`` (final norm, output head), ``"tied"`` (input embedding tied
    to the output head: first and last stage each hold a copy) or ``"all"``.
    """

    kind: str
    layer: int = -1

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "first", "last", "tied", "all"):
            raise ValueError(f"unknown residence {self.kind!r}; use layer:N, first, last, tied or all")
        if self.kind == "layer":
            integer("a layer residence's layer", self.layer, 0, hint=" (the layer's global index)")

    @classmethod
    def of_layer(cls, layer: int) -> Residence:
        return cls("layer", layer)

    def stages(self, stage_of_layer: Sequence[int], pp: int) -> tuple[int, ...]:
        """Stages holding the tensor, given each layer's stage."""
        if self.kind == "layer":
            if self.layer >= len(stage_of_layer):
                raise ValueError(f"layer {self.layer} does not exist in a {len(stage_of_layer)}-layer model")
            return (stage_of_layer[self.layer],)
        if self.kind == "first":
            return (0,)
        if self.kind == "last":
            return (pp - 1,)
        if self.kind == "tied":
            return (0,) if pp == 1 else (0, pp - 1)
        return tuple(range(pp))

    def to_json(self) -> str:
        return f"layer:{self.layer}" if self.kind == "layer" else self.kind

    @classmethod
    def from_json(cls, text: str) -> Residence:
        if not isinstance(text, str):
            raise ValueError(f"residence {text!r} is not a string such as \"layer:3\" or \"first\"")
        return _residence(text)

    @classmethod
    def _parse(cls, text: str) -> Residence:
        if text.startswith("layer:"):
            number = text.split(":", 1)[1]
            if not number.isdigit() or not number.isascii() or len(number) > 18:
                raise ValueError(f"residence {text!r} does not name a layer index (layer:N)")
            return cls("layer", int(number))
        return cls(text)


_SPEC_KEYS = frozenset({"name", "shape", "dtype", "split", "residence", "param", "state"})


@lru_cache(maxsize=4096)
def _residence(text: str) -> Residence:
    """One immutable :class:`Residence` per text (a model's tensors name a few hundred)."""
    return Residence._parse(text)


@dataclass(frozen=True)
class TensorSpec:
    """One global tensor of the job state.

    Attributes:
        name: unique name, e.g. ``decoder.layers.3.mlp.linear_fc1.weight`` or, for optimizer
            state, ``optimizer.exp_avg.decoder.layers.3.mlp.linear_fc1.weight``.
        shape: global (unpadded, unsplit) shape.
        dtype: torch dtype name (``"bfloat16"``).
        split: how the tensor-parallel ranks of a stage split it.
        residence: which pipeline stages hold it.
        param: for optimizer state, the parameter it follows; ``None`` for parameters.
        state: for optimizer state, which one (see :data:`OPTIMIZER_STATES`).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    split: SplitRule = field(default_factory=Replicate)
    residence: Residence = field(default_factory=lambda: Residence("all"))
    param: str | None = None
    state: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name {self.name!r} must be a non-empty string")
        if isinstance(self.shape, (str, bytes)) or not hasattr(self.shape, "__iter__"):
            raise ValueError(f"tensor {self.name}: shape {self.shape!r} is not a list of sizes")
        sizes = tuple(self.shape)
        if not all((type(s) is int or isinstance(s, numbers.Integral) and not isinstance(s, bool)) and s >= 0
                   for s in sizes):
            raise ValueError(f"tensor {self.name}: shape {list(sizes)!r:.200} must hold non-negative "
                             f"integer sizes")
        DIMS.check(len(sizes), lambda: f"tensor {self.name}")
        if type(self.shape) is not tuple or any(type(s) is not int for s in sizes):
            object.__setattr__(self, "shape", tuple(int(s) for s in sizes))
        ELEMENTS.check(self.numel, lambda: f"tensor {self.name} (shape {list(self.shape)})")
        if not isinstance(self.dtype, str):
            raise ValueError(f"tensor {self.name}: dtype {self.dtype!r} is not a dtype name")
        itemsize(self.dtype)  # validates the dtype name
        if not isinstance(self.split, SplitRule):
            raise ValueError(f"tensor {self.name}: split {self.split!r} is not a split rule")
        if (self.param is None) != (self.state is None) or not all(
                v is None or isinstance(v, str) for v in (self.param, self.state)):
            raise ValueError(f"tensor {self.name}: param and state are both strings (optimizer "
                             f"state) or both absent (a parameter)")

    @property
    def is_optimizer_state(self) -> bool:
        return self.param is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def to_json(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
               "split": self.split.to_json(), "residence": self.residence.to_json()}
        if self.param is not None:
            out["param"] = self.param
            out["state"] = self.state
        return out

    @classmethod
    def from_json(cls, obj: dict) -> TensorSpec:
        """Parse :meth:`to_json`'s object strictly; raises ValueError (or KeyError)."""
        if not isinstance(obj, dict):
            raise ValueError(f"a tensor spec must be a JSON object, not {obj!r:.80}")
        if not obj.keys() <= _SPEC_KEYS:
            raise ValueError(f"tensor spec {obj.get('name')!r} has unknown keys {sorted(obj.keys() - _SPEC_KEYS)}")
        if not isinstance(obj["shape"], list):
            raise ValueError(f"tensor {obj['name']!r}: shape {obj['shape']!r:.80} is not a list")
        return cls(name=obj["name"], shape=tuple(obj["shape"]), dtype=obj["dtype"],
                   split=split_from_json(obj["split"]),
                   residence=Residence.from_json(obj["residence"]),
                   param=obj.get("param"), state=obj.get("state"))


def optimizer_tensor_name(state: str, param: str) -> str:
    return f"optimizer.{state}.{param}"


def with_optimizer_state(params: Iterable[TensorSpec], states: Sequence[str] = OPTIMIZER_STATES,
                         dtype: str = "float32") -> list[TensorSpec]:
    """Parameters followed by their optimizer state, each split and placed like its parameter.

    A ``master`` copy is added only for parameters whose dtype is not ``dtype`` already
    (mixed-precision training keeps fp32 masters of bf16/fp16 weights).
    """
    params = list(params)
    out = list(params)
    for state in states:
        for p in params:
            if state == "master" and p.dtype == dtype:
                continue
            out.append(replace(p, name=optimizer_tensor_name(state, p.name), dtype=dtype,
                               param=p.name, state=state))
    return out
