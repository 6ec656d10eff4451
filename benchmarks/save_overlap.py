"""Step time of the reference trainer with a background save every K steps, against the
same run without saves (issue 13's target: within 10 %); with ``--runner run``, the elastic
runner's periodic commits in the background and blocking, against none.

Both runs are ``scalai train`` (torchrun, gloo, one process per rank) of the same model,
layout, seed and steps, one after the other, ``--repeats`` times interleaved. The saving
run adds ``--save ROOT --save-every K``: every K steps each rank copies its tensors into
host memory and a thread writes them (a directory, or with ``--storage s3`` moto's S3
server started here on loopback); the next save commits it. A step's time is the wall
time between consecutive rows of the metrics file (so it includes the staging copy and
the commit of the previous save, not only forward/backward), over every step after the
first ``--warmup``; the final (synchronous) save after the last step is not counted.

``--runner run``: ``scalai run`` of the same trainer on one simulated host with its store
(``--hosts 1``, as many devices as the layout, no schedule), three kinds interleaved:
``--commit-every 0`` (no periodic commit), ``--commit-every K`` with ``--commit-mode
background`` (scalai's default: each rank copies its shards into host memory, a thread
uploads them over loopback into the host's store, rank 0 commits once every upload ended,
checked after each step) and ``--commit-mode blocking`` (the step uploads and commits).
The step times are the metrics rows' as above; the runner's persistent copy of each commit
(a thread of the coordinator, another process) runs in all three where there are commits.

Usage::

    .venv/bin/python benchmarks/save_overlap.py                      # gpt-bench, dp=2, K=5
    .venv/bin/python benchmarks/save_overlap.py --model gpt-tiny --steps 12 --repeats 1   # smoke test
    .venv/bin/python benchmarks/save_overlap.py --runner run --every 2    # scalai run --commit-every
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stats, log, machine_description, print_table  # noqa: E402


def _step_times(metrics: Path, warmup: int) -> list[float]:
    times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if line.strip()]
    return [b - a for a, b in zip(times, times[1:])][warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-bench")
    parser.add_argument("--layout", default="tp=1,pp=1,dp=2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5, help="save every K steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps not counted at the start")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--storage", default="file", choices=["file", "s3"])
    parser.add_argument("--runner", default="train", choices=["train", "run"],
                        help="train: scalai train --save-every; run: scalai run --commit-every (stores)")
    parser.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    args = parser.parse_args()
    if args.steps <= args.warmup + args.every:
        raise SystemExit("--steps must exceed --warmup + --every, or no save falls inside the timed steps")
    if args.runner == "run":
        return _elastic(args)
    scalai = str(Path(sys.executable).with_name("scalai"))
    work = Path(tempfile.mkdtemp(prefix="scalai-save-overlap-"))
    env = dict(os.environ)
    server = None
    if args.storage == "s3":
        from save_load import _s3_server

        server, s3_env, bucket = _s3_server()
        env.update(s3_env)
    samples: dict[str, list[float]] = {"none": [], "background": []}
    try:
        for r in range(args.repeats):
            for kind in (("none", "background") if r % 2 == 0 else ("background", "none")):
                metrics = work / f"{kind}-{r}.jsonl"
                cmd = [scalai, "train", "--layout", args.layout, "--steps", str(args.steps), "--model", args.model,
                       "--metrics", str(metrics)]
                if kind == "background":
                    root = f"s3://{bucket}/run{r}" if server else str(work / f"ckpt{r}")
                    cmd += ["--save", root, "--save-every", str(args.every)]
                log(f"round {r + 1}: {kind}")
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                samples[kind] += _step_times(metrics, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.kill()
            server.wait()
    none, bg = Stats.of(samples["none"]), Stats.of(samples["background"])
    mean = {k: sum(v) / len(v) for k, v in samples.items()}
    rows = [["no saves", f"{mean['none']:.4f}", f"{none.median:.4f}", f"{none.min:.4f}–{none.max:.4f}", ""],
            [f"background save every {args.every} steps", f"{mean['background']:.4f}", f"{bg.median:.4f}",
             f"{bg.min:.4f}–{bg.max:.4f}", f"{mean['background'] / mean['none']:.3f}"]]
    print_table(f"Step time of {args.model} at {args.layout}, {args.steps} steps x {args.repeats} rounds "
                f"({args.storage})", ["run", "mean s/step", "median", "min–max", "mean vs no saves"], rows, (),
                args.format)
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; torch {machine.get('torch')}; "
          f"load average (1 min) {os.getloadavg()[0]:.1f}. A step's time: between consecutive metrics rows (the "
          f"staging copy and the previous save's commit included); target: mean within 1.10 of no saves.")


def _elastic(args) -> None:
    """``--runner run``: scalai run without periodic commits, with them in the background, blocking."""
    from scalai.config import ParallelConfig

    devices = ParallelConfig.parse(args.layout).world_size
    scalai = str(Path(sys.executable).with_name("scalai"))
    work = Path(tempfile.mkdtemp(prefix="scalai-commit-overlap-"))
    kinds = ("none", "background", "blocking")
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    blocked: dict[str, list[float]] = {k: [] for k in kinds}  # rank 0's own count per commit
    try:
        for r in range(args.repeats):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                out = work / f"{kind}-{r}"
                commit = ["--commit-every", "0"] if kind == "none" else \
                    ["--commit-every", str(args.every), "--commit-mode", kind]
                cmd = [scalai, "run", "--steps", str(args.steps), "--hosts", "1", "--gpus-per-host", str(devices),
                       "--layout", args.layout, "--model", args.model, "--job", f"overlap-{kind}-{r}", *commit,
                       "--out", str(out)]
                log(f"round {r + 1}: {kind}")
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                samples[kind] += _step_times(out / "metrics.jsonl", args.warmup)
                report = json.loads((out / "events" / "g000" / "rank-00000.json").read_text())
                blocked[kind] += [c["blocked"] for c in report["commits"]]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mean = {k: sum(v) / len(v) for k, v in samples.items()}
    rows = []
    for kind, label in zip(kinds, ("no periodic commits", f"background commit every {args.every} steps",
                                   f"blocking commit every {args.every} steps")):
        st = Stats.of(samples[kind])
        waited = f"{Stats.of(blocked[kind]).median:.4f} ({len(blocked[kind])})" if blocked[kind] else ""
        rows.append([label, f"{mean[kind]:.4f}", f"{st.median:.4f}", f"{st.min:.4f}–{st.max:.4f}",
                     f"{mean[kind] / mean['none']:.3f}", waited])
    print_table(f"scalai run step time of {args.model} at {args.layout}, {args.steps} steps x {args.repeats} rounds",
                ["run", "mean s/step", "median", "min–max", "mean vs none", "s in a commit, median (n)"], rows, (),
                args.format)
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; torch {machine.get('torch')}; "
          f"load average (1 min) {os.getloadavg()[0]:.1f}. A step's time: between consecutive metrics rows (the "
          f"staging copy, the polls and the commit included; blocking: the whole upload and commit). 's in a "
          f"commit': what rank 0's loop spent in each commit by its own count (the report's 'blocked'; rank 0 "
          f"only, and only the commits recorded before the run's final save).")


if __name__ == "__main__":
    main()
