"""One rank of the PyTorch baseline, under torchrun (started by :mod:`.dcp_side`).

What a careful PyTorch user's training script does, on the reference trainer's model and
training step (so that both sides follow the same trajectory):

- ``--role old`` at layout A: train; every K steps (``--commit-every``) an asynchronous
  checkpoint, ``dcp.async_save`` of ``get_state_dict(model, optimizer)`` plus the
  non-tensor state (step, data position, LR schedule) to ``DIR/periodic/step-N``
  (``FileSystemWriter(sync_files=True)``, on its own gloo group, waiting for the previous
  one first, as torchtitan does); stop after step S (scheduled) or after the step during
  which ``DIR/stop`` appeared (checked every step with one all-reduce, as
  :class:`scalai.training.StopFlag` does); then ``dcp.save`` of the same state to
  ``DIR/change`` and leave.
- ``--role new`` at layout B: import torch and the parallelism modules it uses, join the
  process group (the rendezvous), build the model parallelized on the meta device (as
  torchtitan does before materializing it), then wait for ``DIR/free`` (the old workers have exited: on GPUs their memory is free)
  before building the model and its optimizer state, ``dcp.load`` (resharding) +
  ``set_state_dict``, and train to the job's last step.

With ``--storage URL`` (``s3://BUCKET/PREFIX``, simulated machines) the checkpoints go
there instead of ``DIR/periodic`` and ``DIR/change``, through DCP's fsspec storage
(``FsspecWriter``/``FsspecReader`` over s3fs, the same thread count); ``--timeout S`` is the
process group's timeout from the first step on (what a careful user shortens so that a dead
peer is noticed; torch's default before, while processes start and load, as torchtitan does).
``--trigger kill`` (a machine is killed mid-step; the driver runs the old role under an
elastic torchrun, ``--nnodes MIN:MAX --max-restarts 3``): the old role trains to the job's
last step; a rank whose step fails (its collective broke or timed out) writes
``DIR/failed-RANK.json`` and exits with an error; the workers torchrun restarts with the
survivors (a world smaller than A's: :func:`recovering`) run at ``--layout-after``: they
build, load the newest complete periodic checkpoint, train to the last step and write
``DIR/recovered.json``.

Rank 0 appends one JSON line per step to ``DIR/rows.jsonl`` (``step``, ``loss``, ``time``:
after the step's loss all-reduce and optimizer step, as the reference trainer logs) and
writes the marks of each role (``old-pids.json``, ``saved.json``, ``new.json``); a mark
is the slowest rank's unless said otherwise.
"""

from __future__ import annotations

import time

_PROCESS_START = time.time()  # before anything else is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _timeout(args):
    """The process group's timeout (``--timeout``; torch's default without it)."""
    from datetime import timedelta

    return timedelta(seconds=args.timeout) if args.timeout else None


def _shorten_timeout(args) -> None:
    """After the first step: the training group's timeout becomes ``--timeout`` (torchtitan's
    pattern: torch's long default while processes start, build and load from the network,
    where a peer may be slower by many seconds, then the short one that notices a dead
    peer; with the short one from the start, restarted workers timed out waiting for a
    peer's load from S3 and torchrun ran out of restarts)."""
    if args.timeout:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(_timeout(args))


def _options(args, layout: str):
    from scalai.examples.gpt.options import TrainOptions

    return TrainOptions(layout=layout, steps=args.steps, model=args.model, data=args.data, seed=args.seed,
                        global_batch=args.global_batch, micro_batch=args.micro_batch, lr=args.lr)


def _state(run) -> dict:
    """What goes through DCP: model and optimizer (``get_state_dict``; it creates Adam's
    moments if the optimizer has none yet) and the non-tensor state a job needs to continue
    its trajectory (DCP stores those values pickled)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(run.stage.module, run.optimizer)
    extra = {"step": run.job.step, "data": dataclasses.asdict(run.job.data),
             "scheduler": run.scheduler.state_dict()}
    return {"model": model_sd, "optim": optim_sd, "extra": extra}


def _reduce(marks: dict[str, float], op: str = "max") -> dict[str, float]:
    """Each mark's latest (or earliest) value over the ranks."""
    import torch
    import torch.distributed as dist

    box = torch.tensor(list(marks.values()), dtype=torch.float64)
    if op == "min":
        box = -box
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return dict(zip(marks, (-box if op == "min" else box).tolist()))


def _write(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _row(args, step: int, loss: float, when: float, layout: str) -> None:
    with open(Path(args.dir) / "rows.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": loss, "time": when, "layout": layout}) + "\n")


