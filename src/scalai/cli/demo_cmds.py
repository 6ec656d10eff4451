"""Demonstrations: ``scalai demo-reshard`` runs a real reshard end to end and checks it."""

from __future__ import annotations

import os
import tempfile
import time

import click

from .group import cli
from .output import console, human_bytes, layout_option
from .params import COUNT


@cli.command("demo-reshard")
@click.option("--model", "-m", default="llama-tiny", show_default=True,
              help="model shape (llama-tiny has GQA, SwiGLU and vocabulary padding)")
@layout_option("--from", "from_layout", required=False, help="starting layout [default: tp=2,pp=2,dp=2]")
@layout_option("--to", "to_layout", required=False, help="target layout [default: tp=4,pp=1,dp=2,zero=1]")
@click.option("--gpus-per-host", "-g", default=4, show_default=True, type=COUNT, help="devices per host")
@click.option("--out", type=click.Path(), default=None, help="keep the checkpoints in this new directory")
def demo_reshard(model, from_layout, to_layout, gpus_per_host, out) -> None:
    """Synthesize a checkpoint, plan and run a reshard, and prove it exact.

    Writes MODEL in the starting layout, shows the plan to the target layout, reshards,
    checks the result against the same model synthesized directly in the target layout,
    reshards back and checks the round trip bit for bit, then verifies every checksum.
    """
    from ..checkpoint import Checkpoint
    from ..compare import compare_checkpoints
    from ..config import ParallelConfig, Placement
    from ..reshard import reshard_checkpoint
    from ..models.synth import write_synthetic_checkpoint
    from .output import hosts_table, stats_table

    src = from_layout or ParallelConfig.parse("tp=2,pp=2,dp=2")
    dst = to_layout or ParallelConfig.parse("tp=4,pp=1,dp=2,zero=1")
    if out is not None and os.path.lexists(out):
        raise FileExistsError(f"output {out} already exists; choose a new directory")
    work = out or tempfile.mkdtemp(prefix="scalai-demo-")
    os.makedirs(work, exist_ok=True)
    say = console().print
    place = Placement(gpus_per_host)
    path = {k: os.path.join(work, k) for k in ("before", "after", "expected", "back")}

    def step(n, text):
        say(f"\n[bold]{n}. {text}[/bold]")

    step(1, f"synthesize {model} in {src} ({src.world_size} ranks, {gpus_per_host} GPUs per host)")
    write_synthetic_checkpoint(model, path["before"], src, seed=7)
    with Checkpoint.open(path["before"]) as c:
        say(f"   {path['before']}: {len(c.ptc.specs)} tensors, "
            f"{human_bytes(sum(r.nbytes for r in c.manifest.ranks))} in {src.world_size} rank files")

    step(2, f"reshard {src} -> {dst}")
    plan, seconds = reshard_checkpoint(path["before"], path["after"], dst, placement=place)
    say(stats_table(plan.stats, seconds.plan))
    if plan.stats.cross_host_bytes:
        say(hosts_table(plan.stats))
    say(f"   wrote {path['after']} in {float(seconds):.2f} s "
        f"(plan {seconds.plan:.2f} s, copy {seconds.copy:.2f} s, checksum {seconds.checksum:.2f} s, "
        f"fsync {seconds.sync:.2f} s); cross-host bytes "
        f"{'equal' if plan.stats.cross_host_bytes == plan.stats.cross_host_lower_bound_bytes else 'EXCEED'}"
        f" the lower bound")

    step(3, f"check against {model} synthesized directly in {dst}")
    write_synthetic_checkpoint(model, path["expected"], dst, seed=7)
    ok = _same(path["after"], path["expected"], compare_checkpoints, Checkpoint, say)

    step(4, f"reshard back to {src} and compare with the original")
    reshard_checkpoint(path["after"], path["back"], src, placement=place)
    ok &= _same(path["before"], path["back"], compare_checkpoints, Checkpoint, say)

    step(5, "verify every checksum of the resharded checkpoint")
    t0 = time.perf_counter()
    with Checkpoint.open(path["after"]) as c:
        c.verify()
        count = sum(len(r.tensors) for r in c.manifest.ranks)
    say(f"   {count} checksums match ({time.perf_counter() - t0:.2f} s)")

    if out is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"\ncheckpoints kept in {work}")
    if not ok:
        raise click.ClickException("the reshard did not reproduce the state; see above")
    say("\n[bold green]done: the state survived the change of layout bit for bit[/bold green]")


def _same(a, b, compare_checkpoints, Checkpoint, say) -> bool:
    with Checkpoint.open(a) as ca, Checkpoint.open(b) as cb:
        diff = compare_checkpoints(ca, cb)
    if diff is None:
        say(f"   equal: {os.path.basename(a)} and {os.path.basename(b)} hold the same global tensors and state")
        return True
    say(f"   [red]different: {diff}[/red]")
    return False


@cli.command("demo")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="new directory for the run [default: ./scalai-demo, or -2, -3... if it exists]")
@click.option("--data", type=click.Path(), default=None, help="sample index [default: the stdlib corpus]")
def demo(out, data) -> None:
    """The main job: a training run that grows, shrinks, changes tp, pp and dp, moves to
    other hosts and survives a killed worker, on simulated hosts on this machine.

    Runs gpt-tiny under the embedded schedule (scalai.elastic.demo), then the same job
    unchanged, prints the timeline of every reconfiguration and checks that every sample
    was read exactly once and the loss follows the unchanged run; writes loss.png (loss vs
    the unchanged run, changes marked) and timeline.png (phases). A few minutes on 2 cores.
    """
    from pathlib import Path

    from ..elastic.demo import new_demo_dir, run_demo
    from ..elastic.run_cli import stop_on_sigterm

    target = Path(out) if out else new_demo_dir()
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"output {target} already exists and is not empty; choose a new --out")
    stop_on_sigterm()
    _, _, check = run_demo(target, data, say=click.echo)
    if not check.ok:
        raise click.ClickException("the elastic run did not follow the unchanged run; see above")
