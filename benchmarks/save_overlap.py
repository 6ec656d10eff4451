"""Step time of the reference trainer with a background save every K steps, against the
same run without saves (issue 13's target: within 10 %).

Both runs are ``scalai train`` (torchrun, gloo, one process per rank) of the same model,
layout, seed and steps, one after the other, ``--repeats`` times interleaved. The saving
run adds ``--save ROOT --save-every K``: every K steps each rank copies its tensors into
host memory and a thread writes them (a directory, or with ``--storage s3`` moto's S3
server started here on loopback); the next save commits it. A step's time is the wall
time between consecutive rows of the metrics file (so it includes the staging copy and
the commit of the previous save, not only forward/backward), over every step after the
first ``--warmup``; the final (synchronous) save after the last step is not counted.

Usage::

    .venv/bin/python benchmarks/save_overlap.py                      # gpt-bench, dp=2, K=5
    .venv/bin/python benchmarks/save_overlap.py --model gpt-tiny --steps 12 --repeats 1   # smoke test
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
    parser.add_argument("--format", default="rich", choices=["rich", "markdown", "plain"])
    args = parser.parse_args()
    if args.steps <= args.warmup + args.every:
        raise SystemExit("--steps must exceed --warmup + --every, or no save falls inside the timed steps")
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


if __name__ == "__main__":
    main()
