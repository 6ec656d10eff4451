"""The ``scalai`` command group: each ``*_cmds`` module adds its commands to it, and
``main`` registers those modules and runs the group (so commands import this module, never
``main``)."""

from __future__ import annotations

import click

__all__ = ["cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="scalai")
def cli() -> None:
    """scalai: elastic state management for TP x PP x DP training jobs."""
