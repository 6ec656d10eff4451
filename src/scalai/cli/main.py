"""Entry point of the ``scalai`` command.

Every command reports bad input and failures as one line on stderr and a non-zero exit
(2 for bad input, 1 for failures); ``SCALAI_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import ScalaiError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="scalai")
def cli() -> None:
    """scalai: elastic state management for TP x PP x DP training jobs."""


def _register() -> None:
    # Each module adds its commands to ``cli``; heavy imports stay inside the commands.
    from . import ckpt_cmds  # noqa: F401
    from . import data_cmds  # noqa: F401
    from . import demo_cmds  # noqa: F401
    from . import train_cmds  # noqa: F401
    from . import store_cmds  # noqa: F401
    from . import elastic_cmds  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        code = cli.main(args=argv, prog_name="scalai", standalone_mode=False)
        if isinstance(code, int):
            return code
    except click.exceptions.Abort:
        click.echo("scalai: interrupted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"scalai: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("scalai: interrupted", err=True)
        return 130
    except (ValueError, KeyError, FileExistsError, FileNotFoundError, NotADirectoryError,
            PermissionError, ConnectionError, TimeoutError, ScalaiError) as exc:
        if os.environ.get("SCALAI_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        click.echo(f"scalai: error: {message}", err=True)
        return 1 if isinstance(exc, ScalaiError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
