"""The PyTorch baseline of the downtime benchmark: DCP save, a new torchrun, DCP load.

The driver (this module) starts one torchrun agent per simulated host the layout uses
(``torchrun --nnodes H --nproc-per-node 2 --rdzv-backend c10d``, as on real hosts and as
scalai's runner does) with the old role of :mod:`.dcp_worker` at A, and the same at B with
the new role when the scenario allows (the same moment scalai's runner would start its new
agents):

- ``ahead``: once the old job's steps reach the start-ahead rule
  (:func:`~.harness.ahead_due`);
- ``at_request``: when it sends the request (touches the stop file the old job checks
  every step);
- ``after_save``: once the old job's checkpoint of the change is written.

It lets the new workers build (``DIR/free``) once the old workers' processes are gone, as
scalai's runner frees the devices. The phases come from the workers' marks:

- stop: the request to the save's start (the rest of the step in flight, for a request);
- save: ``dcp.save`` (after waiting for a periodic async save still running), every rank
  done (a barrier);
- relaunch: the save's end to the new workers built (their start-up, the old processes'
  exit and the wait for them overlap here);
- load: ``dcp.load`` + ``set_state_dict`` + the non-tensor state;
- first_step: the first step at B.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from .harness import (Case, Outcome, Processes, RunFailed, Scenario, Settings, ahead_due, env_for_runs,
                      mid_step_time, poll_until, read_rows)

__all__ = ["NAME", "phases", "run", "scheduled", "requested", "tricks"]

NAME = "DCP+torchrun"
WORKER = str(Path(__file__).resolve().parent / "dcp_worker.py")


def phases() -> tuple[str, ...]:
    return ("stop", "save", "relaunch", "load", "first_step")


def run(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """One measured run of ``case`` under ``scenario`` in the scratch directory ``work``."""
    return {"schedule": scheduled, "request": requested}[scenario.trigger](settings, case, scenario, work)


def scheduled(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """A change after step S, known to the old job from the start (it stops there)."""
    return _drive(settings, case, scenario, work, None)


def requested(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """A request in the middle of step S: the stop file, which the old job checks after
    every step; the new job starts at once if the scenario says so."""
    def trigger(rows: list[dict], at: dict[str, float], start_new: Callable[[], None]) -> None:
        due = mid_step_time(rows, settings.at_step - 1)
        if "request" not in at and due is not None and time.time() >= due:
            (work / "stop").touch()
            at["request"] = time.time()
            if scenario.launch == "at_request":
                start_new()

    return _drive(settings, case, scenario, work, trigger)


def _agents(settings: Settings, scenario: Scenario, layout: str, role: str, work: Path,
            endpoint: str) -> list[list[str]]:
    """One torchrun agent per host the layout uses (as on real hosts, and as scalai's runner
    starts them: 2 devices on one simulated host, 4 on two), in one c10d rendezvous."""
    from scalai.config import ParallelConfig

    world = ParallelConfig.parse(layout).world_size
    hosts = -(-world // settings.gpus_per_host)
    args = [WORKER, "--role", role, "--dir", str(work), "--layout", layout, "--steps", str(settings.steps(scenario)),
            "--at-step", str(settings.at_step), "--trigger", scenario.trigger, "--commit-every",
            str(settings.commit_every), "--threads", str(settings.dcp_threads),
            *(["--change-fsync"] if settings.dcp_change_fsync else []), *settings.trainer_flags()]
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(hosts), "--nproc-per-node",
             str(world // hosts), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id",
             f"baseline-{role}", "--rdzv-conf", "is_host=false", "--local-addr", f"127.0.0.{10 + slot}",
             "--max-restarts", "0", "--monitor-interval", "0.1", *args] for slot in range(hosts)]


class Rendezvous:
    """The c10d rendezvous store both generations' torchrun agents meet in, held by the
    driver as a torchrun user's launcher holds it (``endpoint`` = ``host:port``)."""

    def __init__(self, host: str = "127.0.0.1"):
        from torch.distributed import TCPStore

        self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.endpoint = f"{host}:{self._store.port}"

    def close(self) -> None:
        self._store = None


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it holds no memory, no device)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _drive(settings: Settings, case: Case, scenario: Scenario, work: Path, trigger: Callable | None) -> Outcome:
    """Run the old job, start the new one when the scenario allows, free its devices once
    the old workers are gone; returns the measured outcome. ``trigger(rows, at, start_new)``
    is called on every poll: it causes the change (and records ``at["request"]``)."""
    procs = Processes(env_for_runs(work))
    at: dict[str, float] = {}  # when the driver did what (wall clock)
    saved, rows_path = work / "saved.json", work / "rows.jsonl"

    def start(role: str, layout: str) -> list:
        return [procs.start(cmd, work / f"{role}-{i}.log", f"torchrun agent {i} at {layout}")
                for i, cmd in enumerate(_agents(settings, scenario, layout, role, work, rdzv.endpoint))]

    def start_new() -> None:
        if "launched" not in at:
            at["launched"] = time.time()
            start("new", case.new)

    def tick() -> None:
        rows = read_rows(rows_path)
        if trigger is not None:
            trigger(rows, at, start_new)
        if scenario.launch == "ahead" and ahead_due(rows, settings.at_step):
            start_new()
        if saved.exists():
            if scenario.launch == "after_save":
                start_new()
            if "freed" not in at and all(process_gone(p) for p in json.loads((work / "old-pids.json").read_text())):
                (work / "free").touch()
                at["freed"] = time.time()
        if "old_exit" not in at and all(a.poll() is not None for a in old):
            at["old_exit"] = time.time()

    rdzv = Rendezvous()  # the c10d store both generations' agents meet in, held here as scalai's runner does
    try:
        old = start("old", case.old)
        poll_until(lambda: "launched" in at and procs.all_done(), procs, settings.timeout, "DCP + torchrun", tick)
        procs.check()
    finally:
        procs.stop()
        rdzv.close()
    if not (work / "new.json").exists():
        raise RunFailed(f"the new torchrun left no marks (see {work}/new-*.log)")
    return _outcome(work, at)


