"""Downtime of one reconfiguration of a training job: ``scalai run`` against PyTorch DCP + torchrun.

One run prints one table measured in that run. The job is the reference trainer's GPT
(``--model``, default ``gpt-bench``: 26 M parameters, ~300 MiB of state: fp32 weights and
two fp32 Adam moments per weight) with the same global batch, micro-batch, learning rate,
seed and sample index in both systems. For each case, a change of layout A -> B after step
S (``--at-step``, default 2):

- **scalai**: ``scalai run --layout A --schedule '[{"step": S, "layout": "B"}]' --steps S+1
  --hosts 2 --gpus-per-host 2 --commit-every 0``: the workers stop after step S and save
  into their hosts' stores (memory-backed files), the stores transform the state into B,
  new torchrun agents (started ahead of the change, see ``scalai.elastic.ahead``) load it
  and run step S+1. The figures are the runner's ``timeline.json``.
- **DCP + torchrun**, what a PyTorch user does today (this script's ``--worker`` mode):
  ``torchrun --standalone --nproc-per-node |A|`` trains S steps at A, then ``dcp.save`` of
  ``get_state_dict(model, optimizer)`` plus the non-tensor state the job needs (step, data
  position, LR schedule) to a directory **on disk** (``FileSystemWriter(sync_files=True)``,
  ``--workdir``, default ``/tmp``), and exits; the driver then starts ``torchrun
  --nproc-per-node |B|`` whose workers import torch, join the process group, build the
  model at B, ``dcp.load`` into ``get_state_dict`` of the new job and ``set_state_dict``,
  restore step, data position and LR schedule, and run step S+1.

Downtime is measured as ``scalai run`` defines it (docs/elastic.md): from the request (the
end of step S) to the end of step S+1, the first step in the new layout. Phases:

- scalai: stop, save, plan, transform, relaunch, load, first step, as in ``timeline.json``.
  They overlap (relaunch runs from the end of the save to the new workers being ready,
  beside plan and transform), so their sum exceeds the downtime. "exposed" is
  the part of the transform outside the relaunch span: what it adds to the critical path.
- DCP: save (request to the checkpoint written and fsynced on every rank), relaunch (old
  processes exit, torchrun restarts, workers import torch, rendezvous and build the
  model), load (``dcp.load`` + ``set_state_dict`` + the non-tensor state), first step.
  They are sequential and sum to the downtime.

The change's step matters to scalai: the runner starts the next generation ahead of a
scheduled change, but not before the job's first step is done, so with S = 2 its new
workers start about one step before the request; a larger ``--at-step`` (e.g. 12 for
gpt-bench on 2 cores) gives the start-ahead room to hide the process start-up. The lines
below the table say when each system's new workers started, joined and were ready.

Both continue the same trajectory: the loss of step S+1 must be the same in both systems
(relative 1e-5), else the script stops. Times are wall seconds (``time.time()`` marks of
the processes, all on this machine). Repeats alternate which system runs first; the table
shows medians and the min–max of the downtime. The DCP load reads the files the save has
just written (page cache warm), so it measures the software rather than a cold disk.

Usage::

    .venv/bin/python benchmarks/reconfigure.py                     # gpt-bench, 4 cases, 2 repeats, ~7 min
    .venv/bin/python benchmarks/reconfigure.py --model gpt-tiny --repeats 1   # smoke test, ~2.5 min
    .venv/bin/python benchmarks/reconfigure.py --case tp=1,pp=1,dp=2:tp=1,pp=1,dp=4 --at-step 12 --plot phases.png
"""

from __future__ import annotations

import time

_PROCESS_START = time.time()  # a baseline worker's start: before anything else is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402

#: Grow with a dp change, a tp change, a pp change, and a shrink changing all three; the
#: starting layouts of 2 devices run on one simulated host, those of 4 on both.
DEFAULT_CASES = ("tp=1,pp=1,dp=2:tp=1,pp=1,dp=4", "tp=1,pp=1,dp=4:tp=2,pp=1,dp=2",
                 "tp=2,pp=1,dp=2:tp=2,pp=2,dp=1", "tp=2,pp=2,dp=1:tp=1,pp=1,dp=2")
