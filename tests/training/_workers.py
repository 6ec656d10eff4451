"""Worker functions for multi-process training tests (run by ``tests/_dist.py``).

Each function ends with ``gc.collect()``: the parallelized model keeps gloo work objects
alive in reference cycles, and if those are only freed while the interpreter shuts down
(after ``destroy_process_group``), gloo aborts the process ("terminate called without an
active exception") now and then. Collecting while everything is alive avoids it.
"""

from __future__ import annotations

import gc


def train_segment(rank: int, world_size: int, **options):
    """Train with the reference trainer; return ``{"step", "losses", "stopped"}``."""
    import torch

    from scalai.examples.gpt.options import TrainOptions
    from scalai.examples.gpt.train import train

    torch.set_num_threads(1)
    summary = train(TrainOptions(**options))
    gc.collect()
    return summary


def train_with_faulty_reads(rank: int, world_size: int, faults: dict, **options):
    """:func:`train_segment` with a data source that goes wrong on some rank: ``faults`` maps
    ``"RANK:STEP"`` to ``"twice"`` or ``"skip"`` (see ``tests/faults.py``)."""
    from faults import faulty_reads, step_counter

    mine = {int(key.split(":")[1]): kind for key, kind in faults.items() if int(key.split(":")[0]) == rank}
    faulty_reads(mine, step_counter())
    return train_segment(rank, world_size, **options)


def failure_scenarios(rank: int, world_size: int, data: str, tmp: str):
    """Damaged checkpoints, a failing writer and a stop request seen by only one rank.

    Returns, per scenario, what this rank observed, so the test can check that every rank
    failed (or stopped) the same way.
    """
    import os
    import shutil

    import torch

    from scalai.examples.gpt.options import TrainOptions
    from scalai.examples.gpt.train import build
    from scalai.training import CollectiveError, DirectoryWriter, StopFlag, agree, load, save

    torch.set_num_threads(1)
    run = build(TrainOptions(layout="tp=1,pp=1,dp=2", steps=1, data=data))
    job = run.job
    good = os.path.join(tmp, "good")
    save(job, good)

    def damage() -> None:
        if rank == 0:
            shutil.copytree(good, os.path.join(tmp, "missing"))
            os.unlink(os.path.join(tmp, "missing", "rank-00001.safetensors"))
            shutil.copytree(good, os.path.join(tmp, "corrupt"))
            # rank 0's file: at dp=2 it stores every replica (rank 1's entries point to it)
            path = os.path.join(tmp, "corrupt", "rank-00000.safetensors")
            raw = bytearray(open(path, "rb").read())
            raw[len(raw) // 2] ^= 0x40
            open(path, "wb").write(bytes(raw))

    agree("test: damage copies", damage)
    out = {}
    for name in ("missing", "corrupt"):
        try:
            load(job, os.path.join(tmp, name))
            out[name] = None
        except CollectiveError as exc:
            out[name] = {"message": str(exc), "kinds": sorted(exc.kinds),
                         "ranks": [f.rank for f in exc.failures]}

    class FailsOnRank1(DirectoryWriter):
        def write_rank(self, token, r, ptc, arrays):
            if r == 1:
                raise OSError("No space left on device")
            return super().write_rank(token, r, ptc, arrays)

    try:
        save(job, FailsOnRank1(os.path.join(tmp, "full")))
        out["save"] = None
    except CollectiveError as exc:
        out["save"] = {"message": str(exc), "ranks": [f.rank for f in exc.failures]}
    out["leftovers"] = sorted(p for p in os.listdir(tmp) if p.startswith(".") or p == "full")

    with StopFlag(signals=()) as flag:
        for step in range(1, 10):
            if rank == 1 and step == 3:
                flag.request("only rank 1 was told")
            if flag.should_stop():
                out["stopped_at"], out["reason"] = step, flag.reason
                break
    del run, job
    gc.collect()
    return out


def layout_descriptions(rank: int, world_size: int, layouts: list[str], data: str):
    """Per layout (of this world size): whether the PTC described on the meta device equals
    the built job's, the elements each rank holds under it, and under the first layout's
    PTC relaid out (its split rules applied at this layout's degrees)."""
    import math

    import torch

    from scalai.config import ParallelConfig
    from scalai.examples.gpt.options import TrainOptions
    from scalai.examples.gpt.train import build, describe_layout

    def per_rank(ptc):
        return [sum(math.prod(s.shape) for _, s in ptc.rank_shards(r)) for r in range(world_size)]

    torch.set_num_threads(1)
    out, first = {}, None
    for layout in layouts:
        opts = TrainOptions(layout=layout, steps=1, data=data)
        announced = describe_layout(opts)
        built = build(opts).job.ptc
        first = first or built
        out[layout] = {"equal": announced.to_json() == built.to_json(), "elements": per_rank(built),
                       "relaid_out": per_rank(first.relayout(ParallelConfig.parse(layout)))}
    gc.collect()
    return out


def _snapshot(job) -> dict:
    return {name: t.clone() for name, t in job.local_tensors().items()}


def _dumps_during_step(job, snapshot, train_step, block) -> dict:
    """Run ``train_step()`` (forward, backward, optimizer step) with ``job.local_tensors()``
    called from the middle of forward (after ``block``) and of backward (at ``block``'s
    output gradient), where a survivor's dump finds itself when a peer dies there. Returns,
    per phase, ``"ok"`` (every tensor found, equal to ``snapshot``: the optimizer has not
    stepped yet) or what went wrong."""
    import torch

    seen: dict[str, str] = {}

    def dump(phase: str) -> None:
        try:
            now = job.local_tensors()
            same = sorted(now) == sorted(snapshot) and all(torch.equal(now[k], snapshot[k]) for k in now)
            seen[phase] = "ok" if same else "different values"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            seen[phase] = f"{type(exc).__name__}: {exc}"

    def on_forward(mod, args, output):
        dump("forward")
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda grad: dump("backward"))

    handle = block.register_forward_hook(on_forward)
    try:
        train_step()
    finally:
        handle.remove()
    return seen


