"""The non-tensor half of the job state: step, optimizer counters, scheduler, data, RNG.

Saved as the checkpoint manifest's JSON ``state`` (format of :mod:`scalai.state`)::

    {"step": 20, "seed": 0, "layout": "tp=2,pp=2,dp=1",
     "optimizer": {"step": 20, "param_groups": [{"lr": 0.001, "betas": [0.9, 0.95], ...}]},
     "lr_scheduler": {...},                    # scheduler.state_dict()
     "data": {...},                            # DataState.to_json()
     "rng": {"seed": 0, "layout": "...", "ranks": {"0": {...}, ...}},
     "extra": {...}}                           # the caller's JSON

On load every layout-independent item is restored as is; RNG follows the rule of
:mod:`scalai.state` (restored per rank under the same degrees, re-seeded otherwise). A
state may declare items it never holds (``"absent": {"data": "why", ...}``: a checkpoint
of another framework, see :mod:`scalai.interop.dcp.open`); those stay as the job has them
and the load reports them, where any other missing item is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..state import capture_rng, restore_rng, rng_action, seed_all
from .job import JobState

__all__ = ["optimizer_step", "capture", "restore", "rank_snapshot", "Restored"]


def optimizer_step(job: JobState) -> int | None:
    """Adam's step counter on this rank (the same for every parameter), or ``None``.

    Raises:
        ValueError: parameters disagree (the optimizer stepped some and not others).
    """
    if job.optimizer is None:
        return None
    steps = {int(s["step"]) for s in job.optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"Adam's step counters differ between parameters ({sorted(steps)}); "
                         f"scalai saves one counter per job: step every parameter together")
    return steps.pop() if steps else 0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        value = value.item()  # a tensor-valued lr
    json.dumps(value)
    return value


def _param_groups(job: JobState) -> list[dict[str, Any]]:
    out = []
    for group in job.optimizer.param_groups:
        entry = {}
        for key, value in group.items():
            if key == "params":
                continue
            try:
                entry[key] = _jsonable(value)
            except (TypeError, ValueError):
                continue  # not JSON: left to the caller's construction of the optimizer
        out.append(entry)
    return out


def rank_snapshot(job: JobState) -> dict[str, Any]:
    """What each rank contributes to the saved state: its RNG and optimizer counter."""
    return {"rng": capture_rng(), "optimizer_step": optimizer_step(job)}


def capture(job: JobState, snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON state of the job, from rank 0's view and every rank's snapshot."""
    steps = {s["optimizer_step"] for s in snapshots}
    if len(steps) > 1:
        raise ValueError(f"ranks disagree on Adam's step counter ({sorted(map(str, steps))}); "
                         f"every rank must take every optimizer step")
    state: dict[str, Any] = {
        "step": job.step, "seed": job.seed, "layout": str(job.config),
        "rng": {"seed": job.seed, "layout": str(job.config),
                "ranks": {str(r): s["rng"] for r, s in enumerate(snapshots)}},
        "extra": job.extra,
    }
    if job.optimizer is not None:
        state["optimizer"] = {"step": steps.pop(), "param_groups": _param_groups(job)}
    if job.scheduler is not None:
        state["lr_scheduler"] = job.scheduler.state_dict()
    if job.data is not None:
        state["data"] = job.data.to_json() if hasattr(job.data, "to_json") else job.data
    return state


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` did on one rank.

    Attributes:
        rng: ``"restore"``, ``"seed"`` or ``"none"`` (see :func:`scalai.state.rng_action`).
        restored: the items restored (``step``, ``optimizer.step``, ``optimizer.param_groups``,
            ``lr_scheduler``, ``data``, ``rng``, ``extra``).
        not_restored: item -> why it was left as the job had it (the saved state declares
            it absent: a foreign checkpoint, see ``state["absent"]``; or saved nothing of it).
    """

    rng: str
    restored: tuple[str, ...]
    not_restored: dict[str, str]


def _absent(state: dict[str, Any]) -> dict[str, str]:
    """The items the saved state declares it does not hold, with why (``state["absent"]``)."""
    absent = state.get("absent", {})
    if not isinstance(absent, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in absent.items()):
        raise ValueError("the saved state's 'absent' is not an object of item -> reason; the checkpoint is damaged")
    return absent


def restore(job: JobState, state: dict[str, Any]) -> Restored:
    """Restore the non-tensor state into ``job`` on this rank.

    An item the job has but the state lacks is an error, unless the state declares it
    absent (``state["absent"]``: a checkpoint of another framework, which never holds it):
    the job's own value then stays, and :attr:`Restored.not_restored` says so.

    Raises:
        ValueError: the saved state does not fit the live job (an optimizer without saved
            optimizer state, other parameter groups, a data state of another dataset).
    """
    import torch

    if "step" not in state:
        raise ValueError("the saved state has no 'step'; it was not written by scalai.training.save")
    absent = _absent(state)
    done, left = ["step"], {}
    if job.optimizer is not None:
        saved = state.get("optimizer")
        if saved is None:
            raise ValueError("the checkpoint holds no optimizer state but the job has an optimizer; "
                             "resuming would silently restart Adam from zero")
        if "param_groups" not in saved and "optimizer.param_groups" in absent:
            left["optimizer.param_groups"] = absent["optimizer.param_groups"]
        else:
            groups = saved.get("param_groups", [])
            if len(groups) != len(job.optimizer.param_groups):
                raise ValueError(f"the checkpoint has {len(groups)} optimizer parameter groups, the "
                                 f"job {len(job.optimizer.param_groups)}; build the optimizer the same way")
            for group, values in zip(job.optimizer.param_groups, groups):
                group.update(values)
            done.append("optimizer.param_groups")
        for s in job.optimizer.state.values():
            s["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
        done.append("optimizer.step")
    if job.scheduler is not None:
        if "lr_scheduler" in state:
            job.scheduler.load_state_dict(state["lr_scheduler"])
            done.append("lr_scheduler")
        elif "lr_scheduler" in absent:
            left["lr_scheduler"] = absent["lr_scheduler"]
        else:
            raise ValueError("the checkpoint holds no LR scheduler state but the job has a scheduler")
    if job.data is not None:
        if "data" in state:
            from ..data import DataState

            num_samples = getattr(job.data, "num_samples", None)
            job.data = DataState.from_json(state["data"], num_samples=num_samples)
            done.append("data")
        else:
            left["data"] = absent.get("data", "the checkpoint holds no data position; the job's is left as it is")
    job.step = int(state["step"])
    if "extra" in state:
        job.extra = dict(state.get("extra") or {})
        done.append("extra")
    action, value = rng_action(state, job.config, job.rank)
    if action == "restore":
        restore_rng(value)
    elif action == "seed":
        seed_all(value)
    if action == "none":
        left["rng"] = absent.get("rng", "the checkpoint holds no generator states; the job's are left as they are")
    else:
        done.append("rng")
    return Restored(action, tuple(done), left)
