"""The live job state: a parallelized model, its optimizer, and the PTC read from them.

:func:`describe` is called once, on every rank, after the model is parallelized. It reads
the layout from the model itself, never from a per-model table: each rank derives tensor
specs from its stage module's DTensor placements (:func:`~scalai.layout.dtensor.specs_from_module`;
layers named ``layers.<i>.`` keep their global index, which gives their pipeline
residence), the ranks exchange them (one ``all_gather_object``), and the union over all
stages becomes the job's :class:`~scalai.layout.ptc.PTC` under the running configuration.
Adam's ``exp_avg``/``exp_avg_sq`` follow each parameter (``optimizer.exp_avg.<param>``).

The :class:`JobState` then maps every tensor of this rank's part of the PTC to the live
local ``torch.Tensor`` that holds it (``DTensor.to_local()`` for parameters and their
Adam moments), so that :func:`~scalai.training.save` and :func:`~scalai.training.load`
read and write the training tensors in place.

It finds the parameters through references taken when the job was described, not through
the modules' attributes: during forward and backward FSDP2 (``fully_shard``, and the
FSDP2-based ``replicate``) swaps each module's parameters for unsharded copies, and only
puts the sharded ones (those the optimizer updates and keys its state by) back after the
step's last gather. A survivor that dumps its shards after a peer died in the middle of a
step must still find them; reading them from the references touches no collective and no
FSDP state, so it works whatever phase the failed collective left FSDP2 in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..config import ParallelConfig
from ..layout.dtensor import specs_from_module
from ..layout.ptc import PTC, LayoutError
from ..layout.spec import Residence, TensorSpec, with_optimizer_state
from .collective import agree, gather, world

__all__ = ["JobState", "describe", "ADAM_STATES"]

#: Optimizer state tensors saved per parameter (torch Adam / AdamW names).
ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class JobState:
    """Everything a training job must keep across a change of layout, on one rank.

    Build it with :func:`describe`. The training loop updates :attr:`step` and
    :attr:`data` after every optimizer step; :func:`~scalai.training.load` sets them.

    Attributes:
        config: the running parallel configuration.
        ptc: every tensor of the job (parameters, Adam moments) laid out under ``config``.
        modules: this rank's model part(s) (one pipeline stage each).
        optimizer: a torch Adam/AdamW over those parameters (or ``None``).
        scheduler: an LR scheduler with a JSON-able ``state_dict`` (or ``None``).
        step: optimizer steps done.
        data: the dataset position (:class:`scalai.data.DataState`) or ``None``.
        seed: the job's seed (for the RNG rule on a change of layout).
        extra: any JSON-able state of the caller, saved and restored as is.
        group: the process group of the job (``None``: the default group).
        params: ``{name: parameter}`` as the modules held them when the job was described
            (set by :func:`describe`; ``None``: read the modules at every call). These stay
            the optimizer's parameters while FSDP2 swaps the modules' attributes mid-step.
    """

    config: ParallelConfig
    ptc: PTC
    modules: tuple[Any, ...]
    optimizer: Any = None
    scheduler: Any = None
    step: int = 0
    data: Any = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    group: Any = None
    params: dict[str, Any] | None = None

    @property
    def rank(self) -> int:
        return world(self.group)[0]

    def parameters(self) -> dict[str, Any]:
        """``{name: parameter}`` of this rank's modules (names as in the PTC): the references
        :func:`describe` took (valid in any phase of an FSDP2 step), else the modules' own."""
        if self.params is not None:
            return dict(self.params)
        out: dict[str, Any] = {}
        for module in self.modules:
            for name, p in module.named_parameters():
                out.setdefault(name, p)
        return out

    def local_tensors(self) -> dict[str, Any]:
        """``{tensor name: live local torch.Tensor}`` for every tensor this rank stores.

        Parameters and Adam moments are given as their local shards (``to_local()``),
        views of the storage that training updates; writing into them changes the model.

        Raises:
            LayoutError: a live tensor is missing or its local shape is not the one the
                PTC gives this rank (the model was changed after :func:`describe`).
        """
        params = self.parameters()
        state = self.optimizer.state if self.optimizer is not None else {}
        out: dict[str, Any] = {}
        for name, shard in self.ptc.rank_shards(self.rank):
            spec = self.ptc.spec(name)
            if spec.param is None:
                tensor = params.get(name)
            else:
                p = params.get(spec.param)
                tensor = state.get(p, {}).get(spec.state) if p is not None else None
            if tensor is None:
                raise LayoutError(f"rank {self.rank} has no live tensor for {name}; call "
                                  f"describe() again after changing the model or optimizer")
            local = _local(tensor)
            if str(local.dtype).removeprefix("torch.") != spec.dtype:
                raise LayoutError(f"{name} on rank {self.rank} is {local.dtype}, the job state "
                                  f"records torch.{spec.dtype}")
            if tuple(local.shape) != shard.shape:
                raise LayoutError(f"{name} on rank {self.rank} has local shape {list(local.shape)}, "
                                  f"the layout {self.config} gives it {list(shard.shape)}")
            out[name] = local
        return out


