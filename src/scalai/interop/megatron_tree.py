"""The files and names of a legacy Megatron-LM save (see :mod:`scalai.interop.megatron`).

:func:`find_tree` finds the ``mp_rank_XX[_YYY]/model_optim_rng.pt`` files of one saved
iteration and checks the grid is complete; :func:`legacy_rules` is the rules file of
legacy Megatron-LM GPT models (``language_model.*`` names, every version's spellings made
the newest's by :func:`canonical`), onto scalai's Megatron-core names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping as ABCMapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import CheckpointError
from .rules import ModelDims, Rules, Source, TensorRule

__all__ = ["MegatronTree", "find_tree", "flatten", "canonical", "legacy_rules", "FILE", "LAYER_INDEX"]

_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
LAYER_INDEX = re.compile(r"(?<=\.layers\.)(\d+)(?=\.)")  # a layer number in a name
FILE = "model_optim_rng.pt"


@dataclass(frozen=True)
class MegatronTree:
    """The files of one saved iteration: ``files[(tp_rank, pp_rank)]``."""

    directory: str
    tp: int
    pp: int
    files: dict[tuple[int, int], str] = field(compare=False)
    distributed_optimizer: bool = False


def find_tree(path: str | os.PathLike) -> MegatronTree:
    """The checkpoint under ``path``: a Megatron save root (its latest iteration), an
    iteration directory (``iter_`` and seven digits, e.g. ``iter_0000100``) or ``release``, or any
    directory holding ``mp_rank_*``.

    Raises:
        ValueError: no tree there, or one whose ranks are incomplete (the message says which).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory; give a Megatron-LM save directory "
                         f"(with latest_checkpointed_iteration.txt) or one of its iter_* directories")
    latest = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(latest):
        with open(latest) as f:
            text = f.read().strip()
        sub = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
        if sub is None or not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"{latest} names iteration {text!r}, which has no directory here; "
                             f"give the iter_* directory to import")
        path = os.path.join(path, sub)
    ranks = {}
    for name in sorted(os.listdir(path)):
        m = _RANK_DIR.match(name)
        if m and os.path.isdir(os.path.join(path, name)):
            ranks[(int(m.group(1)), int(m.group(2) or 0))] = (os.path.join(path, name), m.group(2) is not None)
    if not ranks:
        raise ValueError(f"{path} holds no mp_rank_XX or mp_rank_XX_YYY directories; it is not a "
                         f"Megatron-LM checkpoint")
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    if len({staged for _, staged in ranks.values()}) != 1:
        raise ValueError(f"{path} mixes mp_rank_XX and mp_rank_XX_YYY directories; keep one save per directory")
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if missing:
        t, p = missing[0]
        raise ValueError(f"{path} has no mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") +
                         f" of a tp={tp}, pp={pp} save; the checkpoint is incomplete")
    files, distributed = {}, False
    for key, (d, _) in ranks.items():
        f = os.path.join(d, FILE)
        if not os.path.isfile(f):
            raise ValueError(f"{d} has no {FILE}; the checkpoint is incomplete")
        files[key] = f
        distributed |= os.path.isfile(os.path.join(d, "distrib_optim.pt"))
    return MegatronTree(path, tp, pp, files, distributed)


# -- names -----------------------------------------------------------------------------------

def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("a.b.c", tensor)`` for every tensor of a nested dict, in insertion order."""
    import torch

    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, ABCMapping):
            yield from flatten(value, name + ".")
        elif isinstance(value, torch.Tensor):
            yield name, value
        elif value is not None and not name.endswith("_extra_state"):
            raise CheckpointError(f"model entry {name} holds a {type(value).__name__}, not a tensor")


_ALIASES = ((".transformer.", ".encoder."), (".input_layernorm.", ".input_norm."),
            (".post_attention_layernorm.", ".post_attention_norm."), (".final_layernorm.", ".final_norm."))


def canonical(name: str) -> str:
    """Legacy names of every Megatron-LM version as the newest spells them."""
    if name.startswith("language_model."):
        for old, new in _ALIASES:
            name = name.replace(old, new)
    return name


def legacy_rules(dims: ModelDims, swiglu: bool, tied_head_key: bool = True) -> Rules:
    """The rules of legacy Megatron-LM GPT models (``language_model.*`` names)."""
    L, D = "language_model.encoder.layers.{layer}.", "decoder.layers.{layer}."

    def t(name, split, key, where="layer", optional=False):
        return TensorRule(name, split, (Source(key),), where, optional)

    rules = [
        t("embedding.word_embeddings.weight", "vocab", "language_model.embedding.word_embeddings.weight",
          "embedding"),
        t("embedding.position_embeddings.weight", "replicate",
          "language_model.embedding.position_embeddings.weight", "first", True),
    ]
    layer = (("input_layernorm", "input_norm", "replicate", "replicate"),
             ("self_attention.linear_qkv", "self_attention.query_key_value", "qkv", "qkv"),
             ("self_attention.linear_proj", "self_attention.dense", "row", "replicate"),
             ("pre_mlp_layernorm", "post_attention_norm", "replicate", "replicate"),
             ("mlp.linear_fc1", "mlp.dense_h_to_4h", "gate_up" if swiglu else "column",
              "gate_up" if swiglu else "column"),
             ("mlp.linear_fc2", "mlp.dense_4h_to_h", "row", "replicate"))
    for ours, theirs, weight_split, bias_split in layer:  # weight, then bias: model order
        rules.append(t(D + f"{ours}.weight", weight_split, L + f"{theirs}.weight"))
        rules.append(t(D + f"{ours}.bias", bias_split, L + f"{theirs}.bias", optional=True))
    rules.append(t("decoder.final_layernorm.weight", "replicate", "language_model.encoder.final_norm.weight", "last"))
    rules.append(t("decoder.final_layernorm.bias", "replicate", "language_model.encoder.final_norm.bias", "last",
                   True))
    if not dims.tied_embeddings:
        rules.append(t("output_layer.weight", "vocab", "language_model.output_layer.weight", "last"))
    return Rules(dims, tuple(rules), ("word_embeddings_for_head.weight",) if tied_head_key else ())
