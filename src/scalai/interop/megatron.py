"""Megatron-LM legacy checkpoints: ``mp_rank_XX[_YYY]/model_optim_rng.pt`` trees.

The tree, as Megatron-LM's ``checkpointing.py`` writes it (one file per tensor-parallel
rank ``XX`` and pipeline stage ``YYY``, saved by data-parallel rank 0)::

    ROOT/latest_checkpointed_iteration.txt              "1000" (or "release")
    ROOT/iter_0001000/mp_rank_00/model_optim_rng.pt       pp = 1
    ROOT/iter_0001000/mp_rank_00_000/model_optim_rng.pt   pp > 1: stage after the tp rank

and each file (the keys scalai reads; ``args`` is the run's ``argparse.Namespace``)::

    {"args": ..., "checkpoint_version": 3.0, "iteration": 1000,
     "model": {"language_model": {
                  "embedding": {"word_embeddings": {"weight"}, "position_embeddings": {"weight"}},
                  "encoder": {"layers.0.input_norm.weight", ..., "final_norm.weight"},
                  "output_layer": {"weight"}},                    # untied head, last stage
               "word_embeddings_for_head": {"weight"}},           # tied head, last stage, pp > 1
     "optimizer": {"optimizer": {"state": {0: {"exp_avg", "exp_avg_sq", "step"}, ...},
                                 "param_groups": [{"params": [0, 1, ...], "lr", ...}, ...]},
                   "fp32_from_fp16_params": [[...], [...]]},      # masters, per group
     "opt_param_scheduler": {...}, "rng_state": [...]}

Layer keys count from 0 on every stage; a stage's offset is the layer count of the stages
before it (read from the files, so uneven pipelines work). Every local tensor is stored
exactly as scalai lays it out (:mod:`scalai.layout.splits`): QKV per query group
``[q_g, k_g, v_g]``, SwiGLU ``[gate_r; up_r]``, vocabulary rows padded to
``make_vocab_size_divisible_by * tp`` (every rank holds its rows, padding included), so
each file's tensors are the local tensors of one rank of ``tp=XX,pp=YYY,dp=1``; the source
checks that, tensor by tensor, before anything is copied.

Optimizer state is by parameter index (:mod:`scalai.interop.megatron_optim`); the tree's
files and names are found by :mod:`scalai.interop.megatron_tree`.

Files are read by :func:`~scalai.interop.unpickle.load_pt` (no code from the file runs)
and memory-mapped: a tensor's bytes are read when it is copied.
"""

from __future__ import annotations

import os
from collections.abc import Mapping as ABCMapping
from dataclasses import dataclass, replace
from typing import Any

from ..config import ParallelConfig
from ..errors import CheckpointError
from ..layout.ptc import PTC
from ..layout.spec import with_optimizer_state
from .mapping import Foreign, resolve
from .megatron_optim import adam_state
from .megatron_tree import LAYER_INDEX, MegatronTree, canonical, find_tree, flatten, legacy_rules
from .rules import ModelDims, Rules, TensorRule
from .unpickle import load_pt

__all__ = ["MegatronTree", "find_tree", "MegatronCheckpoint", "open_megatron", "legacy_rules"]


