"""Shared CLI output: JSON, tables, byte sizes and progress bars."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

import click

from ..units import human_bytes

__all__ = ["emit_json", "human_bytes", "console", "progress", "layout_option"]


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
