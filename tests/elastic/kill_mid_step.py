"""A training script of one's own for ``scalai run --module kill_mid_step``: it runs another
training module as ``__main__`` (``SCALAI_TEST_TARGET``; default the reference trainer,
``scalai.examples.gpt``) with the same arguments, and kills its own worker with ``SIGKILL``
in the middle of a step, where ``SCALAI_TEST_KILL`` says so.

``SCALAI_TEST_KILL`` is a comma-separated list of ``GEN:RANK:NTH:PHASE``: in generation
``GEN``, rank ``RANK`` dies during the ``NTH`` optimizer step that generation runs (1 is its
first), in the middle of the forward pass (``forward``: at the third module forward of the
step) or of the backward pass (``backward``: when the gradient reaches that module's output).
Its peers then find a collective failing wherever they are in that step.
"""

import os
import runpy
import signal


def _arm() -> None:
    import torch
    from torch.nn.modules.module import register_module_forward_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    plan = [item.split(":") for item in os.environ.get("SCALAI_TEST_KILL", "").split(",") if item]
    here = (os.environ.get("SCALAI_GENERATION"), os.environ.get("RANK"))
    mine = {int(nth): phase for gen, rank, nth, phase in plan if (gen, rank) == here}
    if not mine:
        return
    state = {"step": 1, "calls": 0}  # the step this generation runs now, module calls in it

    def stepped(optimizer, args, kwargs):
        state["step"], state["calls"] = state["step"] + 1, 0

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def forward(module, args, output):
        phase = mine.get(state["step"])
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

    register_optimizer_step_post_hook(stepped)
    register_module_forward_hook(forward)


if __name__ == "__main__":
    _arm()
    runpy.run_module(os.environ.get("SCALAI_TEST_TARGET", "scalai.examples.gpt"), run_name="__main__",
                     alter_sys=True)
