"""Tiny random-initialised ``transformers`` models, made by the tests (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

#: Fixed tokens the logits are compared on.
TOKENS = torch.tensor([[3, 17, 250, 999, 5, 42, 1000, 7], [1, 2, 3, 4, 5, 6, 7, 8]])

# llama-tiny's shape (GQA: 8 query heads, 4 key/value heads), and gpt-tiny's
LLAMA = dict(vocab_size=1100, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
             tie_word_embeddings=False, rms_norm_eps=1e-5)
GPT2 = dict(vocab_size=1100, n_embd=64, n_layer=4, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)


def llama(seed: int = 0, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **changes}))
    return _randomize(model, seed)


def gpt2(seed: int = 0, **changes):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return _randomize(GPT2LMHeadModel(GPT2Config(**{**GPT2, **changes})), seed)


def _randomize(model, seed: int):
    """Every parameter random (norms and biases too: a swapped one must show)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] else 0.0))
    return model.eval()


def save(model, path, shard: str | None = None) -> str:
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), **kw)
    return str(path)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits
