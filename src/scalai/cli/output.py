"""Shared CLI output: JSON, tables, byte sizes and progress bars."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

import click

from ..units import human_bytes

__all__ = ["emit_json", "human_bytes", "console", "progress", "layout_option", "stats_table", "hosts_table"]


def emit_json(obj: object) -> None:
    """Print ``obj`` as JSON on stdout (the whole machine-readable output of a command)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def console(stderr: bool = False):
    """A rich console; when output is not a terminal, wide enough that tables never wrap."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)


@contextmanager
def progress(description: str, total: int, enabled: bool = True, unit: str = "B") -> Iterator:
    """A progress bar on stderr; yields ``advance(n)``. Silent when not a terminal or disabled."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                               TextColumn, TimeRemainingColumn, TransferSpeedColumn)

    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [MofNCompleteColumn()]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def layout_option(*names: str, required: bool = True, help: str = "parallel layout, e.g. tp=2,pp=2,dp=2[,zero=1]"):
    """A click option parsed into a :class:`~scalai.config.ParallelConfig`."""
    from ..config import ParallelConfig

    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            return ParallelConfig.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return click.option(*names, required=required, callback=convert, help=help, metavar="LAYOUT")


def stats_table(stats, seconds: float | None = None, title: str = "plan"):
    """A plan's byte counts (``PlanStats``) as a rich table: bytes and shares of the total."""
    from rich.table import Table

    s = stats
    table = Table(title=title, box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(justify="right", style="dim")

    def row(name, value, share=True):
        pct = f"{100 * value / s.total_bytes:.1f} %" if share and s.total_bytes else ""
        table.add_row(name, human_bytes(value), pct)

    row("total bytes", s.total_bytes, share=False)
    row("same device", s.same_device_bytes)
    row("stay on host", s.same_host_bytes)
    row("cross hosts", s.cross_host_bytes)
    row("cross-host lower bound", s.cross_host_lower_bound_bytes)
    table.add_row("copies", f"{s.copies:,}", "")
    if seconds is not None:
        table.add_row("plan time", f"{seconds:.2f} s", "")
    return table


def hosts_table(stats, limit: int = 16):
    """Bytes each host sends and receives across hosts (``PlanStats``), the first ``limit`` hosts."""
    from rich.table import Table

    hosts = stats.to_json()["hosts"]
    table = Table("host", "sends", "receives", box=None, title="cross-host load per host")
    for name, load in list(hosts.items())[:limit]:
        table.add_row(name, human_bytes(load["sent_bytes"]), human_bytes(load["received_bytes"]))
    if len(hosts) > limit:
        table.add_row(f"... {len(hosts) - limit} more", "", "")
    return table