def _local(tensor: Any) -> Any:
    to_local = getattr(tensor, "to_local", None)
    return (to_local() if to_local is not None else tensor).detach()


def _materialize_adam_state(optimizer: Any) -> None:
    """Create zero Adam moments for parameters that have none yet (before the first step).

    Torch creates them lazily on the first ``step()``; a job that loads state before
    training needs them to exist so they can be filled in place. Zero moments and
    ``step = 0`` are exactly what Adam's first step would create.
    """
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for key in ADAM_STATES:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            missing = [k for k in ADAM_STATES if k not in state]
            if missing:
                raise ValueError(f"optimizer {type(optimizer).__name__} keeps no {missing} per "
                                 f"parameter; scalai.training handles Adam and AdamW")


def _merge_specs(per_rank: list[list[dict]]) -> list[TensorSpec]:
    """Union of every rank's parameter specs, in rank order; the same name must agree."""
    merged: dict[str, tuple[int, dict]] = {}
    for rank, specs in enumerate(per_rank):
        for obj in specs:
            seen = merged.get(obj["name"])
            if seen is None:
                merged[obj["name"]] = (rank, obj)
            elif seen[1] != obj:
                raise LayoutError(f"{obj['name']} is described differently on rank {seen[0]} "
                                  f"({json.dumps(seen[1])}) and rank {rank} ({json.dumps(obj)}); "
                                  f"parallelize every rank's stage the same way")
    return [TensorSpec.from_json(obj) for _, obj in merged.values()]


def _check_residence(ptc: PTC, per_rank_names: list[list[str]]) -> None:
    """Every rank must hold exactly the parameters the PTC places on its stage."""
    for rank, names in enumerate(per_rank_names):
        expected = {n for n, _ in ptc.rank_shards(rank) if not ptc.spec(n).is_optimizer_state}
        if set(names) != expected:
            extra, missing = sorted(set(names) - expected), sorted(expected - set(names))
            raise LayoutError(
                f"rank {rank} (stage {ptc.config.coords(rank).pp}) holds parameters the layout "
                f"{ptc.config} does not place there (extra {extra[:3]}, missing {missing[:3]}); "
                f"build stage s from the layers config.stage_layers(num_layers)[s]")


def describe(modules: Any, optimizer: Any, config: ParallelConfig | str, *, num_layers: int,
             scheduler: Any = None, data: Any = None, step: int = 0, seed: int = 0,
             extra: Mapping[str, Any] | None = None,
             residence_of: Callable[[str], Residence | None] | None = None,
             group: Any = None) -> JobState:
    """Describe the live job; collective (every rank of ``group`` calls it, after parallelizing
    and between steps: FSDP2's parameters are then the sharded ones).

    Args:
        modules: this rank's stage module, or a list of them.
        optimizer: torch Adam or AdamW over their parameters (``None``: parameters only).
            Missing Adam moments are created as zeros, as the first step would.
        config: the running configuration; its world size must be the group's.
        num_layers: transformer layers of the whole model.
        scheduler, data, step, seed, extra: see :class:`JobState`.
        residence_of: name -> pipeline residence, overriding the defaults of
            :func:`~scalai.layout.dtensor.specs_from_module`.

    Raises:
        CollectiveError: on every rank, if the layout cannot be read or does not match
            ``config`` on any rank (the message names the rank and the tensor).
    """
    config = ParallelConfig.parse(config) if isinstance(config, str) else config
    modules = tuple(modules) if isinstance(modules, (list, tuple)) else (modules,)

    def local_specs() -> tuple[list[dict], list[str]]:
        rank, size = world(group)
        if size != config.world_size:
            raise ValueError(f"layout {config} has {config.world_size} ranks but the process "
                             f"group has {size}; launch tp*pp*dp processes")
        if optimizer is not None:
            _materialize_adam_state(optimizer)
        specs: list[TensorSpec] = []
        for module in modules:
            specs.extend(specs_from_module(module, residence_of=residence_of))
        return [s.to_json() for s in specs], [s.name for s in specs]

    mine = agree("describe: read the layout of the model", local_specs, group)
    everyone = gather(mine, group)

    def build() -> PTC:
        params = _merge_specs([specs for specs, _ in everyone])
        specs: Iterable[TensorSpec] = with_optimizer_state(params, ADAM_STATES) if optimizer else params
        ptc = PTC(config, specs, num_layers)
        _check_residence(ptc, [names for _, names in everyone])
        return ptc

    ptc = agree("describe: build the job's PTC", build, group)
    job = JobState(config=config, ptc=ptc, modules=modules, optimizer=optimizer, scheduler=scheduler,
                   step=int(step), data=data, seed=int(seed), extra=dict(extra or {}), group=group)
    job.params = job.parameters()  # at rest: FSDP2's sharded parameters, which the optimizer holds
    agree("describe: match live tensors to the layout", job.local_tensors, group)
    return job

