"""Tensor specs from a model and a small table of name-pattern rules.

No per-model code: a model built on the meta device gives every parameter's name, shape
and dtype; a :class:`Rule` table says, by regular expression on the name, how each is
split across tensor-parallel ranks and which pipeline stage holds it. The layer index of
``layers.<i>.`` gives the stage of transformer-layer parameters.

Built-in tables cover Megatron-core naming for GPT-2/GPT-3 blocks (:data:`GPT_RULES`) and
Llama blocks with grouped-query attention and a fused SwiGLU gate/up (:data:`LLAMA_RULES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .spec import Residence, TensorSpec
from .splits import Fused, Replicate, Split, SplitRule, VocabSplit

__all__ = ["Rule", "AttentionDims", "GPT_RULES", "LLAMA_RULES", "specs_from_named_tensors",
           "specs_from_module"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class AttentionDims:
    """What split rules need to know about the model beyond tensor shapes."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_multiple: int = 128
    tied_embeddings: bool = False


@dataclass(frozen=True)
class Rule:
    """Parameters whose full name matches ``pattern`` are split by ``split`` and live ``where``.

    ``split``: ``replicate``, ``column`` (dim 0), ``row`` (dim 1), ``vocab`` (padded
    vocabulary rows), ``qkv`` (fused QKV, per key/value head group), ``gate_up`` (fused
    SwiGLU gate and up projections). ``where``: ``layer`` (from ``layers.<i>.``),
    ``first``, ``last``, or ``embedding`` (first stage, and the last too when tied).
    """

    pattern: str
    split: str
    where: str = "layer"

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    def split_rule(self, dims: AttentionDims) -> SplitRule:
        if self.split == "replicate":
            return Replicate()
        if self.split == "column":
            return Split(0)
        if self.split == "row":
            return Split(1)
        if self.split == "vocab":
            return VocabSplit(0, dims.vocab_multiple)
        if self.split == "qkv":
            q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
            unit = "key/value heads" if dims.num_kv_heads != dims.num_heads else "attention heads"
            return Fused(0, (q, kv, kv), dims.num_kv_heads, unit)
        if self.split == "gate_up":
            return Fused(0, (dims.ffn_hidden, dims.ffn_hidden), 0, "MLP columns")
        raise ValueError(f"rule {self.pattern!r} has unknown split {self.split!r}; "
                         f"use replicate, column, row, vocab, qkv or gate_up")

    def residence(self, name: str, dims: AttentionDims) -> Residence:
        if self.where == "layer":
            m = _LAYER.search(name)
            if m is None:
                raise ValueError(f"rule {self.pattern!r} places {name} by layer, but the name has no 'layers.<i>.'")
            return Residence.of_layer(int(m.group(1)))
        if self.where == "embedding":
            return Residence("tied" if dims.tied_embeddings else "first")
        return Residence(self.where)


_L = r"decoder\.layers\.\d+\."

def _megatron_rules(fc1_split: str) -> tuple[Rule, ...]:
    return (
        Rule(r"embedding\.word_embeddings\.weight", "vocab", "embedding"),
        Rule(r"embedding\.position_embeddings\.weight", "replicate", "first"),
        Rule(_L + r"self_attention\.linear_qkv\.(weight|bias)", "qkv"),
        Rule(_L + r"self_attention\.linear_proj\.weight", "row"),
        Rule(_L + r"mlp\.linear_fc1\.(weight|bias)", fc1_split),
        Rule(_L + r"mlp\.linear_fc2\.weight", "row"),
        Rule(_L + r"(input_layernorm|pre_mlp_layernorm)\.(weight|bias)", "replicate"),
        Rule(_L + r"(self_attention\.linear_proj|mlp\.linear_fc2)\.bias", "replicate"),
        Rule(r"decoder\.final_layernorm\.(weight|bias)", "replicate", "last"),
        Rule(r"output_layer\.weight", "vocab", "last"),
    )


#: Megatron-core GPT-2/GPT-3 blocks: LayerNorm, biases, fused QKV, GELU MLP.
GPT_RULES = _megatron_rules("column")
#: Megatron-core Llama blocks: RMSNorm, GQA fused QKV, fused SwiGLU gate/up in fc1.
LLAMA_RULES = _megatron_rules("gate_up")


def specs_from_named_tensors(named: Iterable[tuple[str, Sequence[int], str]], rules: Sequence[Rule],
                             dims: AttentionDims) -> list[TensorSpec]:
    """Specs for ``(name, shape, dtype name)`` triples; the first matching rule wins.

    Raises:
        ValueError: a tensor matches no rule (the message names it and how to add one).
    """
    specs = []
    for name, shape, dtype in named:
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is None:
            raise ValueError(f"no layout rule matches parameter {name!r}; add a Rule(pattern, split, where) for it")
        specs.append(TensorSpec(name, tuple(shape), dtype, rule.split_rule(dims), rule.residence(name, dims)))
    return specs


def specs_from_module(module, rules: Sequence[Rule], dims: AttentionDims) -> list[TensorSpec]:
    """Specs for every parameter of ``module`` (build it on the meta device: no memory)."""
    from ..dtypes import name_of

    return specs_from_named_tensors(
        ((n, tuple(p.shape), name_of(p.dtype)) for n, p in module.named_parameters()), rules, dims)