HOSTS, GPUS_PER_HOST = 2, 2
SCALAI_PHASES = ("stop", "save", "plan", "transform", "relaunch", "load", "first_step")
DCP_PHASES = ("save", "relaunch", "load", "first_step")
RTOL = 1e-5


# -- the baseline's workers (under torchrun) ------------------------------------------------


def _options(args, layout: str, steps: int):
    from scalai.examples.gpt.options import TrainOptions

    return TrainOptions(layout=layout, steps=steps, model=args.model, data=args.data, seed=args.seed,
                        global_batch=args.global_batch, micro_batch=args.micro_batch, lr=args.lr)


def _state(run, extra: dict) -> dict:
    """What goes through DCP: model and optimizer (``get_state_dict``), and the non-tensor
    state a job needs to continue its trajectory (DCP stores those values pickled)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(run.stage.module, run.optimizer)
    return {"model": model_sd, "optim": optim_sd, "extra": extra}


def _extra(run) -> dict:
    return {"step": run.job.step, "data": dataclasses.asdict(run.job.data),
            "scheduler": run.scheduler.state_dict()}


def _marks_max(marks: dict[str, float]) -> dict[str, float]:
    """Each mark's latest value over the ranks (the slowest rank defines a phase's end)."""
    import torch
    import torch.distributed as dist

    box = torch.tensor(list(marks.values()), dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return dict(zip(marks, box.tolist()))


def worker_save(args) -> dict:
    """Phase 1 at layout A: train S steps, then save everything with DCP and leave."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from scalai.data import TokenDataset
    from scalai.examples.gpt.train import build, step

    run = build(_options(args, args.layout, args.at_step + 1))
    dataset = TokenDataset(run.index)
    losses = [step(run, dataset) for _ in range(args.at_step)]
    request = time.time()  # the end of step S: its loss all-reduce was the step's last collective
    dcp.save(_state(run, _extra(run)), storage_writer=FileSystemWriter(args.ckpt, sync_files=True))
    dist.barrier()
    return {"losses": losses, "request": request, "saved": time.time()}