def _outcome(work: Path, at: dict[str, float]) -> Outcome:
    saved, new = json.loads((work / "saved.json").read_text()), json.loads((work / "new.json").read_text())
    rows = read_rows(work / "rows.jsonl")
    end_of = {r["step"]: r["time"] for r in rows}
    s, n = saved["marks"], new["marks"]
    request = at.get("request", end_of[saved["step"]])
    bounds = {"stop": (request, s["save_start"]), "save": (s["save_start"], s["save_end"]),
              "relaunch": (s["save_end"], n["built"]), "load": (n["built"], n["loaded"]),
              "first_step": (n["loaded"], new["first"])}
    phases = {k: max(0.0, b - a) for k, (a, b) in bounds.items()}
    starts = {k: max(0.0, a - request) for k, (a, _) in bounds.items()}  # a rank may start saving before rank 0 logs
    marks = {k: n[k] - request for k in ("start", "joined", "waiting", "devices", "model", "built")}
    marks.update({k: at[k] - request for k in ("launched", "freed", "old_exit") if k in at})
    notes = []
    if s["async_waited"] - s["save_start"] > 0.005:
        notes.append(f"the change's save waited {s['async_waited'] - s['save_start']:.2f} s for a periodic async save")
    periodic = sorted((work / "periodic").glob("step-*"))
    counted = {"written": _size(work / "change"), "persisted": _size(periodic[-1]) if periodic else 0}
    return Outcome(new["first"] - request, phases, starts, {r["step"]: r["loss"] for r in rows}, saved["step"],
                   marks, counted, saved["periodic"], notes)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def tricks(settings: Settings, scenario: Scenario) -> list[str]:
    """What this side does, for the report."""
    k, fsync = settings.commit_every, settings.dcp_change_fsync
    start = {"ahead": "ahead of the change by the same rule as scalai's runner (its start-up estimate over "
                      "the step time), up to waiting for the devices (torch imported, rendezvous done, the model "
                      "parallelized on the meta device)",
             "at_request": "at the request, while the old workers finish their step and save",
             "after_save": "once the old job's checkpoint is written"}[scenario.launch]
    return [
        f"new processes: one torchrun agent per simulated host (c10d rendezvous) start {start}; their "
        "workers build the model once the old workers have exited",
        (f"persisted: every {k} steps dcp.async_save (staged in memory while the step waits, written by a "
         "background thread on its own gloo group, fsynced), waiting for the previous one first" if k else
         "persisted: nothing before the change")
        + "; at the change: dcp.save to disk ("
        + ("fsynced" if fsync else "not fsynced: it only has to outlive the processes, as scalai's stores in "
           "memory do; --dcp-change-fsync adds it")
        + f"), FileSystemWriter thread_count={settings.dcp_threads}",
        "pre-allocated: the new workers build the model and create Adam's moments (get_state_dict) before "
        "dcp.load, which reads the files the save has just written (page cache warm)",
        "bytes counted: written = the change's checkpoint on disk (DCP writes a replicated tensor once), "
        "persisted = one periodic checkpoint",
    ]
