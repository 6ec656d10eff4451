"""Elastic-job commands: ``scalai layouts`` (and, with the runner, ``run`` and ``scale``)."""

from __future__ import annotations

import click

from .group import cli
from .output import console, emit_json
from .params import COUNT, NON_NEGATIVE, POSITIVE_NUMBER, SEED
from .tls_options import make_tls, tls_client_option, tls_server_options


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


@cli.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False), default=None,
              help="JSON list of events: {\"step\": S, \"devices\": N}, {\"step\": S, \"layout\": L}, "
                   "{\"step\": S, \"fail\": RANK|HOST}, {\"step\": S, \"redeploy\": true}; \"time\": SECONDS "
                   "instead of \"step\" [default: none]")
@click.option("--steps", type=COUNT, required=True,
              help="the job's total optimizer steps (a resumed job stops there too)")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="new run directory")
@click.option("--listen", default=None, help="HOST:PORT where agents started elsewhere join (with --agents) "
                                             "[default: 127.0.0.1, any port, agents started here]")
@click.option("--agents", type=COUNT, default=None, help="agents to wait for at --listen before the job starts")
@click.option("--hosts", "-H", default=2, show_default=True, type=COUNT,
              help="without --agents: agents to start on this machine (one store each)")
@click.option("--gpus-per-host", "-g", default=2, show_default=True, type=COUNT,
              help="without --agents: devices per local agent")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="the run's token: agents, stores, scalai scale (required off loopback; or SCALAI_TOKEN)")
@tls_server_options
@click.option("--resume", is_flag=True, help="a coordinator started again: continue the job (--job) from the "
                                             "newest version in its agents' stores")
@click.option("--module", default="scalai.examples.gpt", show_default=True,
              help="the workers' module (python -m MODULE): the reference trainer, or your script, which gets "
                   "the arguments after -- and follows scalai.elastic.worker's protocol")
@click.option("--model", "-m", default="gpt-tiny", show_default=True, help="reference trainer: gpt-tiny, gpt-small "
                                                                        "or gpt-bench")
@click.option("--layout", "-l", default=None, help="starting layout [default: the best for --devices]")
@click.option("--devices", "-n", default=None, type=COUNT, help="starting devices [default: one host's]")
@click.option("--job", default="job", show_default=True, help="the job's name (stores, scalai scale)")
@click.option("--commit-every", default=10, show_default=True, type=NON_NEGATIVE,
              help="commit the state to the stores every N steps, copied to disk in the background (0: only at changes)")
@click.option("--commit-mode", default="background", show_default=True, type=click.Choice(["background", "blocking"]),
              help="background: a commit's step returns once the shards are staged in host memory, the stores "
                   "get them meanwhile; blocking: the step waits for the whole write")
@click.option("--persist", "persist_to", default=None, metavar="URL",
              help="where the background copies of every commit go: a directory or a URL (s3://BUCKET/PREFIX, "
                   "gs://, az://; credentials from the backend's environment) [default: OUT/checkpoints]")
@click.option("--start-ahead/--no-start-ahead", default=True, show_default=True,
              help="start the next generation's workers before a change (scheduled: a few steps ahead; a "
                   "request: at once); off: once the old workers have saved")
@click.option("--grow/--no-grow", default=True, show_default=True,
              help="grow into the devices of agents that join during the run")
@click.option("--max-devices", type=COUNT, default=None, help="grow to at most this many devices")
@click.option("--dead-after", default=5.0, show_default=True, type=POSITIVE_NUMBER,
              help="seconds without a heartbeat after which a machine counts as dead")
@click.option("--standby", type=NON_NEGATIVE, default=None,
              help="local agents: started workers each keeps [default: one per device]")
@click.option("--link", default=None, help="local agents: simulated link between their stores, e.g. 1gbit")
@click.option("--global-batch", default=8, show_default=True, type=COUNT, help="reference trainer")
@click.option("--micro-batch", default=4, show_default=True, type=COUNT, help="reference trainer")
@click.option("--lr", default=1e-3, show_default=True, type=POSITIVE_NUMBER, help="reference trainer")
@click.option("--seed", default=0, show_default=True, type=SEED, help="reference trainer")
@click.option("--data", type=click.Path(), default=None, help="reference trainer: a sample index present on every "
                                                            "machine [default: each builds the stdlib corpus]")
@click.option("--device-memory", default=80.0, show_default=True, type=POSITIVE_NUMBER, help="GiB per device (cost model)")
@click.option("--compare", is_flag=True, help="also run the job unchanged (no events) and plot against it")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_cmd(schedule_file, steps, out, listen, agents, hosts, gpus_per_host, token_file, tls_cert, tls_key, tls_ca, resume,
            module, model, layout, devices, job, commit_every, commit_mode, persist_to, start_ahead, grow, max_devices,
            dead_after, standby, link, global_batch,
            micro_batch, lr, seed, data, device_memory, compare, args) -> None:
    """Train under a changing device allocation: grow, shrink, move, survive failures.

    One agent per machine (scalai agent) and a store on each; on every change all workers
    stop after the same step and save to their machines' stores, the state is transformed
    in the stores into the new layout, and workers (started ahead) load it. Without
    --agents the run starts --hosts agents on this machine. Writes OUT/metrics.jsonl,
    OUT/timeline.json, OUT/timeline.png and OUT/loss.png.

    \b
    scalai run --schedule sched.json --steps 40 --hosts 4 --gpus-per-host 2 --out run1
    scalai run --listen 10.0.0.1:29400 --agents 4 --token-file token --steps 1000 --out run1 \\
               --module my_trainer -- --my-option 3
    scalai scale job 4          # from another shell: move the running job to 4 devices
    """
    from ..elastic.run_cli import run_from_cli

    run_from_cli(schedule_file=schedule_file, steps=steps, out=out, listen=listen, agents=agents, hosts=hosts,
                 gpus_per_host=gpus_per_host, token_file=token_file, tls=make_tls(tls_cert, tls_key, tls_ca),
                 resume=resume, module=module, model=model,
                 layout=layout, devices=devices, job=job, commit_every=commit_every, commit_mode=commit_mode,
                 persist_to=persist_to,
                 start_ahead=start_ahead, grow=grow,
                 max_devices=max_devices, dead_after=dead_after, standby=standby, link=link,
                 global_batch=global_batch, micro_batch=micro_batch, lr=lr, seed=seed, data=data,
                 device_memory=device_memory, compare=compare, args=tuple(args))


@cli.command("scale")
@click.argument("job")
@click.argument("devices", required=False, type=COUNT)
@click.option("--layout", "-l", default=None, help="move to this layout instead of a device count")
@click.option("--redeploy", is_flag=True, help="move the job to hosts it does not use")
@click.option("--url", default=None, help="the runner's control endpoint [default: found by the job's name]")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="the control endpoint's token")
@tls_client_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def scale_cmd(job, devices, layout, redeploy, url, token_file, tls_ca, as_json) -> None:
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
    answer = send_scale(url or find_endpoint(job), body, load_token(token_file), tls=make_tls(tls_ca=tls_ca))
    if as_json:
        emit_json(answer)
        return
    a = answer["accepted"]
    console().print(f"job {job}: stopping after the current step, then {a['layout']} on {', '.join(a['hosts'])}")
