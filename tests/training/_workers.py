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