def _dims(args: Any, tree: MegatronTree, vocab_size: int | None, where: str) -> tuple[ModelDims, bool]:
    """Model dimensions from the run's arguments."""
    def arg(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    if arg("tensor_model_parallel_size", 1) != tree.tp or arg("pipeline_model_parallel_size", 1) != tree.pp:
        raise ValueError(f"{where}: its args say tp={arg('tensor_model_parallel_size')}, "
                         f"pp={arg('pipeline_model_parallel_size')}, the tree holds tp={tree.tp}, pp={tree.pp}; "
                         f"the directory mixes saves")
    if arg("virtual_pipeline_model_parallel_size") not in (None, 1):
        raise ValueError(f"{where} was saved with virtual pipeline stages (model0, model1, ...), which scalai "
                         f"does not read; convert it to one chunk per stage with Megatron's tools first")
    heads = arg("num_attention_heads")
    hidden = arg("hidden_size")
    if not heads or not hidden or not arg("num_layers"):
        raise ValueError(f"{where}: its args lack num_layers, hidden_size or num_attention_heads")
    padded = arg("padded_vocab_size")
    if vocab_size is not None and padded is not None and vocab_size > padded:
        raise ValueError(f"--vocab-size {vocab_size} is larger than the checkpoint's padded vocabulary ({padded})")
    dims = ModelDims(
        num_layers=arg("num_layers"), num_heads=heads,
        num_kv_heads=arg("num_query_groups") if arg("group_query_attention") else heads,
        head_dim=arg("kv_channels") or hidden // heads,
        ffn_hidden=arg("ffn_hidden_size") or 4 * hidden,
        vocab_size=vocab_size or padded, vocab_multiple=arg("make_vocab_size_divisible_by", 128),
        tied_embeddings=not arg("untie_embeddings_and_output_weights", False))
    return dims, bool(arg("swiglu", False))


def _jsonable(args: Any) -> dict:
    """The run's arguments that JSON can hold (dtypes as their names)."""
    import json

    out = {}
    for key, value in sorted(vars(args).items()):
        if type(value).__module__ == "torch":
            value = str(value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


@dataclass
class _RankFile:
    """One loaded file: its parameters (canonical names, local layer indices, model order)
    and its optimizer state."""

    path: str
    obj: dict
    params: list[tuple[str, Any]]

    @classmethod
    def load(cls, path: str) -> _RankFile:
        obj = load_pt(path)
        if not isinstance(obj, dict) or "model" not in obj:
            raise CheckpointError(f"{path} holds no 'model'; it is not a Megatron-LM checkpoint file")
        model = obj["model"]
        if not isinstance(model, ABCMapping):
            raise CheckpointError(f"{path}: 'model' is a {type(model).__name__}, not a state dict")
        if "model0" in model or "model1" in model:
            raise ValueError(f"{path} holds virtual pipeline chunks (model0, model1, ...); scalai reads one "
                             f"chunk per stage")
        version = obj.get("checkpoint_version", 0)
        if not isinstance(version, (int, float)) or version < 2:
            raise ValueError(f"{path} has checkpoint_version {version!r}: before 2.0 Megatron-LM kept QKV in "
                             f"another order; convert it with Megatron-LM's own tools first")
        params = [(canonical(n), t) for n, t in flatten(model)]
        return cls(path, obj, params)

    def layers(self) -> list[int]:
        return sorted({int(m.group(1)) for n, _ in self.params for m in [LAYER_INDEX.search(n)] if m})


@dataclass
class MegatronCheckpoint:
    """A Megatron-LM tree opened as the layout it was saved in.

    Attributes:
        ptc: ``tp=XX,pp=YYY,dp=1`` (uneven stages as the files hold them), scalai's names.
        state: the non-tensor state for a scalai checkpoint (``step`` = the iteration,
            Adam's step and hyperparameters, and the source under ``imported``).
        arrays: ``{rank: {scalai tensor: torch tensor}}``, each rank's file loaded (memory
            mapped) when first asked for; ranks count as scalai's (tp fastest, then stage).
    """

    tree: MegatronTree
    ptc: PTC
    state: dict
    arrays: ABCMapping


def open_megatron(path: str | os.PathLike, vocab_size: int | None = None, weights_only: bool = False,
                  rules: Rules | None = None) -> MegatronCheckpoint:
    """Open the Megatron-LM checkpoint under ``path`` (see :func:`find_tree`).

    Args:
        vocab_size: the tokenizer's vocabulary (Megatron saves only the padded one, which
            is used when this is ``None``; the padding rows then count as vocabulary).
        weights_only: leave the optimizer state out (needed for a distributed optimizer,
            which keeps it in ``distrib_optim.pt`` files that scalai does not read).
        rules: other names than legacy Megatron-LM's (a rules file); model dimensions it
            leaves out come from the run's arguments.

    Raises:
        ValueError: not a tree scalai can read, or files that disagree with each other or
            with the layout their arguments describe (the message names file and tensor).
        CheckpointError: an unreadable file, or one that needs code to load.
    """
    tree = find_tree(path)
    if tree.distributed_optimizer and not weights_only:
        raise ValueError(f"{tree.directory} was saved with --use-distributed-optimizer (distrib_optim.pt), "
                         f"whose optimizer state scalai does not read; pass --weights-only to import the weights")
    stages = [_RankFile.load(tree.files[(0, p)]) for p in range(tree.pp)]
    first = stages[0].obj
    if "args" not in first:
        raise ValueError(f"{stages[0].path} has no 'args'; scalai needs the run's arguments for the model's sizes")
    dims, swiglu = _dims(first["args"], tree, vocab_size, stages[0].path)
    if rules is None:
        rules = legacy_rules(dims, swiglu)
    else:
        rules = replace(rules, dims=replace(dims, **rules.dims.to_json()))
    counts = [len(s.layers()) for s in stages]
    if any(s.layers() != list(range(n)) for s, n in zip(stages, counts)):
        raise ValueError(f"the layers of {tree.directory} are not numbered 0..n-1 on every stage")
    offsets = [sum(counts[:p]) for p in range(tree.pp)]
    if sum(counts) != rules.dims.num_layers:
        raise ValueError(f"the stages hold {sum(counts)} layers, the args say {rules.dims.num_layers}")
    config = ParallelConfig(tree.tp, tree.pp, 1,
                            layers_per_stage=None if len(set(counts)) == 1 else tuple(counts))
    optimizer = not weights_only and isinstance(first.get("optimizer"), ABCMapping)
    table = {}
    for p, stage in enumerate(stages):
        for name, tensor in stage.params:
            key = _global_name(name, offsets[p])
            rule = rules.rule_for(key)
            table.setdefault(key, Foreign(_global_shape(tuple(tensor.shape), rule, tree.tp),
                                          str(tensor.dtype).removeprefix("torch.")))
    params = resolve(rules, table, states=())
    if any(len(m.parts) != 1 or m.parts[0].transpose for m in params.tensors):
        raise ValueError("rules for a Megatron-LM tree map each stored tensor to one scalai tensor as it is "
                         "(no parts, no transposes): Megatron stores tensors fused and in scalai's layout")

    specs = with_optimizer_state(params.specs) if optimizer else list(params.specs)
    ptc = PTC(config, specs, params.num_layers)
    arrays = _Arrays(tree, ptc, params, offsets, {(0, p): s for p, s in enumerate(stages)}, optimizer)
    state = {"step": int(first.get("iteration", 0)),
             "imported": {"from": "megatron-lm", "directory": os.path.abspath(tree.directory),
                          "iteration": int(first.get("iteration", 0)),
                          "checkpoint_version": float(first.get("checkpoint_version", 0)),
                          "args": _jsonable(first["args"])}}
    for rank in range(config.world_size):  # every file checked before anything is copied
        arrays[rank]
    if optimizer:
        state["optimizer"] = arrays.hyperparameters
    return MegatronCheckpoint(tree, ptc, state, arrays)


def _global_name(name: str, offset: int) -> str:
    return LAYER_INDEX.sub(lambda m: str(int(m.group(1)) + offset), name, count=1)


def _global_shape(shape: tuple[int, ...], rule: TensorRule | None, tp: int) -> tuple[int, ...]:
    """The global shape of a tensor whose tp-rank-0 shard has ``shape`` under ``rule``."""
    if rule is None or rule.split == "replicate" or not shape:
        return shape
    dim = 1 if rule.split == "row" else 0
    return tuple(s * tp if d == dim else s for d, s in enumerate(shape))


class _Arrays(ABCMapping):
    """``{rank: {scalai tensor: torch tensor}}``: a rank's file loaded on first use."""

    def __init__(self, tree: MegatronTree, ptc: PTC, params, offsets: list[int],
                 loaded: dict[tuple[int, int], _RankFile], optimizer: bool):
        self.tree, self.ptc, self.params, self.offsets, self.optimizer = tree, ptc, params, offsets, optimizer
        self._files = dict(loaded)
        self._ranks: dict[int, dict[str, Any]] = {}
        self._by_foreign = {p.key: m.spec.name for m in params.tensors for p in m.parts}
        self._tied = any(s.residence.kind == "tied" for s in params.specs)
        #: Adam's step and per-group hyperparameters (JSON), from the first file read
        self.hyperparameters: dict = {}

    def __len__(self) -> int:
        return self.ptc.config.world_size

    def __iter__(self):
        return iter(range(len(self)))

    def __getitem__(self, rank: int) -> dict[str, Any]:
        out = self._ranks.get(rank)
        if out is None:
            out = self._ranks[rank] = self._load(rank)
        return out

    def _load(self, rank: int) -> dict[str, Any]:
        c = self.ptc.config.coords(rank)
        key = (c.tp, c.pp)
        f = self._files.get(key) or _RankFile.load(self.tree.files[key])
        self._files.pop(key, None)  # keep only the mapped tensors
        tied_copy = self._tied and c.pp == self.ptc.config.pp - 1 and c.pp > 0
        out: dict[str, Any] = {}
        order: list[tuple[str, Any]] = []  # (scalai name, tensor) in model order: optimizer indices
        for name, tensor in f.params:
            key_ = _global_name(name, self.offsets[c.pp])
            if tied_copy and key_ == "word_embeddings_for_head.weight":  # the last stage's copy
                ours = "embedding.word_embeddings.weight"
            else:
                ours = self._by_foreign.get(key_)
            if ours is None:
                continue
            if ours in out:
                raise ValueError(f"{f.path} holds {ours} twice ({key_})")
            out[ours] = tensor
            order.append((ours, tensor))
        self._check(rank, f.path, out)
        if self.optimizer:
            state, hyper = adam_state(f.path, f.obj["optimizer"], order,
                                      lambda name: self.ptc.spec(name).dtype != "float32")
            out.update(state)
            self.hyperparameters = self.hyperparameters or hyper
        return out

    def _check(self, rank: int, path: str, got: dict[str, Any]) -> None:
        want = {n: s.shape for n, s in self.ptc.rank_shards(rank) if not self.ptc.spec(n).is_optimizer_state}
        if set(got) != set(want):
            diff = sorted(set(got) ^ set(want))
            raise ValueError(f"{path} holds other tensors than rank {rank} of {self.ptc.config} has "
                             f"(e.g. {diff[0]}); the files disagree with their args")
        for name, tensor in got.items():
            if tuple(tensor.shape) != tuple(want[name]):
                raise ValueError(f"{path}: {name} has shape {list(tensor.shape)}, scalai's layout "
                                 f"{self.ptc.config} gives it {list(want[name])}; the file is not laid out "
                                 f"as Megatron-LM lays out this model")
