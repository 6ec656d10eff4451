"""The schedule's failures, carried out: a worker killed, or a whole host gone.

``{"fail": RANK}`` sends ``SIGKILL`` to that rank's worker (its pid is in its report);
``{"fail": HOST}`` kills the host's agent with every worker it started (one session) and
its store, and deletes the store's memory-backed files: what a host that loses power
leaves behind. The runner then sees the generation fail and recovers
(:func:`scalai.elastic.transitions.recover`).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .events import read_generation

if TYPE_CHECKING:
    from .runner import Generation, Runner

__all__ = ["fire_failures", "fire_timed", "kill_rank", "kill_host", "detect_dead_stores"]


def fire_failures(runner: Runner, gen: Generation) -> None:
    """Carry out the step-triggered failures that are due (the step has been logged)."""
    done = runner.rows[-1]["step"] if runner.rows and runner.rows[-1]["generation"] == gen.number else -1
    for e in runner.spec.schedule:
        if e.action != "fail" or e.index in runner._fired or e.step is None or done < e.step:
            continue
        runner._fired.add(e.index)
        _fail(runner, gen, e.value, f"event {e.index}")


def fire_timed(runner: Runner) -> None:
    """Carry out the time-triggered events that are due (changes become requests)."""
    now = time.time() - runner._t0
    for e in runner.spec.schedule:
        if e.time is None or e.index in runner._fired or now < e.time:
            continue
        runner._fired.add(e.index)
        if e.action == "fail":
            _fail(runner, runner.gen, e.value, f"event {e.index}")
            continue
        try:
            runner.request(e.action, e.value)
        except ValueError as exc:
            runner.say(f"event {e.index} ({e.describe()}) skipped: {exc}")


def _fail(runner: Runner, gen: Generation, target, why: str) -> None:
    if isinstance(target, str):
        kill_host(runner, gen, target, why)
    else:
        kill_rank(runner, gen, target, why)


def kill_rank(runner: Runner, gen: Generation, rank: int, why: str) -> None:
    pid = read_generation(runner.dir, gen.number).get(rank, {}).get("pid")
    if rank >= gen.alloc.devices or pid is None:
        runner.say(f"{why}: rank {rank} is not running in {gen.alloc.layout}; nothing killed")
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    gen.killed.append(("rank", rank, time.time()))
    runner.say(f"{why}: killed the worker of rank {rank} (pid {pid}, {gen.alloc.host(rank)}) at step "
               f"{_step(runner)}")


def kill_host(runner: Runner, gen: Generation, host: str, why: str) -> None:
    if host not in gen.alloc.hosts:
        runner.say(f"{why}: {host} runs no worker of the job; nothing killed")
        return
    for a in gen.agents:
        if a.host == host:
            a.kill()
    runner.hosts.kill(runner.hosts.hosts.index(host))
    shutil.rmtree(Path(runner.hosts.root) / host, ignore_errors=True)  # its memory is gone
    gen.killed.append(("host", host, time.time()))
    runner.pool = runner.pool.fail_host(host)
    runner.say(f"{why}: host {host} died (its workers and its store) at step {_step(runner)}")


def _step(runner: Runner) -> int:
    return runner.rows[-1]["step"] if runner.rows else 0


def detect_dead_stores(runner: Runner, gen: Generation) -> None:
    """A store process of the generation's hosts that has exited means its host is gone:
    the host's workers are killed and the generation fails (a host found dead)."""
    for host in gen.alloc.hosts:
        proc = runner.hosts.procs[runner.hosts.hosts.index(host)]
        if host not in runner.pool.dead and (proc is None or proc.poll() is not None):
            kill_host(runner, gen, host, f"the store of {host} is gone")