def _stop_requested(path: Path) -> bool:
    """Whether any rank sees the stop file (the same answer everywhere: one all-reduce)."""
    import torch
    import torch.distributed as dist

    box = torch.tensor([int(path.exists())], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def _where(args, name: str):
    """Where checkpoint ``name`` (``periodic/step-N``, ``change``) goes: a directory in DIR, or
    under ``--storage``."""
    return f"{args.storage.rstrip('/')}/{name}" if args.storage else Path(args.dir) / name


def _writer(path, args, sync: bool):
    if args.storage:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(str(path), sync_files=False, thread_count=args.threads)
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(str(path), sync_files=sync, thread_count=args.threads)


def _reader(path, args):
    if args.storage:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(str(path))
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path))


def _newest_periodic(args) -> str | None:
    """The newest periodic checkpoint whose metadata (written last) is there; None if none
    is complete (then the job starts again from its first step, as a user's script does)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{args.storage.rstrip('/')}/periodic")
    fs.invalidate_cache()
    done = sorted(p for p in fs.ls(root, detail=False) if fs.exists(f"{p}/.metadata")) if fs.exists(root) else []
    return f"{args.storage.rstrip('/')}/periodic/{done[-1].rstrip('/').rsplit('/', 1)[-1]}" if done else None


def old(args) -> None:
    """Layout A: train, checkpoint asynchronously every K steps, save at the change, leave."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from scalai.data import TokenDataset
    from scalai.examples.gpt.train import build, step

    folder, rank = Path(args.dir), dist.get_rank()
    run = build(_options(args, args.layout))
    dataset = TokenDataset(run.index)
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    if rank == 0:
        _write(folder / "old-pids.json", pids)
    group = (dist.new_group(backend="gloo") if args.commit_every
             else None)  # async saves off the training group
    last = args.at_step if args.trigger == "schedule" else args.steps
    pending, periodic, shortened = None, [], False
    while run.job.step < last:
        try:
            loss = step(run, dataset)
            if not shortened:
                _shorten_timeout(args)
                shortened = True
        except Exception:  # a peer died: this rank's mark of noticing it, then torchrun restarts the job
            _write(folder / f"failed-{rank}.json", {"time": time.time(), "step": run.job.step})
            raise
        if rank == 0:
            _row(args, run.job.step, loss, time.time(), args.layout)
        n = run.job.step
        if args.commit_every and n % args.commit_every == 0 and n < last:
            t0 = time.time()
            if pending is not None:
                pending.result()
            pending = dcp.async_save(_state(run), storage_writer=_writer(_where(args, f"periodic/step-{n:06d}"),
                                                                         args, True), process_group=group)
            periodic.append({"step": n, "blocked": time.time() - t0})
        if args.trigger == "request" and _stop_requested(folder / "stop"):
            break
    start = time.time()
    if pending is not None:
        pending.result()
    waited = time.time()
    dcp.save(_state(run), storage_writer=_writer(_where(args, "change"), args, args.change_fsync))
    dist.barrier()
    marks = {**_reduce({"save_start": start}, "min"), **_reduce({"async_waited": waited, "save_end": time.time()})}
    if rank == 0:
        _write(folder / "saved.json", {"step": run.job.step, "marks": marks, "periodic": periodic})


