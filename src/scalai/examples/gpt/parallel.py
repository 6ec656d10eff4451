"""Apply TP, then PP, then DP to the GPT with PyTorch's own APIs (torchtitan's order).

- Mesh: ``init_device_mesh(device, (pp, dp, tp), ("pp", "dp", "tp"))``. Row-major order
  over that shape is scalai's rank order (tp fastest, then dp, then pp), so rank ``r`` of
  the world is rank ``r`` of the :class:`~scalai.config.ParallelConfig`.
- TP (``parallelize_module``): attention ``wq/wk/wv`` and ``fc1`` column-parallel, ``wo``
  and ``fc2`` row-parallel; the token embedding row-wise (vocabulary-parallel: each rank
  holds ``vocab / tp`` rows), the output head column-wise with vocabulary-sharded logits
  (a DTensor ``Shard(-1)``) fed to the loss under ``loss_parallel()``, so no rank ever
  gathers the full logits. Norms, position embedding and row-parallel biases are replicated.
- PP (``torch.distributed.pipelining``): each stage is a :class:`GPTStage` holding its own
  blocks under their global names; GPipe or 1F1B over micro-batches.
- DP: ``zero=0`` replicates parameters and all-reduces gradients (DDP semantics, with the
  FSDP2-based ``replicate`` that accepts TP DTensors, which ``DistributedDataParallel``
  does not); ``zero=1`` shards parameters, gradients and Adam state over the data-parallel
  ranks with FSDP2 ``fully_shard`` (each block, then the stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...config import ParallelConfig
from .model import GPTConfig, GPTStage, init_weights

__all__ = ["StageModel", "build_stage", "meta_stage", "loss_fn", "SCHEDULES"]

SCHEDULES = ("1f1b", "gpipe")


@dataclass
class StageModel:
    """This rank's part of the parallelized model.

    Attributes:
        module: the stage module (parameters are DTensors where TP or DP apply).
        mesh: the world ``DeviceMesh`` with axes ``("pp", "dp", "tp")``.
        stage_index: pipeline stage of this rank.
        is_first / is_last: whether it holds the embeddings / the output head.
        schedule: the pipeline schedule (``None`` when ``pp == 1``).
    """

    module: GPTStage
    mesh: Any
    stage_index: int
    is_first: bool
    is_last: bool
    schedule: Any = None


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``[b, s]`` targets (logits may be vocab-sharded)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))


def _tp_plan(module: GPTStage) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    if module.tok is not None:
        plan["tok"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    for i in module.layers:
        for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.fc1"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.wo", "mlp.fc2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    if module.out is not None:
        plan["out"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def _data_parallel(module: GPTStage, dp_mesh: Any, zero: bool) -> None:
    if zero:
        from torch.distributed.fsdp import fully_shard

        for block in module.layers.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=False)
        return
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError as exc:  # torch releases before the FSDP2-based replicate
        raise ValueError("dp > 1 without zero needs torch's FSDP2-based replicate (torch >= 2.9); "
                         "upgrade torch or use zero=1") from exc
    replicate(module, mesh=dp_mesh)


def preload(layout: ParallelConfig) -> None:
    """Import the parallelism modules ``layout`` uses (about a second of CPU), so that a
    worker waiting for its devices has done it before it builds the model."""
    import importlib

    names = ["torch.distributed.device_mesh"]
    names += ["torch.distributed.tensor.parallel"] if layout.tp > 1 else []
    names += ["torch.distributed.fsdp", "torch.distributed._composable.replicate_with_fsdp"] if layout.dp > 1 else []
    names += ["torch.distributed.pipelining"] if layout.pp > 1 else []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # build_stage says what is missing and what to do


def meta_stage(cfg: GPTConfig, layout: ParallelConfig, device: str = "cpu") -> StageModel:
    """This rank's stage under ``layout``, parallelized as :func:`build_stage` does, with its
    parameters on the meta device (no memory, no values): the shapes and DTensor placements
    of the job's tensors under a layout, e.g. before the devices are free. Collective (the
    mesh's process groups); no pipeline schedule."""
    return _stage(cfg, layout, device, seed=None)


def _stage(cfg: GPTConfig, layout: ParallelConfig, device: str, seed: int | None) -> StageModel:
    """Check ``layout``, make the mesh, build this rank's stage (initialized from ``seed``
    on ``device``; ``None``: on the meta device), apply TP then DP."""
    from torch.distributed.device_mesh import init_device_mesh

    cfg.check_tp(layout.tp)
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(f"layout {layout} needs {layout.world_size} processes, the job has {world}")
    stage_layers = layout.stage_layers(cfg.layers)
    stage_index = layout.coords(dist.get_rank()).pp
    if layout.pp > 1 and any(len(r) == 0 for r in stage_layers):
        raise ValueError(f"stages={'+'.join(str(len(r)) for r in stage_layers)} leaves a stage "
                         f"without layers; give every stage at least one layer")
    mesh = init_device_mesh(device, (layout.pp, layout.dp, layout.tp), mesh_dim_names=("pp", "dp", "tp"))
    first, last = stage_index == 0, stage_index == layout.pp - 1
    if seed is None:
        with torch.device("meta"):
            module = GPTStage(cfg, stage_layers[stage_index], first, last)
    else:
        module = GPTStage(cfg, stage_layers[stage_index], first, last)
        init_weights(module, seed)
        module.to(device)
    if layout.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(module, mesh["tp"], _tp_plan(module))
    if layout.dp > 1:
        _data_parallel(module, mesh["dp"], layout.zero)
    return StageModel(module, mesh, stage_index, first, last)


def build_stage(cfg: GPTConfig, layout: ParallelConfig, *, seed: int, micro_batches: int,
                schedule: str = "1f1b", device: str = "cpu",
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn) -> StageModel:
    """Build, initialize and parallelize this rank's stage of the GPT.

    Args:
        cfg: model sizes.
        layout: the parallel configuration; its world size must be the process group's.
        seed: initialization seed (same values under every layout).
        micro_batches: micro-batches per step of this rank's data-parallel replica.
        schedule: ``"1f1b"`` or ``"gpipe"`` (used when ``pp > 1``).
        loss: the pipeline's loss on one micro-batch, already weighted: the schedule sums
            gradients over micro-batches without rescaling them (``scale_grads=False``).

    Raises:
        ValueError: the layout does not fit the model or the world.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    out = _stage(cfg, layout, device, seed)
    if layout.pp > 1:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(out.module, out.stage_index, layout.pp, torch.device(device),
                              group=out.mesh["pp"].get_group())
        cls: Callable = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        out.schedule = cls(stage, n_microbatches=micro_batches, loss_fn=loss, scale_grads=False)
    return out
