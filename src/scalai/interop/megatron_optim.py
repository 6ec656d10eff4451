"""Megatron-LM's optimizer state, by parameter index, under scalai's names.

torch's ``Optimizer.state_dict`` numbers a rank's parameters group after group, each group
in the order its parameters were given; Megatron-LM builds two groups from the model's
parameters in model order: those with weight decay (2-d and larger, not biases) and those
without (biases, norms). Which saved group is which comes from ``wd_mult`` or
``weight_decay`` where they tell, else from the shapes of the state saved for each index.
Masters (``fp32_from_fp16_params``, saved by the fp16/bf16 optimizer) are listed per group
in the same order; the fp32 optimizer saves torch's state dict alone.
"""

from __future__ import annotations

from collections.abc import Mapping as ABCMapping
from typing import Any, Callable

from ..layout.spec import optimizer_tensor_name

__all__ = ["adam_state"]


def adam_state(path: str, saved: ABCMapping, order: list[tuple[str, Any]],
               has_master: Callable[[str], bool]) -> tuple[dict[str, Any], dict]:
    """The Adam moments (and fp32 masters of the parameters ``has_master`` names) of one
    file, as ``{scalai optimizer tensor: torch tensor}``, and Adam's step and per-group
    hyperparameters (JSON).

    Args:
        saved: the file's ``optimizer`` entry.
        order: ``(scalai parameter, its local tensor)`` in model order.

    Raises:
        ValueError: the state is not torch's, its groups do not match Megatron's, or a
            state's shape or dtype is not its parameter's (the message says to import the
            weights alone).
    """
    inner = saved.get("optimizer", saved)  # Float16Optimizer wraps torch's; FP32Optimizer is torch's
    if not isinstance(inner, ABCMapping) or "state" not in inner or "param_groups" not in inner:
        raise ValueError(f"{path}: 'optimizer' is not a torch optimizer state dict; pass --weights-only "
                         f"to import the weights")
    groups = inner["param_groups"]
    masters = saved.get("fp32_from_fp16_params")
    members = _assign_groups(order, groups, inner["state"], path)
    out = {}
    for g, (group, names) in enumerate(zip(groups, members)):
        for pos, (index, (name, param)) in enumerate(zip(group["params"], names)):
            s = inner["state"].get(index)
            if s is None or "exp_avg" not in s or "exp_avg_sq" not in s:
                raise ValueError(f"{path}: no Adam state for parameter {index} ({name}); pass "
                                 f"--weights-only to import the weights")
            for state in ("exp_avg", "exp_avg_sq"):
                out[optimizer_tensor_name(state, name)] = _fp32(s[state], param, path, name)
            if has_master(name):
                if masters is None:
                    raise ValueError(f"{path}: {name} is not fp32 but the file holds no "
                                     f"fp32_from_fp16_params (masters); pass --weights-only")
                out[optimizer_tensor_name("master", name)] = _fp32(masters[g][pos], param, path, name)
    return out, _hyperparameters(inner)


def _fp32(tensor, param, path: str, name: str):
    import torch

    if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != torch.float32:
        raise ValueError(f"{path}: optimizer state of {name} is {tensor.dtype}{list(tensor.shape)}, expected "
                         f"float32{list(param.shape)}; the optimizer's parameter order is not Megatron's")
    return tensor


def _hyperparameters(inner: ABCMapping) -> dict:
    """Adam's step and each group's hyperparameters (what JSON holds), as scalai's training
    state keeps them."""
    steps = [s["step"] for s in inner["state"].values() if "step" in s]
    step = steps[0] if steps else inner["param_groups"][0].get("step", 0)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
               if k != "params" and isinstance(v, (int, float, str, bool, tuple, list))}
              for g in inner["param_groups"]]
    return {"step": int(step), "param_groups": groups}


def _assign_groups(order, groups, state, path: str) -> list[list[tuple[str, Any]]]:
    """The parameters of each optimizer group, in model order: Megatron's groups are
    weight-decayed (2-d and larger, not biases) and not (biases, norms: 1-d); which group
    is which comes from ``wd_mult`` or ``weight_decay`` where they tell, else from the
    shapes of the state saved for each index."""
    decay = [(n, t) for n, t in order if t.ndim > 1 and not n.endswith(".bias")]
    no_decay = [(n, t) for n, t in order if not (t.ndim > 1 and not n.endswith(".bias"))]
    if len(groups) == 1:
        candidates = [[order]]
    elif len(groups) == 2:
        candidates = [[decay, no_decay], [no_decay, decay]]
        hints = [g.get("wd_mult", None) for g in groups]
        if None in hints:
            hints = [g.get("weight_decay", None) for g in groups]
        if None not in hints and hints[0] != hints[1]:
            candidates = [candidates[0] if hints[0] > hints[1] else candidates[1]]
    else:
        raise ValueError(f"{path}: the optimizer has {len(groups)} parameter groups; scalai reads Megatron's "
                         f"two (weight decay and none), or pass --weights-only")

    def fits(assignment) -> bool:
        for group, members in zip(groups, assignment):
            if len(group["params"]) != len(members):
                return False
            for index, (_, tensor) in zip(group["params"], members):
                s = state.get(index, {})
                if "exp_avg" in s and tuple(s["exp_avg"].shape) != tuple(tensor.shape):
                    return False
        return True

    fitting = [a for a in candidates if fits(a)]
    if not fitting:
        sizes = [len(g["params"]) for g in groups]
        raise ValueError(f"{path}: the optimizer's groups ({sizes} parameters) do not match the model's "
                         f"{len(order)} parameters in Megatron's order; pass --weights-only to import the weights")
    return fitting[0]
