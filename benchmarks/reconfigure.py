"""Downtime of one reconfiguration of a training job: ``scalai run`` against DCP + torchrun.

One run prints tables measured in that run. The job is the reference trainer's GPT
(``--model``, default ``gpt-bench``: 26 M parameters, ~300 MiB of state: fp32 weights and
two fp32 Adam moments per weight) with the same data, global batch, micro-batch, learning
rate and seed on both sides. For each case, a change of layout A -> B, and each scenario
(``downtime/harness.py``):

- ``ahead``: scheduled after step S (``--at-step``); both sides start their new
  processes ahead of it, by the same rule (scalai's runner: its start-up estimate over
  the step time; the baseline's driver applies the same rule to its step times);
- ``cold``: scheduled after step S; both sides start their new processes once the old
  ones have saved (``scalai run --no-start-ahead``);
- ``request``: unscheduled, a request arriving in the middle of step S after S-1 steps
  (scalai: ``POST /v1/scale`` to the run's control endpoint, what ``scalai scale`` sends;
  the baseline: a stop file its training loop checks every step with one all-reduce);
  both sides start their new processes at the request. Both stop after the step in
  flight. (``request-cold``, not run by default: the same request, the new processes
  started once the old ones have saved.)

The sides (``downtime/scalai_side.py``, ``downtime/dcp_side.py``):

- **scalai**: ``scalai run --layout A --hosts 2 --gpus-per-host 2 --commit-every K``: every
  K steps a commit into the hosts' stores (memory), copied to disk in the background; at
  the change the workers save into their hosts' stores, the stores transform the state
  into B, the new workers load it and train on. Figures from the run's ``timeline.json``.
- **DCP + torchrun**, what a careful PyTorch user does: one torchrun agent per host at A,
  ``dcp.async_save`` every K steps (on its own gloo group, fsynced), ``dcp.save`` of
  ``get_state_dict`` plus step, data position and LR schedule to disk at the change, then
  ``torchrun`` at B whose workers join their group, wait for the old workers to exit, build
  the model, ``dcp.load`` (resharding) + ``set_state_dict``, and train on.

In every scenario the new workers of both sides build the model only once the old workers'
processes are gone (on GPUs their memory is free then). Downtime is measured alike: from
the request (a scheduled change: the end of step S; a request: when it was sent) to the end
of the first step in the new layout. The loss of every step both sides logged, the first
in the new layout included, must agree (relative 1e-5), else the script stops. Rounds
alternate which side runs first; every figure is a median over the rounds. The report
says, per side, what starts ahead, what is persisted and when, what is pre-allocated and
which bytes are counted.

Usage::

    .venv/bin/python benchmarks/reconfigure.py                                # 4 cases x 3 scenarios, 2 rounds
    .venv/bin/python benchmarks/reconfigure.py --model gpt-tiny --rounds 1 --case tp=1,pp=1,dp=2:tp=1,pp=1,dp=4
    .venv/bin/python benchmarks/reconfigure.py --scenario request --format markdown --plot phases.png
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import choose_workdir, log, machine_description, print_table  # noqa: E402
from downtime import dcp_side, report, scalai_side  # noqa: E402
from downtime.harness import (DEFAULT_SCENARIOS, SCENARIOS, Case, RunFailed, Settings,  # noqa: E402
                              trajectory_difference)

#: Grow with a dp change, a tp change, a pp change, and a shrink changing all three; the
#: starting layouts of 2 devices run on one simulated host, those of 4 on both.
DEFAULT_CASES = ("tp=1,pp=1,dp=2:tp=1,pp=1,dp=4", "tp=1,pp=1,dp=4:tp=2,pp=1,dp=2",
                 "tp=2,pp=1,dp=2:tp=2,pp=2,dp=1", "tp=2,pp=2,dp=1:tp=1,pp=1,dp=2")
#: With --machines: a scheduled change, a request and a killed machine (issue 12's a, b, c).
MACHINE_SCENARIOS = ("ahead", "request", "kill")
SIDES = (scalai_side, dcp_side)  # the baseline last: ratios are baseline / scalai
RTOL = 1e-5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt-bench", help="gpt-tiny, gpt-small or gpt-bench")
    p.add_argument("--case", action="append", metavar="A:B", help="a change of layout (repeatable)")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help=f"{', '.join(SCENARIOS)} (repeatable; kill: with --machines) [default: "
                        f"{', '.join(DEFAULT_SCENARIOS)}; with --machines: {', '.join(MACHINE_SCENARIOS)}]")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, case and scenario")
    p.add_argument("--at-step", type=int, default=8, help="the change comes after step S")
    p.add_argument("--commit-every", type=int, default=3,
                   help="both sides persist every K steps (scalai: commit + disk copy; DCP: async_save); 0: never")
    p.add_argument("--dcp-threads", type=int, default=None,
                   help="thread_count of the baseline's DCP writer [default: 1 on this machine's disk (2 cores); "
                        "4 with --machines: S3 requests in parallel, as its users configure them]")
    p.add_argument("--dcp-change-fsync", action="store_true", help="the baseline fsyncs its checkpoint of the change")
    p.add_argument("--scalai-standby", type=int, default=None,
                   help="started workers each of scalai's agents keeps (scalai run --standby; default: its own, one "
                        "per free device; 0: none, as torchrun keeps none)")
    p.add_argument("--machines", type=int, default=0,
                   help="run on N simulated machines (root: a network and mount namespace each, linked at --link; "
                        "the baseline's checkpoints on an S3 server on a machine of its own) [default: 0, both "
                        "sides on this machine's loopback]")
    p.add_argument("--link", default="1gbit", help="with --machines: each machine's link each way (tc syntax)")
    p.add_argument("--gpus-per-machine", type=int, default=2, help="with --machines: devices per machine")
    p.add_argument("--dead-after", type=float, default=5.0,
                   help="with --machines: scalai's failure detection (scalai run --dead-after) and the baseline's "
                        "process-group timeout, seconds")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="parent of the scratch directory (default /tmp: a disk)")
    p.add_argument("--keep", action="store_true", help="leave the scratch directory (every run's logs) in place")
    p.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    p.add_argument("--plot", metavar="FILE", help="also draw the phases into this PNG")
    return p


def validate(args) -> tuple[list[Case], list]:
    """The cases and scenarios; one clear line (SystemExit) for bad input."""
    from scalai.config import ParallelConfig
    from scalai.examples.gpt.options import TrainOptions

    bad_threads = args.dcp_threads is not None and args.dcp_threads < 1
    if args.rounds < 1 or args.at_step < 3 or args.commit_every < 0 or bad_threads:
        raise SystemExit("--rounds and --dcp-threads must be at least 1, --at-step at least 3 (a request needs "
                         "two steps' times before it), --commit-every at least 0")
    if args.machines:
        if not 2 <= args.machines <= 4 or args.gpus_per_machine < 1 or not args.dead_after > 0:
            raise SystemExit("--machines must be 2 to 4, --gpus-per-machine at least 1, --dead-after positive")
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?[kmg]bit", args.link):
            raise SystemExit(f"--link {args.link!r}: expected a rate in tc's syntax, such as 1gbit or 400mbit")
        from downtime.cluster import available

        if not available():
            raise SystemExit("--machines needs root, iproute2 (ip, tc) and unshare (network and mount namespaces); "
                             "run without --machines to measure on this machine's loopback")
    elif "kill" in (args.scenario or ()):
        raise SystemExit("--scenario kill needs --machines N (a machine to kill)")
    keys = list(dict.fromkeys(args.scenario or (MACHINE_SCENARIOS if args.machines else DEFAULT_SCENARIOS)))
    devices = (args.machines * args.gpus_per_machine) if args.machines else 4
    cases = []
    default = DEFAULT_CASES
    if args.machines:  # lose one machine's devices (a request to shrink, or the killed machine)
        default = (f"tp=1,pp=1,dp={devices}:tp=1,pp=1,dp={devices - args.gpus_per_machine}",)
    for text in args.case or default:
        parts = text.split(":")
        if len(parts) != 2:
            raise SystemExit(f"--case {text!r}: expected A:B, two layouts such as tp=1,pp=1,dp=2:tp=2,pp=1,dp=2")
        try:
            a, b = (ParallelConfig.parse(p) for p in parts)
            for layout in (a, b):
                TrainOptions(layout=str(layout), steps=1, model=args.model, global_batch=args.global_batch,
                             micro_batch=args.micro_batch)
        except ValueError as exc:
            raise SystemExit(f"--case {text!r}: {exc}") from None
        if a == b:
            raise SystemExit(f"--case {text!r}: A and B are the same layout; nothing would change")
        if max(a.world_size, b.world_size) > devices:
            raise SystemExit(f"--case {text!r}: this benchmark has {devices} devices; use at most {devices}")
        if "kill" in keys and a.world_size != devices:
            raise SystemExit(f"--case {text!r}: with --scenario kill, A must use every device ({devices}: "
                             f"--machines x --gpus-per-machine), so that the killed machine runs part of the job")
        cases.append(Case(str(a), str(b)))
    scenarios = [SCENARIOS[k] for k in keys]
    return cases, scenarios


def _where(settings: Settings, scratch: str) -> str:
    """Where the sides ran, for the report's last line."""
    if not settings.machines:
        return (f"scalai: 2 simulated hosts x 2 devices, stores in memory (/dev/shm); disk copies on {scratch}; "
                f"DCP files on {scratch}")
    return (f"{settings.machines} simulated machines x {settings.gpus_per_host} devices and a storage machine (S3, "
            f"moto), each a network and mount namespace behind a {settings.link} link (tc, each way); scalai's "
            f"stores in the machines' tmpfs, its disk copies in the coordinator's run directory on {scratch}; "
            f"DCP's checkpoints on the S3 server; the harness's control files on {scratch}")


