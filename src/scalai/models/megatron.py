"""Single-device reference transformers with Megatron-core parameter names.

These modules exist so that layouts can be derived from a real model (built on the meta
device, no memory) plus a name-pattern rule table, exactly as for a user's model. They
also run: the fused QKV weight holds ``[Q; K; V]`` in that order (all query heads, then
key heads, then value heads) and the fused SwiGLU ``linear_fc1`` holds ``[gate; up]``,
the global order the split rules assume. They compute what their Hugging Face
counterparts compute (:func:`scalai.interop.hf_models.hf_config`): rotary embeddings on
pairs ``(i, i + head_dim/2)`` (Megatron-core's default), GELU with the tanh approximation
(GPT-2's ``gelu_new``), norms with epsilon 1e-5.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..dtypes import torch_dtype
from .shapes import ModelShape

__all__ = ["MegatronGPT", "build_meta_model"]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Attention(nn.Module):
    def __init__(self, shape: ModelShape, bias: bool):
        super().__init__()
        hd, nq, nkv = shape.head_dim, shape.num_heads, shape.num_kv_heads
        self.linear_qkv = nn.Linear(shape.hidden, (nq + 2 * nkv) * hd, bias=bias)
        self.linear_proj = nn.Linear(nq * hd, shape.hidden, bias=bias)
        self.nq, self.nkv, self.hd = nq, nkv, hd

    def forward(self, x, rope):
        b, t, _ = x.shape
        q, k, v = self.linear_qkv(x).split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q, k, v = (z.view(b, t, -1, self.hd).transpose(1, 2) for z in (q, k, v))
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nq != self.nkv)
        return self.linear_proj(out.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, shape: ModelShape, gated: bool, bias: bool):
        super().__init__()
        width = 2 * shape.ffn_hidden if gated else shape.ffn_hidden
        self.linear_fc1 = nn.Linear(shape.hidden, width, bias=bias)
        self.linear_fc2 = nn.Linear(shape.ffn_hidden, shape.hidden, bias=bias)
        self.gated = gated

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.linear_fc2(h)


class _Layer(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        gpt = shape.family == "gpt"
        norm = (lambda: nn.LayerNorm(shape.hidden)) if gpt else (lambda: _RMSNorm(shape.hidden))
        self.input_layernorm = norm()
        self.self_attention = _Attention(shape, bias=gpt)
        self.pre_mlp_layernorm = norm()
        self.mlp = _MLP(shape, gated=not gpt, bias=gpt)

    def forward(self, x, rope):
        x = x + self.self_attention(self.input_layernorm(x), rope)
        return x + self.mlp(self.pre_mlp_layernorm(x))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """``nn.Embedding`` initialized as torch does, except on the meta device, where it is
    not initialized at all (``normal_`` on meta imports the compiler stack: 1-2 s of start-up
    for every command that only needs the model's shapes)."""
    weight = torch.empty(rows, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)


class _Embedding(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.word_embeddings = _embedding(shape.vocab_size, shape.hidden)
        if shape.family == "gpt":
            self.position_embeddings = _embedding(shape.max_seq_len, shape.hidden)


class _Decoder(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(shape) for _ in range(shape.num_layers))
        self.final_layernorm = nn.LayerNorm(shape.hidden) if shape.family == "gpt" else _RMSNorm(shape.hidden)


class MegatronGPT(nn.Module):
    """GPT (``family="gpt"``) or Llama-style (``family="llama"``) decoder, Megatron names."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.embedding = _Embedding(shape)
        self.decoder = _Decoder(shape)
        if not shape.tied_embeddings:
            self.output_layer = nn.Linear(shape.hidden, shape.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` for token ids ``[batch, seq]``."""
        x = self.embedding.word_embeddings(tokens)
        rope = None
        if self.shape.family == "gpt":
            x = x + self.embedding.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        else:
            rope = _rotary(tokens.shape[1], self.shape.head_dim, x.device)
        for layer in self.decoder.layers:
            x = layer(x, rope)
        x = self.decoder.final_layernorm(x)
        head = self.embedding.word_embeddings.weight if self.shape.tied_embeddings else self.output_layer.weight
        return x @ head.t()


def _rotary(seq: int, dim: int, device):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    cos, sin = angles.cos(), angles.sin()

    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)

    def apply(x):  # rotate_half: pairs (i, i + dim/2), Megatron-core's and Hugging Face's default
        x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
        return (x * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)

    return apply


def build_meta_model(shape: ModelShape) -> MegatronGPT:
    """The model on the meta device (shapes only, no memory), in the shape's dtype."""
    with torch.device("meta"):
        model = MegatronGPT(shape)
    return model.to(torch_dtype(shape.dtype))

