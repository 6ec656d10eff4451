"""Checkpoint commands: synth, inspect, plan, reshard, compare."""

from __future__ import annotations

import os
import time

import click

from .group import cli
from .interop_cmds import dcp_model_option, dcp_source, inspect_dcp, reshard_dcp, rules_option
from .output import console, emit_json, hosts_table, human_bytes, layout_option, progress, stats_table
from .params import COUNT, SEED


def _shown(location: str) -> str:
    """:func:`scalai.locations.shown`, imported when first needed (the CLI starts fast)."""
    from ..locations import shown

    return shown(location)


def _placement(gpus_per_host: int):
    from ..config import Placement

    return Placement(gpus_per_host)


@cli.command()
@click.argument("model")
@click.argument("out", type=click.Path())
@layout_option("--layout", "-l")
@click.option("--seed", default=0, show_default=True, type=SEED, help="seed of the synthetic values")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def synth(model: str, out: str, layout, seed: int, as_json: bool) -> None:
    """Write a checkpoint of MODEL in LAYOUT with deterministic values (optimizer state included).

    MODEL is one of gpt-tiny, llama-tiny, gpt2-small, gpt3-1.3b, gpt3-2.7b, gpt3-6.7b, gpt3-175b.
    Values depend only on the global position, so the same model synthesized in two layouts
    holds the same global tensors.
    """
    from ..checkpoint.limits import reserve_descriptors
    from ..models import model_ptc
    from ..models.synth import stored_nbytes, write_synthetic_checkpoint

    reserve_descriptors(layout.world_size, "a checkpoint")  # before building anything per rank
    ptc = model_ptc(model, layout)
    total = stored_nbytes(ptc)
    t0 = time.perf_counter()
    with progress(f"synth {model}", total, enabled=not as_json) as advance:
        write_synthetic_checkpoint(model, out, layout, seed, progress=advance)
    seconds = time.perf_counter() - t0
    if as_json:
        emit_json({"checkpoint": _shown(out), "model": model, "layout": str(layout),
                   "bytes": total, "seconds": seconds})
    else:
        click.echo(f"wrote {out}: {model} in {layout}, {layout.world_size} ranks, "
                   f"{human_bytes(total)} in {seconds:.1f} s")


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("--verify", is_flag=True, help="recompute every checksum")
@click.option("--tensors", "show_tensors", is_flag=True, help="list every tensor")
@dcp_model_option
@rules_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(ckpt: str, verify: bool, show_tensors: bool, model: str | None, rules_path: str | None,
            as_json: bool) -> None:
    """Show a checkpoint's layout, tensors and sizes; --verify checks every checksum.

    CKPT is a directory or a URL (s3://BUCKET/PREFIX, gs://, az://, ...), or a PyTorch DCP
    directory: its tensors, chunks and bytes, and (with --model M or --rules FILE) the
    scalai tensors they map onto."""
    from ..locations import open_source
    from ..storage.verify import verify_source

    if dcp_source(ckpt, model, rules_path):
        inspect_dcp(ckpt, model, rules_path, verify, show_tensors, as_json)
        return
    with open_source(ckpt) as c:
        ptc = c.ptc
        per_rank = [r.nbytes for r in c.manifest.ranks]
        params = [s for s in ptc.specs if not s.is_optimizer_state]
        info = {
            "checkpoint": _shown(ckpt),
            "model": c.state.get("model"),
            "layout": str(ptc.config),
            "world_size": ptc.config.world_size,
            "tensors": len(ptc.specs),
            "parameters": sum(s.numel for s in params),
            "global_bytes": sum(s.nbytes for s in ptc.specs),
            "stored_bytes": sum(per_rank),
            "rank_bytes": {"min": min(per_rank), "max": max(per_rank)},
            "step": c.state.get("step"),
            "data": c.state.get("data"),
        }
        if verify:
            t0 = time.perf_counter()
            verify_source(c)
            info["verified"] = {"checksums": sum(len(r.tensors) for r in c.manifest.ranks),
                                "seconds": round(time.perf_counter() - t0, 3)}
        if show_tensors or as_json:
            info["tensor_list"] = [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "split": s.split.kind,
                 "residence": s.residence.to_json()} for s in ptc.specs]
    if as_json:
        emit_json(info)
        return
    out = console()
    out.print(f"[bold]{info['checkpoint']}[/bold]")
    out.print(f"  model      {info['model'] or '(not recorded)'}")
    out.print(f"  layout     {info['layout']}  ({info['world_size']} ranks)")
    out.print(f"  tensors    {info['tensors']} ({len(params)} parameters, "
              f"{info['parameters']:,} parameter elements)")
    out.print(f"  bytes      {human_bytes(info['global_bytes'])} global state, "
              f"{human_bytes(info['stored_bytes'])} stored")
    out.print(f"  per rank   {human_bytes(min(per_rank))} .. {human_bytes(max(per_rank))}")
    if info["step"] is not None:
        out.print(f"  step       {info['step']}")
    if info["data"]:
        d = info["data"]
        out.print(f"  data       epoch {d.get('epoch')}, {d.get('consumed')} samples consumed, "
                  f"global batch {d.get('global_batch')}, seed {d.get('seed')}")
    if verify:
        v = info["verified"]
        out.print(f"  verified   all {v['checksums']} checksums match ({v['seconds']:.2f} s)")
    if show_tensors:
        from rich.table import Table

        table = Table("tensor", "shape", "dtype", "split", "stages", box=None)
        for t in info["tensor_list"]:
            table.add_row(t["name"], "x".join(map(str, t["shape"])), t["dtype"], t["split"], t["residence"])
        out.print(table)


