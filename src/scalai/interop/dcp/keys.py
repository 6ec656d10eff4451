"""What the keys of a DCP state dict are: model parameters, optimizer state, the rest.

DCP flattens a nested state dict into dotted keys. The usual shapes:

- ``dcp.save({"model": model_sd, "optim": optim_sd})`` with
  ``torch.distributed.checkpoint.state_dict.get_state_dict``: ``model.<fqn>``,
  ``optim.state.<fqn>.exp_avg``, ``optim.state.<fqn>.step``, ``optim.param_groups.0.lr``;
- torchtitan: parameters at the top level (``<fqn>``), ``optimizer.state.<fqn>.exp_avg``,
  ``optimizer.param_groups.<fqn>.lr`` (one entry per parameter), ``lr_scheduler...``,
  ``dataloader...``, ``train_state``.

:func:`classify` sorts keys into parameters, optimizer tensors that follow a parameter,
Adam's step counters and parameter-group settings; everything else is listed as not
mapped. The prefixes are found from the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["Classified", "classify", "OPTIMIZER_PREFIXES", "MODEL_PREFIX"]

#: Where the optimizer state dict usually sits (first found wins).
OPTIMIZER_PREFIXES = ("optim.", "optimizer.")
#: Where the model state dict usually sits; without it, top-level tensors are parameters.
MODEL_PREFIX = "model."


@dataclass
class Classified:
    """The keys of one DCP checkpoint by role.

    Attributes:
        model_prefix, optimizer_prefix: the prefixes in use (``""``/``None`` if none).
        params: parameter name -> key (``model.w`` -> ``w`` keyed by ``"w"``).
        states: (parameter name, state name) -> key of an optimizer tensor.
        steps: parameter name -> key of its optimizer step counter.
        groups: (group id, setting) -> key of a parameter-group setting (``lr``, ``betas``);
            the group id is the group's index, or the parameter's name for per-parameter
            (flattened) groups.
        other: keys with no role in a scalai job (scheduler, data loader, ...).
    """

    model_prefix: str
    optimizer_prefix: str | None
    params: dict[str, str] = field(default_factory=dict)
    states: dict[tuple[str, str], str] = field(default_factory=dict)
    steps: dict[str, str] = field(default_factory=dict)
    groups: dict[tuple[str, str], str] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)


def classify(tensor_keys: Iterable[str], object_keys: Iterable[str]) -> Classified:
    """Sort the keys of a DCP checkpoint (tensors and non-tensor values) by role. Pure."""
    tensor_keys, object_keys = list(tensor_keys), list(object_keys)
    everything = tensor_keys + object_keys
    opt = next((p for p in OPTIMIZER_PREFIXES if any(k.startswith(p + "state.") for k in everything)), None)
    model = MODEL_PREFIX if any(k.startswith(MODEL_PREFIX) for k in tensor_keys) else ""
    out = Classified(model, opt)
    for key in tensor_keys:
        if opt is not None and key.startswith(opt + "state."):
            fqn, _, state = key[len(opt) + len("state."):].rpartition(".")
            if not fqn:
                out.other.append(key)
            elif state == "step":
                out.steps[fqn] = key
            else:
                out.states[(fqn, state)] = key
        elif key.startswith(model) and (model or not _under(key, opt)):
            out.params[key[len(model):]] = key
        else:
            out.other.append(key)
    for key in object_keys:
        if opt is not None and key.startswith(opt + "param_groups."):
            group, _, setting = key[len(opt) + len("param_groups."):].rpartition(".")
            if group:
                out.groups[(group, setting)] = key
                continue
        if opt is not None and key.startswith(opt + "state.") and key.endswith(".step"):
            out.steps[key[len(opt) + len("state."):-len(".step")]] = key  # a step kept as a number
            continue
        out.other.append(key)
    return out


def _under(key: str, prefix: str | None) -> bool:
    return prefix is not None and key.startswith(prefix)
