"""``scalai data``: index a corpus, show its global order and per-rank plans, mount it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from .group import cli
from .output import console, emit_json, human_bytes, progress
from .params import COUNT, NON_NEGATIVE, SEED


@cli.group()
def data() -> None:
    """Dataset state: exactly-once sample order across any change of DP."""


def _state_options(func: Callable) -> Callable:
    """--seed/--global-batch/--epoch/--consumed/--order, or --state FILE."""
    options = [
        click.option("--seed", type=SEED, default=None, help="seed of the global order"),
        click.option("--global-batch", type=COUNT, default=None, help="samples per optimizer step, all replicas"),
        click.option("--epoch", type=NON_NEGATIVE, default=0, show_default=True, help="epoch the count starts in"),
        click.option("--consumed", type=NON_NEGATIVE, default=0, show_default=True,
                     help="samples consumed since the start of --epoch (may exceed one epoch)"),
        click.option("--order", "order_name", default="feistel", show_default=True,
                     type=click.Choice(["feistel", "sequential"]), help="order algorithm"),
        click.option("--state", "state_file", type=click.Path(path_type=Path), default=None,
                     help="JSON file with a data state, or a checkpoint (its directory or manifest.json)"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_state(num_samples: int, seed: int | None, global_batch: int | None, epoch: int, consumed: int,
                order_name: str, state_file: Path | None):
    from ..data import DataState

    if state_file is not None:
        if seed is not None or global_batch is not None or epoch or consumed:
            raise ValueError("give --state or --seed/--global-batch/--epoch/--consumed, not both")
        return DataState.from_json(_state_json(state_file), num_samples=num_samples)
    missing = [name for name, value in (("--seed", seed), ("--global-batch", global_batch)) if value is None]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}; give them (or --state FILE)")
    if epoch < 0 or consumed < 0:
        raise ValueError(f"--epoch {epoch} and --consumed {consumed} must be >= 0")
    return DataState.at_position(epoch * num_samples + consumed, seed=seed, global_batch=global_batch,
                                 num_samples=num_samples, order=order_name)


def _state_json(path: Path) -> dict:
    """The data state in ``path``: a state file, or a checkpoint (directory or manifest),
    which keeps it under ``state.data`` (older files: a top-level ``data``)."""
    from ..bounded import read_json
    from ..checkpoint.manifest import FORMAT, MANIFEST_NAME, MAX_MANIFEST_BYTES

    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        obj = read_json(path, MAX_MANIFEST_BYTES, "--state", hint="; pass a data state file or a checkpoint")
    except FileNotFoundError:
        raise FileNotFoundError(f"--state {path} does not exist; pass a data state file or a checkpoint") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:  # a checkpoint's manifest
        data = obj.get("state", {}).get("data") if isinstance(obj.get("state"), dict) else None
        if not isinstance(data, dict):
            raise ValueError(f"checkpoint {path} records no data position (no state.data); it was "
                             f"saved without one: give --seed/--global-batch/--epoch/--consumed")
        return data
    if isinstance(obj, dict) and isinstance(obj.get("data"), dict):
        return obj["data"]
    return obj


def _division(global_batch: int, dp: int, micro_batch_size: int | None, num_micro_batches: int | None):
    from ..data import Division

    return Division(global_batch, dp, micro_batch_size, num_micro_batches)


def _micro_options(func: Callable) -> Callable:
    func = click.option("--num-micro-batches", type=COUNT, default=None,
                        help="same number of micro-batches on every rank")(func)
    return click.option("--micro-batch-size", type=COUNT, default=None,
                        help="largest micro-batch; ranks split their part into near-equal ones")(func)


@data.command("index")
@click.argument("inputs", nargs=-1, required=True)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seq-len", type=COUNT, required=True, help="tokens per sample (each sample holds seq_len + 1)")
@click.option("--tokenizer", default="bytes", show_default=True, help="tokenizer for raw text (bytes only)")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "tokens", "megatron", "text"]),
              help="auto: X.bin+X.idx is Megatron, other .bin are token files, the rest raw text")
@click.option("--dtype", default="uint16", show_default=True,
              type=click.Choice(["uint8", "uint16", "uint32", "int32", "int64"]), help="dtype of token files")
@click.option("--packing", default="stream", show_default=True, type=click.Choice(["stream", "document"]),
              help="stream: samples may cross file ends; document: never cross a document")
@click.option("--force", is_flag=True, help="replace an existing index at OUT")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def index_cmd(inputs: tuple[str, ...], out: Path, seq_len: int, tokenizer: str, fmt: str, dtype: str,
              packing: str, force: bool, as_json: bool) -> None:
    """Index INPUTS (files, directories, Megatron prefixes) into the directory OUT."""
    from ..data import build_index

    totals: list[int] = []
    bar_cm = None
    bar: list[Callable[[int], None]] = []

    def on_total(n: int) -> None:
        nonlocal bar_cm
        totals.append(n)
        bar_cm = progress("indexing samples", n, unit="samples")
        bar.append(bar_cm.__enter__())

    try:
        index = build_index(inputs, out, seq_len, fmt=fmt, dtype=dtype, tokenizer=tokenizer, packing=packing,
                            force=force, on_total=on_total, on_progress=lambda n: bar[0](n))
    finally:
        if bar_cm is not None:
            bar_cm.__exit__(*sys.exc_info())
    summary = {"index": str(out), "num_samples": index.num_samples, "seq_len": index.seq_len,
               "dtype": index.dtype, "packing": index.packing, "num_tokens": index.num_tokens,
               "sample_bytes": index.sample_bytes, "files": len(index.sources),
               "source_bytes": sum(s.size for s in index.sources)}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"indexed {summary['files']} files ({human_bytes(summary['source_bytes'])}, "
               f"{summary['num_tokens']:,} {index.dtype} tokens) into {index.num_samples:,} samples of "
               f"{seq_len} + 1 tokens ({index.packing} packing) at {out}")


@data.command("order")
@click.option("--index", "index_path", required=True, type=click.Path(path_type=Path), help="index directory")
@click.option("--seed", type=SEED, required=True, help="seed of the global order")
@click.option("--count", type=NON_NEGATIVE, required=True, help="how many ids to print")
@click.option("--start", type=NON_NEGATIVE, default=0, show_default=True, help="first position (samples since epoch 0)")
@click.option("--order", "order_name", default="feistel", show_default=True,
              type=click.Choice(["feistel", "sequential"]))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of ids")
def order_cmd(index_path: Path, seed: int, count: int, start: int, order_name: str, as_json: bool) -> None:
    """The first COUNT ids of the global order (from --start), across epochs."""
    from ..data import SampleIndex, global_order

    index = SampleIndex.open(index_path)
    if count < 0 or start < 0:
        raise ValueError(f"--count {count} and --start {start} must be >= 0")
    if count > 100_000_000:
        raise ValueError(f"--count {count} is more than 100,000,000 ids; print a window with --start")
    ids = global_order(start, count, index.num_samples, seed, order_name)
    if as_json:
        emit_json(ids.tolist())
        return
    n = index.num_samples
    for epoch in range(start // n, (start + count - 1) // n + 1 if count else start // n):
        lo, hi = max(start, epoch * n), min(start + count, (epoch + 1) * n)
        chunk = ids[lo - start: hi - start]
        click.echo(f"epoch {epoch}, positions {lo}..{hi - 1} (of {n} per epoch):")
        click.echo("  " + " ".join(str(i) for i in chunk))


@data.command("plan")
@click.option("--index", "index_path", required=True, type=click.Path(path_type=Path), help="index directory")
@_state_options
@click.option("--dp", type=COUNT, required=True, help="data-parallel degree")
@click.option("--steps", type=COUNT, default=1, show_default=True, help="steps to show")
@_micro_options
@click.option("--json", "as_json", is_flag=True, help="JSON: a list over steps of a list over ranks of id lists")
def plan_cmd(index_path: Path, seed, global_batch, epoch, consumed, order_name, state_file, dp: int, steps: int,
             micro_batch_size, num_micro_batches, as_json: bool) -> None:
    """The global sample ids each rank reads in each of the next --steps steps."""
    from ..data import SampleIndex, plan_table

    index = SampleIndex.open(index_path)
    state = _load_state(index.num_samples, seed, global_batch, epoch, consumed, order_name, state_file)
    division = _division(state.global_batch, dp, micro_batch_size, num_micro_batches)
    from ..data.division import MAX_WINDOW

    if steps * state.global_batch > MAX_WINDOW:
        raise ValueError(f"--steps {steps} of {state.global_batch} samples are more than the {MAX_WINDOW:,} "
                         f"samples a plan shows; show fewer steps")
    table = plan_table(state, division, steps)
    if as_json:
        emit_json(table)
        return
    from rich.table import Table

    grid = Table(title=f"epoch {state.epoch}, consumed {state.consumed} of {state.num_samples}; "
                       f"global batch {state.global_batch} over dp={dp}")
    grid.add_column("step", justify="right")
    for r in range(dp):
        grid.add_column(f"rank {r} ({len(table[0][r])})")
    for s, row in enumerate(table):
        grid.add_row(str(s), *(" ".join(map(str, ids)) for ids in row))
    console().print(grid)


@data.command("mount")
@click.argument("index_path", metavar="INDEX", type=click.Path(path_type=Path))
@click.argument("mountpoint", type=click.Path(path_type=Path))
@_state_options
@click.option("--dp", type=COUNT, required=True, help="data-parallel degree (one directory per rank)")
@click.option("--steps", type=COUNT, default=8, show_default=True, help="upcoming steps shown per rank")
@_micro_options
@click.option("--threads", type=COUNT, default=8, show_default=True, help="FUSE worker threads")
def mount_cmd(index_path: Path, mountpoint: Path, seed, global_batch, epoch, consumed, order_name, state_file,
              dp: int, steps: int, micro_batch_size, num_micro_batches, threads: int) -> None:
    """Serve each rank's upcoming samples under MOUNTPOINT until Ctrl-C or SIGTERM.

    Write a JSON object to MOUNTPOINT/state.json to change the view, e.g.
    echo '{"dp": 3}' > MOUNTPOINT/state.json   or   '{"advance": 1}' after a step.
    """
    from ..data import MountConfig, SampleIndex
    from ..data.vfs import fuse_unavailable_reason, mount

    reason = fuse_unavailable_reason()
    if reason:
        from ..data.vfs import FuseUnavailable

        raise FuseUnavailable(reason)
    index = SampleIndex.open(index_path, verify=True)
    state = _load_state(index.num_samples, seed, global_batch, epoch, consumed, order_name, state_file)
    config = MountConfig(state, _division(state.global_batch, dp, micro_batch_size, num_micro_batches), steps)

    def ready() -> None:
        click.echo(f"scalai: mounted {index_path} at {mountpoint} (dp={dp}, {steps} steps per rank); "
                   f"Ctrl-C or SIGTERM unmounts", err=True)

    mount(index, mountpoint, config, on_ready=ready, threads=threads)
    click.echo(f"scalai: unmounted {mountpoint}", err=True)
