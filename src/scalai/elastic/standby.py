"""A standby worker: a started Python with torch imported, waiting for its assignment.

Starting a worker costs seconds before it does anything useful (the interpreter, torch,
the trainer's modules: 3-9 s here, more with CUDA). An agent therefore keeps one started
process per device (:class:`~.machine.StandbyPool`), each running this module::

    python -m scalai.elastic.standby TRAINER_JSON [--background]

It imports torch, ``torch.distributed`` and what the trainer plug-in warms
(:meth:`~.trainer.Trainer.warm`: the reference trainer imports its model, training loop
and every parallelism module), says ``ready`` on stdout (a pipe to the agent), then
blocks reading one line from stdin: the assignment
``{"module", "argv", "env", "cwd", "log"}``. It then becomes that worker: output to
``log``, the environment updated (``RANK``, ``MASTER_ADDR``, ``SCALAI_*``...: read by
torch and the script only from here on), ``python -m module argv`` run as ``__main__``. A
used standby is replaced by the agent in the background. A user's module itself is not
imported ahead (a script without an ``if __name__ == "__main__"`` guard would run), only
torch and its distributed package.

With ``--background`` (a replacement started while the machine trains) the imports run in a
thread of the lowest CPU priority (Linux: a thread's own nice value, 19), so on a busy
machine they take only idle CPU time from the training and the stores, and on one with
idle cores they finish as fast as ever. The priority is the importing thread's alone (and
that of the threads it starts, e.g. its own OpenMP pool, idle afterwards): the main thread
keeps its priority and runs the worker, and every thread the worker starts inherits that.
An unprivileged process cannot raise a priority it lowered, which is why the imports get a
thread of their own; and why a standby assigned before its imports are done does not wait
for that thread (a worker would then wait on imports at the lowest priority): it starts
again at once as a plain standby (``exec``), which imports at normal priority and takes
the assignment waiting on its stdin.

The standby dies with its agent (Linux parent-death signal), assigned or not; end of
input (the agent closed the pipe) ends it quietly.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time

__all__ = ["main", "assignment", "in_background"]

#: The nice value of a background standby's importing thread (the lowest priority).
BACKGROUND_NICE = 19


def assignment(module: str, argv, env: dict, cwd: str, log: str) -> bytes:
    """The line an agent writes to a standby's stdin (pure)."""
    task = {"module": module, "argv": list(argv), "env": dict(env), "cwd": cwd, "log": log}
    return (json.dumps(task) + "\n").encode()


def in_background(work) -> threading.Thread:
    """Start ``work()`` in a thread of its own at :data:`BACKGROUND_NICE`; the calling
    thread's priority is left as it was. A priority that cannot be lowered (not Linux)
    leaves the work at the caller's."""
    def lowered():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except (OSError, AttributeError):
            pass
        work()

    thread = threading.Thread(target=lowered, name="scalai-standby-warm", daemon=True)
    thread.start()
    return thread


def _warm_unless_assigned(spec: dict) -> None:
    """Warm up in the background; if the assignment (or the end of input) arrives first,
    become a plain standby at once (``exec``: a fresh interpreter at this thread's normal
    priority, the assignment still unread on stdin)."""
    import select

    thread = in_background(lambda: _warm(spec))
    while thread.is_alive():
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.1)
        if ready:
            sys.stdout.flush(), sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", "scalai.elastic.standby", json.dumps(spec)])


def _warm(spec: dict) -> None:
    import torch  # noqa: F401 - the point of a standby
    import torch.distributed  # noqa: F401

    if spec:
        try:
            from .trainer import load_trainer

            load_trainer(spec).warm()
        except Exception as exc:  # noqa: BLE001 - a warm-up is an optimization; the worker will say what fails
            print(f"scalai standby: warming {spec.get('module')} failed ({exc}); continuing", file=sys.stderr)


def main(argv=None) -> int:
    from .worker import die_with_parent

    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    background = "--background" in args
    args = [a for a in args if a != "--background"]
    spec = json.loads(args[0]) if args else {}
    if background:
        _warm_unless_assigned(spec)
    else:
        _warm(spec)
    try:
        sys.stdout.write("ready\n")  # to the agent (a pipe until the assignment)
        sys.stdout.flush()
    except OSError:
        pass  # the agent took this standby before it was warm, and stopped listening
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    task = json.loads(line)
    fd = os.open(task["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.update(task["env"])
    os.environ["SCALAI_ASSIGNED_AT"] = repr(time.time())
    os.chdir(task["cwd"])
    sys.argv = [task["module"], *task["argv"]]
    runpy.run_module(task["module"], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