@cli.command()
@click.argument("ckpt", required=False, type=click.Path())
@click.option("--model", "-m", help="plan for a named model's shapes instead of a checkpoint")
@layout_option("--from", "from_layout", required=False, help="old layout (with --model)")
@layout_option("--to", "to_layout")
@click.option("--gpus-per-host", "-g", default=8, show_default=True, type=COUNT,
              help="devices per host (both layouts)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plan(ckpt, model, from_layout, to_layout, gpus_per_host: int, as_json: bool) -> None:
    """Plan a change of layout and show what moves where.

    Give a checkpoint (CKPT) or a model and its current layout (--model M --from L).
    Planning touches no data: shapes only, so GPT-3 175B plans in seconds.
    """
    from ..planner import Deployment, make_plan

    if (ckpt is None) == (model is None):
        raise click.UsageError("give either a checkpoint or --model with --from")
    if ckpt is not None:
        from ..locations import open_source

        with open_source(ckpt) as c:
            old_ptc = c.ptc
        new_ptc = old_ptc.relayout(to_layout)
    else:
        from ..models import model_ptc

        if from_layout is None:
            raise click.UsageError("--model needs --from LAYOUT (the current layout)")
        old_ptc, new_ptc = model_ptc(model, from_layout), model_ptc(model, to_layout)
    place = _placement(gpus_per_host)
    t0 = time.perf_counter()
    result = make_plan(Deployment(old_ptc, place), Deployment(new_ptc, place))
    seconds = time.perf_counter() - t0
    if as_json:
        emit_json({"from": str(old_ptc.config), "to": str(new_ptc.config), "gpus_per_host": gpus_per_host,
                   "plan_seconds": round(seconds, 3), **result.stats.to_json()})
        return
    out = console()
    out.print(f"{old_ptc.config} -> {new_ptc.config}, {gpus_per_host} GPUs per host "
              f"({old_ptc.config.world_size} -> {new_ptc.config.world_size} ranks)")
    out.print(stats_table(result.stats, seconds))
    if result.stats.cross_host_bytes:
        out.print(hosts_table(result.stats))


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.argument("out", type=click.Path())
@layout_option("--to", "to_layout")
@click.option("--gpus-per-host", "-g", default=None, type=COUNT,
              help="devices per host for the plan statistics (default: one host)")
@click.option("--workers", "-j", default=None, type=COUNT, help="copy threads (default: one per core)")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="check the source's checksums during the copy, before the commit (--no-verify: a "
                   "damaged tensor that moves unchanged keeps a checksum that exposes it, but one that is "
                   "re-laid out gets a new checksum of its damaged bytes)")
