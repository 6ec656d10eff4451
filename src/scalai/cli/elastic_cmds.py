"""Elastic-job commands: ``scalai layouts`` (and, with the runner, ``run`` and ``scale``)."""

from __future__ import annotations

import click

from .group import cli
from .output import console, emit_json
from .params import COUNT, NON_NEGATIVE, PORT, POSITIVE_NUMBER, SEED


@cli.command()
@click.argument("model")
@click.option("--devices", "-n", required=True, type=COUNT, help="number of devices")
@click.option("--device-memory", "-M", default=80.0, show_default=True, type=POSITIVE_NUMBER, help="GiB per device")
@click.option("--gpus-per-host", "-g", default=8, show_default=True, type=COUNT)
@click.option("--global-batch", default=512, show_default=True, type=COUNT, help="sequences per step")
@click.option("--seq-len", default=None, type=COUNT, help="tokens per sequence [default: min(2048, model's)]")
@click.option("--recompute", is_flag=True, help="full activation recomputation")
@click.option("--top", default=10, show_default=True, type=COUNT, help="rows to show")
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


@cli.command("run")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None,
              help="JSON list of events: {\"step\": S, \"devices\": N}, {\"step\": S, \"layout\": L}, "
                   "{\"step\": S, \"fail\": RANK|HOST}, {\"step\": S, \"redeploy\": true}; \"time\": SECONDS "
                   "instead of \"step\" [default: none]")
@click.option("--steps", type=COUNT, required=True, help="total optimizer steps of the job")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="new run directory")
@click.option("--model", "-m", default="gpt-tiny", show_default=True, help="gpt-tiny, gpt-small or gpt-bench")
@click.option("--hosts", "-H", default=2, show_default=True, type=COUNT, help="simulated hosts (one store each)")
@click.option("--gpus-per-host", "-g", default=2, show_default=True, type=COUNT, help="devices per host")
@click.option("--layout", "-l", default=None, help="starting layout [default: the best for --devices]")
@click.option("--devices", "-n", default=None, type=COUNT, help="starting devices [default: one host's]")
@click.option("--job", default="job", show_default=True, help="the job's name (stores, scalai scale)")
@click.option("--commit-every", default=10, show_default=True, type=NON_NEGATIVE,
              help="commit the state to the stores every N steps, copied to disk in the background (0: only at changes)")
@click.option("--start-ahead/--no-start-ahead", default=True, show_default=True,
              help="start the next generation's workers before a change (scheduled: a few steps ahead; a "
                   "request: at once); off: once the old workers have saved")
@click.option("--link", default=None, help="simulated link between hosts' stores, e.g. 1gbit [default: unlimited]")
@click.option("--global-batch", default=8, show_default=True, type=COUNT)
@click.option("--micro-batch", default=4, show_default=True, type=COUNT)
@click.option("--lr", default=1e-3, show_default=True, type=POSITIVE_NUMBER)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--data", type=click.Path(), default=None, help="sample index [default: the stdlib corpus]")
@click.option("--device-memory", default=80.0, show_default=True, type=POSITIVE_NUMBER, help="GiB per device (cost model)")
@click.option("--module", default="scalai.examples.gpt", show_default=True,
              help="the workers' module (python -m MODULE): the reference trainer, or your script taking its "
                   "arguments and following scalai.elastic.worker's protocol")
@click.option("--compare", is_flag=True, help="also run the job unchanged (no events) and plot against it")
@click.option("--control-host", default="127.0.0.1", show_default=True, help="address of the control endpoint")
@click.option("--control-port", default=0, show_default=True, type=PORT, help="port of the control endpoint (0: any)")
@click.option("--control-token-file", type=click.Path(dir_okay=False), default=None,
              help="token required by the control endpoint (needed off loopback)")
def run_cmd(schedule_file, steps, out, model, hosts, gpus_per_host, layout, devices, job, commit_every, start_ahead,
            link, global_batch, micro_batch, lr, seed, data, device_memory, module, compare, control_host, control_port,
            control_token_file) -> None:
    """Train under a changing device allocation: grow, shrink, move, survive failures.

    One torchrun agent per (simulated) host and a store per host; on every change all
    workers stop after the same step and save to their hosts' stores, the state is
    transformed in the stores into the new layout, and the workers relaunch and load it.
    Writes OUT/metrics.jsonl, OUT/timeline.json, OUT/timeline.png and OUT/loss.png.

    \b
    scalai run --schedule sched.json --steps 40 --hosts 4 --gpus-per-host 2 --out run1
    scalai scale job 4          # from another shell: move the running job to 4 devices
    """
    from ..elastic.run_cli import run_from_cli

    run_from_cli(schedule_file=schedule_file, steps=steps, out=out, model=model, hosts=hosts,
                 gpus_per_host=gpus_per_host, layout=layout, devices=devices, job=job, commit_every=commit_every,
                 start_ahead=start_ahead, link=link, global_batch=global_batch, micro_batch=micro_batch, lr=lr,
                 seed=seed, data=data, device_memory=device_memory, module=module, compare=compare,
                 control_host=control_host, control_port=control_port, control_token_file=control_token_file)


@cli.command("scale")
@click.argument("job")
@click.argument("devices", required=False, type=COUNT)
@click.option("--layout", "-l", default=None, help="move to this layout instead of a device count")
@click.option("--redeploy", is_flag=True, help="move the job to hosts it does not use")
@click.option("--url", default=None, help="the runner's control endpoint [default: found by the job's name]")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="the control endpoint's token")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def scale_cmd(job, devices, layout, redeploy, url, token_file, as_json) -> None:
    """Ask the running job JOB (scalai run --job JOB) to move to DEVICES devices.

    Every worker stops after the same step; the runner picks the best layout for that many
    devices (or --layout), transforms the state and relaunches.
    """
    from ..elastic.control import find_endpoint, send_scale
    from ..store.client import load_token

    given = [x for x in (devices is not None, layout is not None, redeploy) if x]
    if len(given) != 1:
        raise click.UsageError("give DEVICES, --layout L or --redeploy (one of them)")
    body = {"devices": devices} if devices is not None else {"layout": layout} if layout else {"redeploy": True}
    answer = send_scale(url or find_endpoint(job), body, load_token(token_file))
    if as_json:
        emit_json(answer)
        return
    a = answer["accepted"]
    console().print(f"job {job}: stopping after the current step, then {a['layout']} on {', '.join(a['hosts'])}")
