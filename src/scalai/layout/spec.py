"""Tensor specs: name, global shape, dtype, split rule and pipeline residence.

A job's state is a list of :class:`TensorSpec`. Model parameters come from a model (see
:mod:`scalai.layout.rules` and :mod:`scalai.layout.dtensor`); their optimizer state is
derived here with :func:`with_optimizer_state`, so that every Adam moment and fp32 master
copy follows its parameter through every change of layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from ..dtypes import itemsize
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
            raise ValueError(f"unknown residence {self.kind!r}")
        if self.kind == "layer" and self.layer < 0:
            raise ValueError("a layer residence needs the layer's global index")

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
        if text.startswith("layer:"):
            return cls("layer", int(text.split(":", 1)[1]))
        return cls(text)


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
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        itemsize(self.dtype)  # validates the dtype name

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
