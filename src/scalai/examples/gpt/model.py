"""A GPT decoder whose pipeline stages keep the global layer names.

One :class:`GPTStage` holds a contiguous range of transformer blocks in ``layers``, a
``ModuleDict`` keyed by the blocks' *global* index (``layers.5.attn.wq.weight`` is the same
name on every pipeline degree); the first stage also holds the token and position
embeddings, the last one the final norm and the output head. With one stage it is the
whole model.

Initialization is a pure function of ``(seed, parameter name)``: every tensor draws from
its own generator, so a model built as one stage or cut into any number of stages starts
from the same values, and training trajectories can be compared across layouts.

Shapes: tokens ``int64[batch, seq]``; hidden states ``float32[batch, seq, dim]``; logits
``float32[batch, seq, vocab]``. Dropout is absent on purpose: a run resumed under another
layout must see the same computation (see docs/training.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "PRESETS", "GPTStage", "Block", "init_weights", "preset"]


@dataclass(frozen=True)
class GPTConfig:
    """Model sizes; validated on construction.

    Attributes:
        vocab: vocabulary size (256 for byte-level text).
        dim: model width.
        heads: attention heads (``dim`` must be a multiple).
        layers: transformer blocks.
        seq_len: tokens per sample (positions of the learned position embedding).
        mlp_ratio: MLP hidden width / ``dim``.
    """

    vocab: int = 256
    dim: int = 64
    heads: int = 4
    layers: int = 4
    seq_len: int = 64
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model {f.name}={value!r} must be a positive integer")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not a multiple of heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        return self.dim * self.mlp_ratio

    def check_tp(self, tp: int) -> None:
        """Raise ``ValueError`` unless ``tp`` splits heads, MLP width and vocabulary evenly."""
        bad = [(what, n) for what, n in (("attention heads", self.heads), ("MLP width", self.hidden),
                                         ("vocabulary", self.vocab)) if n % tp]
        if bad:
            options = [d for d in range(1, self.heads + 1)
                       if self.heads % d == 0 and self.hidden % d == 0 and self.vocab % d == 0]
            what = ", ".join(f"{n} {w}" for w, n in bad)
            raise ValueError(f"tp={tp} does not divide the model's {what}; use tp in "
                             f"{{{', '.join(map(str, options))}}}")

    def num_params(self) -> int:
        per_block = 4 * self.dim * self.dim + 3 * self.dim + 2 * self.dim * self.hidden \
            + self.hidden + self.dim + 4 * self.dim
        return (self.vocab + self.seq_len) * self.dim + self.layers * per_block \
            + 2 * self.dim + self.dim * self.vocab


#: Named sizes: ``gpt-tiny`` trains a step in well under a second on one CPU core.
PRESETS: dict[str, GPTConfig] = {
    "gpt-tiny": GPTConfig(vocab=256, dim=64, heads=4, layers=4, seq_len=64),
    "gpt-small": GPTConfig(vocab=256, dim=128, heads=8, layers=8, seq_len=128),
    "gpt-bench": GPTConfig(vocab=256, dim=512, heads=8, layers=8, seq_len=128),
}


def preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}") from None


class Attention(nn.Module):
    """Causal multi-head self-attention. Under tensor parallelism ``wq``/``wk``/``wv`` are
    column-parallel (each rank computes ``heads / tp`` heads) and ``wo`` row-parallel; the
    code is the same, only the local head count differs (hence ``view(..., -1, head_dim)``)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        # No key bias: it adds q.b to every score of a row, which softmax ignores, so its
        # exact gradient is zero and Adam would turn rounding noise into steps of size lr.
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))  # [b, local heads, s, head_dim]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden)  # column-parallel under TP
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)  # row-parallel under TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPTStage(nn.Module):
    """Blocks ``layer_ids`` of a GPT; embeddings if ``first``, norm and head if ``last``.

    ``forward`` takes tokens ``int64[b, s]`` on the first stage and hidden states
    ``float32[b, s, dim]`` elsewhere; returns logits ``[b, s, vocab]`` on the last stage
    and hidden states otherwise.
    """

    def __init__(self, cfg: GPTConfig, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim) if first else None
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim) if first else None
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in layer_ids})
        self.norm = nn.LayerNorm(cfg.dim) if last else None
        self.out = nn.Linear(cfg.dim, cfg.vocab, bias=False) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok is not None:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.tok(x) + self.pos(positions)
        for block in self.layers.values():
            x = block(x)
        if self.out is not None:
            x = self.out(self.norm(x))
        return x


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@torch.no_grad()
def init_weights(stage: GPTStage, seed: int) -> None:
    """GPT-2 initialization, each tensor from its own ``(seed, name)`` generator.

    Linear and embedding weights ~ N(0, 0.02), residual output projections (``wo``,
    ``fc2``) scaled by ``1/sqrt(2 * layers)``; biases 0; norms 1 and 0. Call it before
    parallelizing (on full tensors).
    """
    residual_std = 0.02 / math.sqrt(2 * stage.cfg.layers)
    for name, p in stage.named_parameters():
        if "norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            std = residual_std if name.endswith(("wo.weight", "fc2.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=_generator(seed, name)) * std)
