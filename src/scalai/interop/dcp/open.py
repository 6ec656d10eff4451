"""A DCP directory opened as a :class:`~scalai.interop.dcp.source.DcpSource`, with the
non-tensor state it can give.

:func:`open_dcp` is the one way in: ``scalai import dcp``, ``scalai reshard DCP_DIR``,
``scalai inspect DCP_DIR`` and ``scalai.training.load(job, DCP_DIR)`` all read a DCP
checkpoint through it. Without rules the tensors keep their own names (``model.`` taken
off: a live job described from the same modules has the same names, and Adam's
``optim.state.<fqn>.exp_avg`` is scalai's ``optimizer.exp_avg.<fqn>``); with rules (or a
scalai ``model``) they are named and split as the rules say.

What a DCP checkpoint holds besides tensors is not scalai's non-tensor state. The source's
``state`` (:func:`dcp_state`) therefore says, for each item, what it could give and what not:

- ``step``: Adam's step count (the largest of the parameters' ``step`` entries, 0 without);
- ``optimizer``: ``{"step": ...}`` when the checkpoint holds Adam moments that map;
- ``absent``: what it does not hold in a form scalai reads, and why (data position, RNG,
  LR scheduler, parameter groups): :func:`scalai.training.load` leaves those as the job has
  them and lists them in its report, instead of failing or silently restarting them.
"""

from __future__ import annotations

import os
from math import prod
from typing import Any

import numpy as np

from ...dtypes import itemsize
from ..rules import Rules
from .layout import dcp_layout, model_rules
from .metadata import read_index
from .source import DcpSource

__all__ = ["open_dcp", "dcp_state", "dcp_step", "dcp_summary", "ABSENT"]

#: What a DCP checkpoint never gives scalai, and what happens instead (``state["absent"]``).
ABSENT = {
    "data": "a DCP checkpoint holds no scalai data position; the job's is left as it is",
    "rng": "a DCP checkpoint holds no generator states; the job's generators are left as they are",
    "lr_scheduler": "a DCP checkpoint's LR scheduler state is not read; the job's scheduler is left as it is",
    "optimizer.param_groups": "DCP's parameter groups (lr, betas, ...) are not read; the job's own settings apply",
}


def open_dcp(path: str | os.PathLike, *, rules: Rules | None = None, model: str | None = None) -> DcpSource:
    """The DCP checkpoint in directory ``path`` as a source (close it, or use ``with``).

    Args:
        rules: how its keys map onto scalai's tensors and split (see docs/interop.md); or
        model: a scalai model it holds under scalai's own names (``scalai export dcp``);
            neither: its tensors under their own names, not laid out for any other layout
            (enough to inspect it, or to load it into a live job whose PTC is the target).

    Raises:
        ValueError: both ``rules`` and ``model``; rules that do not fit the checkpoint.
        CheckpointError: a missing, damaged or hostile ``.metadata`` or data file.
    """
    if rules is not None and model is not None:
        raise ValueError("give either rules (--rules FILE) or a scalai model (--model M), not both")
    index = read_index(path)
    layout = dcp_layout(index, model_rules(model) if model is not None else rules)
    source = DcpSource(path, index, layout)
    try:
        source.state.update(dcp_state(source, model))
    except BaseException:
        source.close()
        raise
    return source


def dcp_state(source: DcpSource, model: str | None = None) -> dict[str, Any]:
    """The non-tensor state of a DCP checkpoint, in scalai's format (see the module docstring)."""
    step = dcp_step(source)
    state: dict[str, Any] = {
        "step": step,
        "imported": {"from": "dcp", "directory": os.path.abspath(source.directory),
                     "unmapped": dict(sorted(source.layout.unmapped.items()))},
        "absent": dict(ABSENT),
    }
    if any(s.is_optimizer_state for s in source.ptc.specs):
        state["optimizer"] = {"step": step}
    if model is not None:
        state["model"] = model
    return state


def dcp_step(source: DcpSource) -> int:
    """Adam's step count: the largest of the parameters' ``step`` entries (0 if none).

    Raises:
        ValueError: a ``step`` entry that is not a number.
    """
    steps = []
    for key in source.layout.keys.steps.values():
        if key in source.index.tensors:
            dtype = source.index.tensors[key].dtype
            if dtype not in ("float32", "float64", "int64", "int32"):
                raise ValueError(f"{key} in {source.directory} is a {dtype} tensor, not a step count")
            value = source.tensor_value(key).view(np.dtype(dtype)).item()
        else:
            value = source.object_value(key)
        try:
            steps.append(int(float(value)))
        except (TypeError, ValueError):
            raise ValueError(f"{key} in {source.directory} is {value!r}, not a step count") from None
    return max(steps, default=0)


def dcp_summary(source: DcpSource, tensors: bool = False) -> dict[str, Any]:
    """What ``scalai inspect DCP_DIR`` shows: the checkpoint's tensors, chunks, dtypes and
    bytes, the roles of its keys (``parameter``, ``optimizer``, ``step``: Adam's step count,
    ``other``), and what each maps to (the scalai tensor the source's rules, or its own name,
    give; ``null`` for what nothing takes, with why in ``unmapped``).
    ``tensors``: list every tensor."""
    index, layout = source.index, source.layout
    keys = layout.keys
    nbytes = {k: prod(t.shape) * itemsize(t.dtype) for k, t in index.tensors.items()}
    info: dict[str, Any] = {
        "checkpoint": os.path.abspath(source.directory),
        "format": "pytorch-dcp",
        "version": index.version,
        "files": len(index.files()),
        "tensors": len(index.tensors),
        "chunks": sum(len(t.chunks) for t in index.tensors.values()),
        "objects": len(index.objects),
        "bytes": sum(nbytes.values()),
        "parameters": len(keys.params),
        "optimizer_tensors": len(keys.states),
        "step": source.state.get("step"),
        "scalai_tensors": len(source.ptc.specs),
        "laid_out": source.ptc.target is not None,
        "unmapped": dict(sorted(layout.unmapped.items())),
    }
    if source.ptc.target is not None:
        info["num_layers"] = source.ptc.target[1]
    if tensors:
        roles = {**{k: "parameter" for k in keys.params.values()}, **{k: "optimizer" for k in keys.states.values()},
                 **{k: "step" for k in keys.steps.values()}}
        info["tensor_list"] = [
            {"key": k, "shape": list(t.shape), "dtype": t.dtype, "chunks": len(t.chunks), "bytes": nbytes[k],
             "role": roles.get(k, "other"), "maps_to": layout.mapped.get(k)} for k, t in index.tensors.items()]
    return info
