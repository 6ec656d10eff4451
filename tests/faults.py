"""Faults injected into a training process from outside its code, for tests: a data source
that silently reads the wrong rows, and a worker killed in the middle of a step.

Both key on the optimizer step the process is running (:func:`step_counter`: 1 for the
first step this process runs, counted by a global optimizer hook), so they work with any
training script built on a torch optimizer.
"""

from __future__ import annotations

import os
import signal


def step_counter() -> dict:
    """``{"step": n}``: the step this process runs now (1-based), advanced after every
    optimizer step; ``"calls"`` counts module forwards within it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    state = {"step": 1, "calls": 0}

    def stepped(optimizer, args, kwargs):
        state["step"], state["calls"] = state["step"] + 1, 0

    register_optimizer_step_post_hook(stepped)
    return state


def faulty_reads(faults: dict[int, str], state: dict) -> None:
    """Make ``scalai.data``'s loader read wrong rows in the steps of ``faults``, silently
    (each row still comes with the id of what was read, as a real reader's would):
    ``"twice"``: a micro-batch's second row re-reads its first sample (the neighbour is never
    read); ``"skip"``: its last row is not read."""
    from scalai.data import torch_api

    read = torch_api._IdsAndTokens.__getitems__

    def faulty(self, samples):
        fault = faults.get(state["step"])
        if fault == "twice":
            samples = [samples[0], samples[0], *samples[2:]]
        elif fault == "skip":
            samples = samples[:-1]
        return read(self, samples)

    torch_api._IdsAndTokens.__getitems__ = faulty


def kill_mid_step(phases: dict[int, str], state: dict) -> None:
    """``SIGKILL`` this process in the steps of ``phases``: in the middle of the forward pass
    (``"forward"``: at the step's third module forward) or of the backward pass
    (``"backward"``: when the gradient reaches that module's output)."""
    import torch
    from torch.nn.modules.module import register_module_forward_hook

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def forward(module, args, output):
        phase = phases.get(state["step"])
        if phase is None:
            return
        state["calls"] += 1
        if state["calls"] != 3:
            return
        if phase == "forward":
            die()
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(die)

    register_module_forward_hook(forward)