def worker_load(args) -> dict:
    """Phase 2 at layout B: build, load the DCP checkpoint (resharding), run one step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from scalai.data import DataState, TokenDataset
    from scalai.examples.gpt.train import build, step

    joined = time.time()
    run = build(_options(args, args.layout, args.at_step + 1))
    built = time.time()
    state = _state(run, _extra(run))  # placeholders, replaced by the saved values
    dcp.load(state, storage_reader=FileSystemReader(args.ckpt))
    set_state_dict(run.stage.module, run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    extra = state["extra"]
    run.job.step, run.job.data = extra["step"], DataState(**extra["data"])
    run.scheduler.load_state_dict(extra["scheduler"])
    loaded = time.time()
    loss = step(run, TokenDataset(run.index))
    first = time.time()
    marks = _marks_max({"start": _PROCESS_START, "joined": joined, "built": built, "loaded": loaded,
                        "first": first})
    return {"loss": loss, "step": run.job.step, **marks}


def worker(args) -> None:
    """One rank of the baseline: ``--phase save`` at A or ``--phase load`` at B. Rank 0
    writes the marks after leaving the process group (``left``: the process exits next)."""
    import gc
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = (worker_save if args.phase == "save" else worker_load)(args)
    finally:
        gc.collect()  # free gloo work objects held in cycles while the interpreter is alive
        dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text(json.dumps({**result, "left": time.time()}))


# -- the driver -------------------------------------------------------------------------------


class RunFailed(Exception):
    """A launched run exited with an error; the message names it and its log."""


def _launch(cmd: list[str], log_path: Path, what: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log_path, "ab") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        raise RunFailed(f"{what} exited with status {rc} (output above, from {log_path})")


def _common_flags(args) -> list[str]:
    return ["--model", args.model, "--global-batch", str(args.global_batch), "--micro-batch",
            str(args.micro_batch), "--lr", repr(args.lr), "--seed", str(args.seed)]


def run_scalai(args, a: str, b: str, work: Path) -> dict:
    """One ``scalai run`` with the change A -> B after step S; its timeline and losses."""
    out = work / "scalai"
    schedule = work / "schedule.json"
    schedule.write_text(json.dumps([{"step": args.at_step, "layout": b}]))
    _launch([sys.executable, "-c", "import sys; from scalai.cli.main import main; sys.exit(main())", "run",
             "--layout", a, "--schedule", str(schedule), "--steps", str(args.at_step + 1),
             "--hosts", str(HOSTS), "--gpus-per-host", str(GPUS_PER_HOST), "--commit-every", "0",
             "--data", args.data, "--out", str(out), *_common_flags(args)], work / "scalai.log", "scalai run")
    changes = json.loads((out / "timeline.json").read_text())
    if len(changes) != 1:
        raise RunFailed(f"scalai run recorded {len(changes)} reconfigurations, expected 1 ({out})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["loss"] for r in rows if not r.get("lost")}
    change = changes[0]
    request = _request_time(out, args.at_step)
    new = _new_workers(out, request)
    shutil.rmtree(out, ignore_errors=True)
    return {"downtime": change["downtime"], "phases": change["phases"], "starts": change["starts"],
            "bytes_moved": change["bytes_moved"], "cross_host_bytes": change["cross_host_bytes"],
            "losses": losses, "new_workers": new}


def _request_time(out: Path, at_step: int) -> float | None:
    """The end of step S as the workers logged it (the request of a scheduled change)."""
    path = out / "workers" / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if row.get("step") == at_step:
            return row.get("time")
    return None


def _new_workers(out: Path, request: float | None) -> dict[str, float]:
    """When the new generation's workers started, joined their group and were ready
    (the slowest rank), in seconds after the request (negative: before it, started ahead);
    empty if the marks are missing."""
    marks: dict[str, float] = {}
    for path in sorted((out / "events" / "g001").glob("rank-*.json")) if request else []:
        times = json.loads(path.read_text()).get("times", {})
        for key, name in (("process_start", "start"), ("joined", "joined"), ("ready", "built")):
            if key in times:
                marks[name] = max(marks.get(name, float("-inf")), times[key] - request)
    return marks


def run_dcp(args, a: str, b: str, work: Path) -> dict:
    """The baseline: torchrun at A (S steps, DCP save), then torchrun at B (DCP load, one step)."""
    ckpt = work / "dcp"
    flags = [*_common_flags(args), "--data", args.data, "--ckpt", str(ckpt), "--at-step", str(args.at_step)]

    def torchrun(layout: str, phase: str) -> dict:
        from scalai.config import ParallelConfig

        out = work / f"{phase}.json"
        _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                 str(ParallelConfig.parse(layout).world_size), __file__, "--worker", "--phase", phase,
                 "--layout", layout, "--out", str(out), *flags], work / "dcp.log", f"DCP {phase} at {layout}")
        return json.loads(out.read_text())

    first = torchrun(a, "save")
    exited = time.time()
    disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    second = torchrun(b, "load")
    shutil.rmtree(ckpt, ignore_errors=True)
    t0 = first["request"]
    phases = {"save": first["saved"] - t0, "relaunch": second["built"] - first["saved"],
              "load": second["loaded"] - second["built"], "first_step": second["first"] - second["loaded"]}
    starts = {"save": 0.0, "relaunch": first["saved"] - t0, "load": second["built"] - t0,
              "first_step": second["loaded"] - t0}
    losses = {i + 1: x for i, x in enumerate(first["losses"])}
    losses[second["step"]] = second["loss"]
    new = {"left": first["left"] - t0, "exited": exited - t0,
           **{k: second[k] - t0 for k in ("start", "joined", "built")}}
    return {"downtime": second["first"] - t0, "phases": phases, "starts": starts, "losses": losses,
            "disk_bytes": disk, "new_workers": new}


def check_losses(case: str, s: int, ours: dict, theirs: dict) -> float:
    """Both systems continue the same trajectory: the loss of step S+1 must agree (returns
    the relative difference)."""
    x, y = ours["losses"].get(s + 1), theirs["losses"].get(s + 1)
    if x is None or y is None:
        raise SystemExit(f"{case}: the loss of step {s + 1} is missing (scalai {x}, DCP {y})")
    if abs(x - y) > RTOL * abs(y):
        before = f"step {s}: scalai {ours['losses'].get(s)!r}, DCP {theirs['losses'].get(s)!r}"
        raise SystemExit(f"{case}: the loss of step {s + 1} differs: scalai {x!r}, DCP {y!r} "
                         f"(relative {abs(x - y) / abs(y):.2e} > {RTOL:g}; {before}); "
                         f"the two runs did not continue the same trajectory")
    return abs(x - y) / abs(y)


def transform_exposed(result: dict) -> float:
    """Seconds of the transform outside the relaunch span (its share of the critical path)."""
    p, s = result["phases"], result["starts"]
    if "transform" not in p:
        return 0.0
    t0, t1 = s["transform"], s["transform"] + p["transform"]
    r0, r1 = s.get("relaunch", t1), s.get("relaunch", t1) + p.get("relaunch", 0.0)
    overlap = max(0.0, min(t1, r1) - max(t0, r0))
    return p["transform"] - overlap


def validate(cases: list[str], args) -> list[tuple[str, str]]:
    """Each ``A:B`` as two layout strings; one clear line (SystemExit) for a bad one."""
    from scalai.config import ParallelConfig

    out = []
    for case in cases:
        parts = case.split(":")
        if len(parts) != 2:
            raise SystemExit(f"--case {case!r}: expected A:B, two layouts such as tp=1,pp=1,dp=2:tp=2,pp=1,dp=2")
        try:
            a, b = (ParallelConfig.parse(p) for p in parts)
            for layout in (a, b):
                _options(args, str(layout), args.at_step + 1)
        except ValueError as exc:
            raise SystemExit(f"--case {case!r}: {exc}") from None
        if a == b:
            raise SystemExit(f"--case {case!r}: A and B are the same layout; nothing would change")
        for layout in (a, b):
            if layout.world_size > HOSTS * GPUS_PER_HOST:
                raise SystemExit(f"--case {case!r}: {layout} needs {layout.world_size} devices; "
                                 f"this benchmark has {HOSTS} hosts x {GPUS_PER_HOST}")
        out.append((str(a), str(b)))
    return out


def describe_case(a: str, b: str) -> str:
    """``grow 2->4: dp``, ``4 devices: tp, pp, dp`` and the like."""
    from scalai.config import ParallelConfig

    pa, pb = ParallelConfig.parse(a), ParallelConfig.parse(b)
    if pa.world_size == pb.world_size:
        size = f"{pa.world_size} devices"
    else:
        size = f"{'grow' if pb.world_size > pa.world_size else 'shrink'} {pa.world_size}->{pb.world_size}"
    return f"{size}: {', '.join(d for d in ('tp', 'pp', 'dp', 'zero') if getattr(pa, d) != getattr(pb, d))}"


# -- the report -------------------------------------------------------------------------------


def _median(results: list[dict], key) -> float | None:
    values = [key(r) for r in results]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _phase_medians(results: list[dict], phases) -> dict[str, float | None]:
    return {p: _median(results, lambda r, p=p: r["phases"].get(p)) for p in phases}


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


#: The table's phases: ``stop`` (the workers agreeing to stop) is ~0 for a scheduled change
#: and is given below the table instead.
TABLE_PHASES = SCALAI_PHASES[1:]
HEADERS = ["case", "system", "downtime", "min–max", *(p.replace("_", " ") for p in TABLE_PHASES),
           "exposed", "share", "DCP/scalai"]


def table_rows(a: str, b: str, ours: list[dict], theirs: list[dict]) -> list[list[str]]:
    """Two rows per case: scalai, then DCP + torchrun."""
    s_ours, s_theirs = Stats.of([r["downtime"] for r in ours]), Stats.of([r["downtime"] for r in theirs])
    rows = []
    for label, system, results, stats, phases in (
            (f"{a} ->", "scalai", ours, s_ours, SCALAI_PHASES),
            (b, "DCP+torchrun", theirs, s_theirs, DCP_PHASES)):
        medians = _phase_medians(results, phases)
        row = [label, system, f"{stats.median:.2f}", f"{stats.min:.2f}–{stats.max:.2f}",
               *(_fmt(medians.get(p)) for p in TABLE_PHASES)]
        if system == "scalai":
            exposed = _median(results, transform_exposed)
            share = _median(results, lambda r: r["phases"].get("transform", 0.0) / r["downtime"])
            row += [_fmt(exposed), f"{100 * share:.0f}%", f"{s_theirs.median / s_ours.median:.2f}x"]
        else:
            row += ["", "", ""]
        rows.append(row)
    return rows


def notes(a: str, b: str, ours: list[dict], theirs: list[dict]) -> list[str]:
    """Bytes moved, and when the new workers got going, per case."""
    def mark(results: list[dict], key: str) -> str:
        value = _median(results, lambda r: r["new_workers"].get(key))
        return "?" if value is None else f"{value:+.2f}"

    def mib(results: list[dict], key: str) -> str:
        return f"{_median(results, lambda r: r[key]) / 2**20:.0f} MiB"

    return [f"{a} -> {b} ({describe_case(a, b)}): scalai moved {mib(ours, 'bytes_moved')} "
            f"({mib(ours, 'cross_host_bytes')} across hosts), DCP wrote {mib(theirs, 'disk_bytes')} to disk",
            f"    s after the request: scalai's new workers started {mark(ours, 'start')}, joined "
            f"{mark(ours, 'joined')}, ready to load {mark(ours, 'built')}; DCP's old rank 0 left the group "
            f"{mark(theirs, 'left')}, torchrun exited {mark(theirs, 'exited')}, new workers started "
            f"{mark(theirs, 'start')}, joined {mark(theirs, 'joined')}, built {mark(theirs, 'built')} "
            f"(slowest rank)"]


def _bar_slot(system: str, phase: str, y: float) -> tuple[float, float]:
    """(bottom, height) of a phase's bar: scalai's relaunch takes the lower half of its row,
    the plan and transform beside it the upper half."""
    if system == "scalai" and phase == "relaunch":
        return y - 0.35, 0.35
    if system == "scalai" and phase in ("plan", "transform"):
        return y, 0.35
    return y - 0.35, 0.7


def plot(path: str, cases: list[tuple[str, str]], results: dict) -> None:
    """Horizontal bars, one per case and system, each phase (median) drawn at its median start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(SCALAI_PHASES, ("#8c8c8c", "#4c72b0", "#c9b037", "#dd8452", "#55a868", "#8172b3",
                                      "#64b5cd")))
    fig, ax = plt.subplots(figsize=(11, 1.2 + 1.6 * len(cases)))
    ticks, seen, y, longest = [], set(), 0.0, 0.0
    for a, b in reversed(cases):
        for system in ("DCP+torchrun", "scalai"):
            runs = results[(a, b)][system]
            for p in SCALAI_PHASES if system == "scalai" else DCP_PHASES:
                width = _median(runs, lambda r, p=p: r["phases"].get(p))
                start = _median(runs, lambda r, p=p: r["starts"].get(p))
                if width is not None and start is not None:
                    ax.broken_barh([(start, width)], _bar_slot(system, p, y), color=colors[p],
                                   label=None if p in seen else p.replace("_", " "))
                    seen.add(p)
            down = _median(runs, lambda r: r["downtime"])
            longest = max(longest, down)
            ax.text(down, y, f" {down:.1f} s", va="center", fontsize=8)
            ticks.append((y, system))
            y += 1.0
        ax.text(0, y - 0.4, f"{a} -> {b}", fontsize=8, va="center")
        y += 0.6
    ax.set_yticks([t for t, _ in ticks], [name for _, name in ticks], fontsize=8)
    ax.set_xlim(0, longest * 1.12)
    ax.set_ylim(-0.7, y - 0.3)
    ax.set_xlabel("seconds after the request (the end of the last step before the change)")
    handles, names = ax.get_legend_handles_labels()
    order = [names.index(p.replace("_", " ")) for p in SCALAI_PHASES if p.replace("_", " ") in names]
    ax.legend([handles[i] for i in order], [names[i] for i in order], loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=8)
    ax.set_title("Downtime of one reconfiguration, phases (medians)", loc="left", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-bench", help="gpt-tiny, gpt-small or gpt-bench")
    parser.add_argument("--case", action="append", metavar="A:B", help="a change of layout (repeatable)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--at-step", type=int, default=2, help="the change comes after this step")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="parent of the scratch directory (default /tmp: a disk)")
    parser.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    parser.add_argument("--plot", metavar="FILE", help="also draw the phases into this PNG")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["save", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        worker(args)
        return
    if args.repeats < 1 or args.at_step < 1:
        raise SystemExit("--repeats and --at-step must be at least 1")

    from scalai.examples.gpt.corpus import ensure_index
    from scalai.examples.gpt.model import preset

    try:
        cfg = preset(args.model)
    except ValueError as exc:
        raise SystemExit(f"--model: {exc}") from None
    args.data = str(ensure_index(cfg.seq_len).path)
    cases = validate(args.case or list(DEFAULT_CASES), args)
    state = cfg.num_params() * 4 * 3
    work, where = choose_workdir(0, 0, args.workdir or "/tmp", "scalai-reconfigure")
    log(f"{args.model}: {cfg.num_params() / 1e6:.1f} M parameters, {state / 2**20:.0f} MiB of state; "
        f"change after step {args.at_step}; DCP files in {where}")
    results: dict = {}
    worst = 0.0
    started = time.perf_counter()
    try:
        for i, (a, b) in enumerate(cases):
            case = f"{a} -> {b}"
            results[(a, b)] = {"scalai": [], "DCP+torchrun": []}
            for r in range(args.repeats):
                order = [("scalai", run_scalai), ("DCP+torchrun", run_dcp)]
                for system, fn in order[r % 2:] + order[: r % 2]:
                    rdir = Path(work, f"c{i}-r{r}-{'scalai' if system == 'scalai' else 'dcp'}")
                    rdir.mkdir()
                    log(f"{case}: {system}, repeat {r + 1}/{args.repeats}")
                    res = fn(args, a, b, rdir)
                    log(f"  downtime {res['downtime']:.2f} s  ("
                        + ", ".join(f"{p} {v:.2f}" for p, v in res["phases"].items()) + ")")
                    results[(a, b)][system].append(res)
                for ours, theirs in zip(results[(a, b)]["scalai"], results[(a, b)]["DCP+torchrun"]):
                    worst = max(worst, check_losses(case, args.at_step, ours, theirs))
    except RunFailed as exc:
        raise SystemExit(f"reconfigure: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - started

    rows, sections, lines = [], [], []
    for a, b in cases:
        ours, theirs = results[(a, b)]["scalai"], results[(a, b)]["DCP+torchrun"]
        sections.append(len(rows))
        rows += table_rows(a, b, ours, theirs)
        lines += notes(a, b, ours, theirs)
    print_table(f"Downtime of one reconfiguration of {args.model} ({state / 2**20:.0f} MiB of state), "
                f"seconds, median of {args.repeats}", HEADERS, rows, sections, args.format)
    stop = max(r["phases"].get("stop", 0.0) for c in cases for r in results[c]["scalai"])
    print(f"Seconds from the request (the end of step {args.at_step}) to the end of step {args.at_step + 1}, "
          "the first in the new layout.\n"
          "scalai's phases overlap: relaunch (the save's end to the new workers ready) runs beside plan and "
          "transform;\nplan lasts until the transform starts (it includes waiting for the old workers to exit "
          "and for the new ones' layout);\nexposed: the part of the transform outside the relaunch span; "
          f"share: transform / downtime; stop took at most {stop:.2f} s.\nDCP+torchrun's phases are sequential "
          "(save: written and fsynced; relaunch: exit, torchrun, imports, rendezvous, model build).")
    for line in lines:
        print(line)
    losses = ", ".join(f"{results[c]['scalai'][0]['losses'][args.at_step + 1]:.6f}" for c in cases)
    print(f"loss of step {args.at_step + 1} per case, the same in both systems (largest relative difference "
          f"{worst:.1e}, allowed {RTOL:g}): {losses}")
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; torch {machine.get('torch')}; "
          f"scalai: {HOSTS} simulated hosts x {GPUS_PER_HOST} devices, stores in memory (/dev/shm); DCP files on "
          f"{where}; {elapsed / 60:.1f} min")
    if args.plot:
        plot(args.plot, cases, results)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