def measure(settings: Settings, cases, scenarios, rounds: int, work: Path, keep: bool = False) -> tuple[dict, float]:
    """Every side, case, scenario and round; returns the results and the largest relative
    loss difference between the sides."""
    results, worst = {}, 0.0
    for i, case in enumerate(cases):
        for scenario in scenarios:
            runs = results[(case, scenario.key)] = {side.NAME: [] for side in SIDES}
            for r in range(rounds):
                this_round = {}
                for side in SIDES[r % 2:] + SIDES[: r % 2]:  # alternate which side goes first
                    folder = work / f"c{i}-{scenario.key}-r{r}-{side.__name__.rsplit('.', 1)[-1]}"
                    folder.mkdir()
                    log(f"{case.label}, {scenario.title}: {side.NAME}, round {r + 1}/{rounds}")
                    out = side.run(settings, case, scenario, folder)
                    if not keep:
                        shutil.rmtree(folder, ignore_errors=True)
                    log(f"  downtime {out.downtime:.2f} s  (" +
                        ", ".join(f"{p} {v:.2f}" for p, v in out.phases.items()) + ")")
                    runs[side.NAME].append(out)
                    this_round[side.NAME] = out
                stops = {k: o.stop_step for k, o in this_round.items()}
                after = {k: o.new_layout for k, o in this_round.items() if o.new_layout}
                if scenario.trigger == "kill" and len(set(after.values())) > 1:  # scalai's runner chooses its own
                    log(f"  warning: the sides continued in different layouts ({after}): the baseline runs B, "
                        f"scalai's runner chose the survivors' layout itself")
                if len(set(stops.values())) > 1 and scenario.trigger != "kill":  # a kill: each its own checkpoint
                    log(f"  warning: the sides stopped after different steps ({stops}): the request did not land "
                        f"in the same step (steps too short for the runner's polling?)")
                try:
                    worst = max(worst, trajectory_difference({k: o.losses for k, o in this_round.items()},
                                                             {k: o.stop_step + 1 for k, o in this_round.items()}))
                except ValueError as exc:
                    raise SystemExit(f"{case.label}, {scenario.title}: {exc}") from None
                if worst > RTOL:
                    raise SystemExit(f"{case.label}, {scenario.title}: the losses differ by a relative {worst:.2e} "
                                     f"(> {RTOL:g}): the sides did not continue the same trajectory")
    return results, worst


