"""Elastic-job commands: ``scalai layouts`` (and, with the runner, ``run`` and ``scale``)."""

from __future__ import annotations

import click

from .main import cli
from .output import console, emit_json


@cli.command()
@click.argument("model")
@click.option("--devices", "-n", required=True, type=int, help="number of devices")
@click.option("--device-memory", "-M", default=80.0, show_default=True, type=float, help="GiB per device")
@click.option("--gpus-per-host", "-g", default=8, show_default=True, type=int)
@click.option("--global-batch", default=512, show_default=True, type=int, help="sequences per step")
@click.option("--seq-len", default=None, type=int, help="tokens per sequence [default: min(2048, model's)]")
@click.option("--recompute", is_flag=True, help="full activation recomputation")
@click.option("--top", default=10, show_default=True, type=int, help="rows to show")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def layouts(model, devices, device_memory, gpus_per_host, global_batch, seq_len, recompute, top, as_json):
    """Rank the (tp, pp, dp, zero) layouts of MODEL on N devices by estimated step time.

    Memory per device and step time follow the cost model documented in
    scalai/elastic/layouts.py (weights, gradients, Adam state, activations; compute,
    tensor/pipeline/data-parallel communication, pipeline bubble).
    """
    from ..elastic.layouts import Hardware, Workload, rank_layouts
    from ..models import get_model_shape

    shape = get_model_shape(model)
    hw = Hardware(device_memory_gib=device_memory, gpus_per_host=gpus_per_host)
    work = Workload(global_batch=global_batch, seq_len=seq_len or min(2048, shape.max_seq_len),
                    recompute=recompute)
    ranked = rank_layouts(shape, devices, hw, work)
    if not ranked:
        raise ValueError(f"no layout of {model} uses exactly {devices} devices (heads, layers "
                         f"and vocabulary must split); try another device count")
    if as_json:
        emit_json({"model": model, "devices": devices, "device_memory_gib": device_memory,
                   "layouts": [e.to_json() for e in ranked]})
        return
    from rich.table import Table

    table = Table("#", "layout", "fits", "memory GiB", "step s", "compute", "tp comm", "pp comm",
                  "dp comm", box=None, title=f"{model} on {devices} devices of {device_memory:g} GiB")
    for i, e in enumerate(ranked[:top], 1):
        b = e.breakdown
        table.add_row(str(i), str(e.config), "yes" if e.fits else "no", f"{e.memory_gib:.1f}",
                      f"{e.step_seconds:.3f}", f"{b['compute']:.3f}", f"{b['tp_comm']:.3f}",
                      f"{b['pp_comm']:.3f}", f"{b['dp_comm']:.3f}")
    console().print(table)
    fitting = sum(e.fits for e in ranked)
    console().print(f"{fitting} of {len(ranked)} layouts fit; best: {ranked[0].config}"
                    if fitting else f"none of {len(ranked)} layouts fits in {device_memory:g} GiB; "
                    f"use more devices, more memory or --recompute")
