"""Named model shapes: the published sizes of GPT-2/GPT-3 and small test models.

A :class:`ModelShape` holds what the layout needs to know about a transformer: layer
count, widths, heads, vocabulary. It validates a parallel configuration against the model
with errors that name the model's own quantities ("tp=3 does not divide 16 attention
heads").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ParallelConfig
from ..layout.splits import padded_vocab

__all__ = ["ModelShape", "MODELS", "get_model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape.

    Attributes:
        family: ``"gpt"`` (LayerNorm with bias, learned positions, GELU MLP, biases) or
            ``"llama"`` (RMSNorm, rotary positions, SwiGLU MLP with fused gate/up, no biases).
        num_layers, hidden, num_heads, num_kv_heads, ffn_hidden: the usual sizes;
            ``num_kv_heads < num_heads`` is grouped-query attention.
        vocab_size: real vocabulary (rows of the embedding before padding).
        max_seq_len: positions (learned position embedding rows for ``gpt``).
        tied_embeddings: the output head reuses the input embedding.
        vocab_multiple: Megatron's ``make_vocab_size_divisible_by``.
        dtype: parameter dtype; optimizer state is fp32.
    """

    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    tied_embeddings: bool
    vocab_multiple: int = 128
    dtype: str = "bfloat16"
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.family not in ("gpt", "llama"):
            raise ValueError(f"model family {self.family!r} is unknown; use 'gpt' or 'llama'")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab(self.vocab_size, self.vocab_multiple, tp)

    def check(self, config: ParallelConfig) -> None:
        """Raise ``ValueError`` naming the first model quantity that ``config`` cannot split."""
        tp = config.tp
        for count, what in ((self.num_heads, "attention heads"), (self.num_kv_heads, "key/value heads"),
                            (self.ffn_hidden, "MLP columns")):
            if count % tp:
                options = [d for d in range(1, count + 1) if count % d == 0 and d <= 64]
                raise ValueError(
                    f"tp={tp} does not divide {count} {what} of {self.name}; "
                    f"use tp in {{{', '.join(map(str, options))}}}")
        config.stage_layers(self.num_layers)  # raises with its own advice

    @property
    def num_params(self) -> int:
        """Parameters without vocabulary padding."""
        h, f, kv = self.hidden, self.ffn_hidden, self.num_kv_heads * self.head_dim
        attn = h * (h + 2 * kv) + h * h
        if self.family == "gpt":
            per_layer = attn + (h + 2 * kv) + h + 2 * h * f + f + h + 4 * h
            extra = self.max_seq_len * h + 2 * h
        else:
            per_layer = attn + 3 * h * f + 2 * h
            extra = h
        head = 0 if self.tied_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + extra


def _gpt(name, layers, hidden, heads, seq=2048, vocab=50257, **kw) -> ModelShape:
    return ModelShape("gpt", layers, hidden, heads, heads, 4 * hidden, vocab, seq, True, name=name, **kw)


#: Built-in shapes. GPT-3 sizes follow the GPT-3 paper (1.3B uses 16 heads of 128, as
#: Megatron-LM's GPT-3 scripts do, since the paper's 24 heads do not divide 2048).
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("gpt", 4, 64, 4, 4, 256, 1100, 128, True, name="gpt-tiny"),
        ModelShape("llama", 4, 64, 8, 4, 192, 1100, 128, False, name="llama-tiny"),
        _gpt("gpt2-small", 12, 768, 12, seq=1024),
        _gpt("gpt3-1.3b", 24, 2048, 16),
        _gpt("gpt3-2.7b", 32, 2560, 32),
        _gpt("gpt3-6.7b", 32, 4096, 32),
        _gpt("gpt3-175b", 96, 12288, 96),
    )
}


def get_model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