def main() -> None:
    args = _parser().parse_args()
    from scalai.examples.gpt.corpus import ensure_index
    from scalai.examples.gpt.model import preset

    try:
        cfg = preset(args.model)
    except ValueError as exc:
        raise SystemExit(f"--model: {exc}") from None
    cases, scenarios = validate(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the runs and remove the scratch directory
    settings = Settings(args.model, str(ensure_index(cfg.seq_len).path), args.at_step, args.commit_every,
                        args.global_batch, args.micro_batch, args.lr, args.seed,
                        dcp_threads=args.dcp_threads if args.dcp_threads is not None else (4 if args.machines else 1),
                        dcp_change_fsync=args.dcp_change_fsync, scalai_standby=args.scalai_standby,
                        machines=args.machines, link=args.link if args.machines else "", dead_after=args.dead_after,
                        gpus_per_host=args.gpus_per_machine if args.machines else 2)
    state = cfg.num_params() * 4 * 3
    work, where = choose_workdir(0, 0, args.workdir or "/tmp", "scalai-reconfigure")
    log(f"{args.model}: {cfg.num_params() / 1e6:.1f} M parameters, {state / 2**20:.0f} MiB of state; change after "
        f"step {args.at_step}, persisted every {args.commit_every} steps; scratch (DCP files, scalai's disk "
        f"copies) in {where}")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    try:
        results, worst = measure(settings, cases, scenarios, args.rounds, Path(work), args.keep)
    except RunFailed as exc:
        raise SystemExit(f"reconfigure: {exc}") from None
    except KeyboardInterrupt:  # every run's processes, machines and files are gone by now
        raise SystemExit("reconfigure: interrupted; the runs' processes, simulated machines and scratch files "
                         "were removed") from None
    finally:
        if args.keep:
            log(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    names = [side.NAME for side in SIDES]
    title = f"{args.model} ({state / 2**20:.0f} MiB of state), seconds, median of {args.rounds}"

    print_table(f"Downtime of one reconfiguration, scalai vs {names[-1]}: {title}",
                ["change", *(s.title for s in scenarios)], report.summary_rows(cases, scenarios, results, *names),
                fmt=args.format)
    phases = report.phase_order([side.phases() for side in SIDES], results)
    for scenario in scenarios:
        headers, rows, sections = report.phase_rows(cases, scenario, results, names, phases)
        print()
        print_table(f"{scenario.title}: phases, {title}", headers, rows, sections, args.format)
        print(f"\nWhat each side does ({scenario.title}):")
        for side in SIDES:
            print(f"  {side.NAME}:")
            for line in side.tricks(settings, scenario):
                print(f"    - {line}")
        for case in cases:
            print("\n".join(report.case_notes(case, scenario, results[(case, scenario.key)])))
    print(f"\nDowntime: from the request (scheduled: the end of step {args.at_step}; a request: when it was sent; "
          "a killed machine: the kill, detect: to the first sign of it the side acted on) to the end of the first "
          "step in the new layout (after a kill: the first step the recovered job ran).\nscalai's phases overlap (relaunch, from the save's end "
          "to the new workers ready, runs beside plan and transform; exposed: the part of the transform outside "
          "it; share: transform / downtime); the baseline's are sequential but for relaunch, which holds the old "
          "processes' exit.")
    first = {c: results[(c, scenarios[0].key)][names[0]][0] for c in cases}
    print(f"loss of the first step in the new layout, the same on both sides in every scenario (largest relative "
          f"difference over every step both logged {worst:.1e}, allowed {RTOL:g}): "
          + ", ".join(f"step {o.stop_step + 1}: {o.losses[o.stop_step + 1]:.6f}" for o in first.values()))
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; torch {machine.get('torch')}; "
          f"{machine['date']}; {_where(settings, where)}; {minutes:.1f} min; load average (1 min) at the start {load_before:.1f}, at the end "
          f"{os.getloadavg()[0]:.1f}")
    if args.plot:
        report.plot(args.plot, cases, scenarios, results, names, phases)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
