"""Named model shapes and their job-state layouts.

:func:`model_specs` derives every tensor of a model's training state (parameters from the
model built on the meta device and a rule table, then fp32 master copies and Adam moments),
and :func:`model_ptc` lays them out under a configuration after checking that the model's
heads, layers and vocabulary allow it.
"""

from __future__ import annotations

from functools import lru_cache

from ..config import ParallelConfig
from ..layout.ptc import PTC
from ..layout.rules import GPT_RULES, LLAMA_RULES, AttentionDims, specs_from_module
from ..layout.spec import TensorSpec, with_optimizer_state
from .shapes import MODELS, ModelShape, get_model_shape

__all__ = ["ModelShape", "MODELS", "get_model_shape", "model_specs", "model_ptc", "attention_dims"]


def attention_dims(shape: ModelShape) -> AttentionDims:
    return AttentionDims(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.ffn_hidden,
                         shape.vocab_multiple, shape.tied_embeddings)


@lru_cache(maxsize=32)
def model_specs(shape: ModelShape, optimizer: bool = True) -> tuple[TensorSpec, ...]:
    """Specs of the model's parameters (and, with ``optimizer``, their Adam state)."""
    from .megatron import build_meta_model

    rules = GPT_RULES if shape.family == "gpt" else LLAMA_RULES
    params = specs_from_module(build_meta_model(shape), rules, attention_dims(shape))
    return tuple(with_optimizer_state(params) if optimizer else params)


def model_ptc(model: str | ModelShape, config: ParallelConfig | str, optimizer: bool = True) -> PTC:
    """The PTC of a named (or given) model under ``config``, validated against the model."""
    shape = get_model_shape(model) if isinstance(model, str) else model
    config = ParallelConfig.parse(config) if isinstance(config, str) else config
    shape.check(config)
    return PTC(config, model_specs(shape, optimizer), shape.num_layers)