def midstep_dumps(rank: int, world_size: int, layouts: list[str], data: str, example: str):
    """``job.local_tensors()`` (what a survivor's dump reads) in the middle of forward and
    of backward, under each of ``layouts`` (FSDP2 ``replicate`` for dp > 1, ``fully_shard``
    with zero=1): the reference trainer (keys: the layouts), and the small model of one's
    own of the script at ``example`` (the worker protocol's docstring; keys ``example
    LAYOUT``), described by :func:`scalai.training.describe` like any user's."""
    import torch
    import torch.distributed as dist

    from scalai.data import TokenDataset
    from scalai.examples.gpt.options import TrainOptions
    from scalai.examples.gpt.train import build, step

    torch.set_num_threads(1)
    out = {}
    for layout in layouts:
        run = build(TrainOptions(layout=layout, steps=2, data=data))
        dataset = TokenDataset(run.index)
        step(run, dataset)  # FSDP2 initializes lazily in the first forward; Adam makes its moments
        snapshot = _snapshot(run.job)
        block = run.stage.module.layers[min(run.stage.module.layers, key=int)]
        out[layout] = _dumps_during_step(run.job, snapshot, lambda: step(run, dataset), block)
        del run, block
        gc.collect()

    import contextlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("worker_doc_example", example)
    own = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(own)
    dataset = TokenDataset(data)
    for layout in layouts:
        opts = TrainOptions(layout=layout, steps=2, data=data)
        if opts.config.tp > 1 or opts.config.pp > 1:
            continue  # the example runs data parallelism only
        model, job = own.build(opts, opts.config, dataset)
        step = lambda: own.train_step(model, job, dataset, opts.micro_batch, contextlib.nullcontext)  # noqa: E731
        step()
        out[f"example {layout}"] = _dumps_during_step(job, _snapshot(job), step, model.layers[0])
        del model, job
        gc.collect()

    return out