def _load(run, state: dict, path, args) -> None:
    """``dcp.load`` of checkpoint ``path`` into ``state`` (``_state(run)``: placeholders) and
    from there into ``run`` (resharding), with the non-tensor state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from scalai.data import DataState

    dcp.load(state, storage_reader=_reader(path, args))
    set_state_dict(run.stage.module, run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = state["extra"]
    run.job.step, run.job.data = extra["step"], DataState(**extra["data"])
    run.scheduler.load_state_dict(extra["scheduler"])


def _train_on(run, args) -> float | None:
    """Steps to the job's last (at least one); the first one's end."""
    import torch.distributed as dist

    from scalai.data import TokenDataset
    from scalai.examples.gpt.train import step

    dataset, first = TokenDataset(run.index), None
    while first is None or run.job.step < args.steps:  # to the job's last step, as scalai's workers do
        loss = step(run, dataset)
        if first is None:
            first = time.time()
            _shorten_timeout(args)
        if dist.get_rank() == 0:
            _row(args, run.job.step, loss, time.time(), args.layout)
    return first


def recovered(args, joined: float) -> None:
    """Restarted by torchrun after a machine died, with the survivors at ``--layout-after``:
    build, load the newest complete periodic checkpoint (resharding), train on."""
    import torch.distributed as dist

    from scalai.examples.gpt.train import build

    args.layout = args.layout_after
    run = build(_options(args, args.layout))
    state = _state(run)  # placeholders (Adam's moments allocated here), replaced by the saved values
    built = time.time()
    path = _newest_periodic(args)
    if path is not None:
        _load(run, state, path, args)
    loaded, at = time.time(), run.job.step
    first = _train_on(run, args)
    marks = _reduce({"start": _PROCESS_START, "joined": joined, "built": built, "loaded": loaded})
    if dist.get_rank() == 0:
        _write(Path(args.dir) / "recovered.json", {"step": at, "marks": marks, "first": first, "from": path or "",
                                                   "layout": args.layout})


def new(args, joined: float) -> None:
    """Layout B: wait for the devices, build, load the checkpoint (resharding), train on."""
    import torch.distributed as dist

    from scalai.config import ParallelConfig
    from scalai.examples.gpt.model import preset
    from scalai.examples.gpt.parallel import meta_stage, preload
    from scalai.examples.gpt.train import build

    folder, layout = Path(args.dir), ParallelConfig.parse(args.layout)
    preload(layout)  # the parallelism modules, imported while waiting (as scalai's workers do)
    # The model parallelized on the meta device while waiting, as torchtitan builds it
    # before materializing it: the one-time set-up of these code paths is paid here, as
    # scalai's workers pay it describing the new layout. (The reference trainer then
    # builds on the device from scratch; the values come from the checkpoint anyway.)
    meta_stage(preset(args.model), layout)
    waiting = time.time()
    while not (folder / "free").exists():
        time.sleep(0.02)
    devices = time.time()
    run = build(_options(args, args.layout))
    model = time.time()
    state = _state(run)  # placeholders (Adam's moments allocated here), replaced by the saved values
    built = time.time()
    _load(run, state, _where(args, "change"), args)
    loaded = time.time()
    first = _train_on(run, args)
    marks = _reduce({"start": _PROCESS_START, "joined": joined, "waiting": waiting, "devices": devices,
                     "model": model, "built": built, "loaded": loaded})
    if dist.get_rank() == 0:
        _write(folder / "new.json", {"step": run.job.step, "marks": marks, "first": first})


def recovering(trigger: str, world: int, layout: str) -> bool:
    """Whether a worker in a world of ``world`` processes is one torchrun restarted with the
    survivors of a killed machine (pure): its world is smaller than ``layout``'s (A), as a
    user's script derives its parallelism from ``WORLD_SIZE``. Not from
    ``TORCHELASTIC_RESTART_COUNT``: each agent counts only its own restarts after a failure,
    so a survivor that restarts its workers because the other joined the new round (a
    membership change) passes 0 (in a 3 x 2 run those workers started at A, failed, and
    cost one more restart)."""
    from scalai.config import ParallelConfig

    return trigger == "kill" and world < ParallelConfig.parse(layout).world_size


def main() -> None:
    import warnings

    import torch
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description="one rank of the DCP + torchrun baseline")
    parser.add_argument("--role", choices=["old", "new"], required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layout", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--at-step", type=int, required=True)
    parser.add_argument("--trigger", choices=["schedule", "request", "kill"], required=True)
    parser.add_argument("--layout-after", default=None, help="--trigger kill: the survivors' layout")
    parser.add_argument("--storage", default=None, help="checkpoints under this URL (s3://BUCKET/PREFIX)")
    parser.add_argument("--timeout", type=float, default=None, help="the process group's timeout, seconds")
    parser.add_argument("--commit-every", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--change-fsync", action="store_true")
    for name, kind in (("model", str), ("data", str), ("global-batch", int), ("micro-batch", int), ("lr", float),
                       ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torch's default timeout until the first step (_shorten_timeout)
    joined = time.time()
    if args.trigger == "kill" and dist.get_rank() == 0:  # one line per generation of workers torchrun starts
        with open(Path(args.dir) / "generations.jsonl", "a") as f:
            f.write(json.dumps({"time": joined, "world": dist.get_world_size()}) + "\n")
    try:
        if args.role == "old" and recovering(args.trigger, dist.get_world_size(), args.layout):
            recovered(args, joined)
        elif args.role == "old":
            old(args)
        else:
            new(args, joined)
    finally:
        dist.destroy_process_group()  # no gc.collect() first: it leaves with os._exit, as scalai's workers


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown, as the reference trainer's workers do
    # (scalai.examples.gpt.__main__): torch's takes seconds of CPU here, while the other
    # generation starts, and its gloo destructors can abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