@dcp_model_option
@rules_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def reshard(ckpt: str, out: str, to_layout, gpus_per_host, workers, verify: bool, model: str | None,
            rules_path: str | None, as_json: bool) -> None:
    """Rewrite checkpoint CKPT in another layout as OUT (CKPT is never modified).

    CKPT and OUT are directories or URLs (s3://BUCKET/PREFIX, gs://, az://, ...). The
    source's checksums are verified while the copy runs, and OUT is committed only when
    they all match (--no-verify skips that pass), so a corrupted checkpoint is never
    silently propagated into a new layout.

    CKPT may be a PyTorch DCP directory, with --model M or --rules FILE (how its keys map
    onto scalai's tensors): the same as scalai import dcp, read from its chunks in place.
    """
    if dcp_source(ckpt, model, rules_path):
        reshard_dcp(ckpt, out, to_layout, model, rules_path, workers, verify, as_json)
        return
    from ..checkpoint.limits import reserve_descriptors
    from ..reshard import Reshard

    reserve_descriptors(to_layout.world_size, "the new checkpoint")
    placement = _placement(gpus_per_host) if gpus_per_host is not None else None
    with Reshard(ckpt, out, to_layout, placement) as job, \
            progress("reshard", job.total_bytes, enabled=not as_json) as advance:
        seconds = job.run(workers=workers, progress=advance, verify=verify)
    result, old = job.plan, job.old
    moved = result.stats.total_bytes
    verify_seconds = seconds.checked
    if as_json:
        emit_json({"checkpoint": _shown(out), "from": str(old), "to": str(to_layout),
                   "seconds": round(float(seconds), 3),
                   "phases": {"verified_alongside": round(verify_seconds, 3),
                              **{k: round(v, 3) for k, v in seconds.__dict__.items()}},
                   "runner": {k: round(v, 3) for k, v in seconds.run.seconds.items()
                              if k not in ("total", "verify", "verify_wait")},
                   "throughput_bytes_per_s": moved / float(seconds), **result.stats.to_json()})
        return
    out_c = console()
    out_c.print(f"{old} -> {to_layout}: wrote {_shown(out)}")
    out_c.print(stats_table(result.stats, title="plan"))
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.__dict__.items())
    if verify:
        phases = (f"source verified during the copy (the tensors it does not read whole: {verify_seconds:.2f} s "
                  f"alongside); " + phases)
    out_c.print(f"{human_bytes(moved)} in {float(seconds):.2f} s "
                f"({human_bytes(moved / float(seconds))}/s; {phases})")


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def compare(a: str, b: str, as_json: bool) -> None:
    """Exit 0 when A and B hold the same global tensors and state bit for bit, whatever their
    layouts; otherwise name the first difference and exit 1. A and B are directories or
    URLs (s3://BUCKET/PREFIX, ...): a copy on object storage compares against a local one."""
    from ..compare import compare_checkpoints
    from ..locations import open_source

    with open_source(a) as ca, open_source(b) as cb:
        diff = compare_checkpoints(ca, cb)
        layouts = (str(ca.ptc.config), str(cb.ptc.config))
    if as_json:
        emit_json({"equal": diff is None, "difference": None if diff is None else str(diff),
                   "a": layouts[0], "b": layouts[1]})
    elif diff is None:
        click.echo(f"equal: {_shown(a)} ({layouts[0]}) and {_shown(b)} ({layouts[1]}) hold the same state")
    else:
        click.echo(f"different: {diff}")
    if diff is not None:
        raise click.exceptions.Exit(1)
