"""Entry point of the ``scalai`` command.

Every command reports bad input and failures as one line on stderr and a non-zero exit
(2 for bad input, 1 for failures); ``SCALAI_DEBUG=1`` shows the traceback instead.

SIGTERM is handled as Ctrl-C is: it interrupts the command where it is, every ``with``
block and ``finally`` on the way out runs (a half-written output is removed), and the
exit status is 143 (130 for Ctrl-C). Commands that stop in their own way (``store
serve``, ``run``, ``train``, ``data mount``) install their own handler.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

import click

from ..errors import ScalaiError
from .group import cli

__all__ = ["cli", "main", "Terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""


def _terminate(signum, frame) -> None:
    raise Terminated()


class _Echo(logging.Handler):
    """The library's notices (``scalai.checkpoint``: stale partial outputs) as ``scalai: ...``
    lines on the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"scalai: {record.getMessage()}", err=True)


def _notices() -> None:
    logger = logging.getLogger("scalai.checkpoint")
    if not any(isinstance(h, _Echo) for h in logger.handlers):
        logger.addHandler(_Echo())
        logger.setLevel(logging.INFO)
        logger.propagate = False


#: Hints for file-system errors that reach the top (errno -> what to do).
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.EACCES: "permission denied: write elsewhere or fix the permissions",
    errno.EPERM: "operation not permitted: write elsewhere or fix the permissions",
    errno.ELOOP: "a symbolic link loops: fix or remove the link",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "an I/O error: check the disk",
}


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}{where}" + (f"; {hint}" if hint else "")


def _register() -> None:
    # Each module adds its commands to ``cli``; heavy imports stay inside the commands.
    from . import ckpt_cmds  # noqa: F401
    from . import data_cmds  # noqa: F401
    from . import demo_cmds  # noqa: F401
    from . import train_cmds  # noqa: F401
    from . import store_cmds  # noqa: F401
    from . import elastic_cmds  # noqa: F401
    from . import interop_cmds  # noqa: F401
    from . import agent_cmds  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    _register()
    _notices()
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(exc: BaseException) -> int:
    terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
    click.echo(f"scalai: {'terminated' if terminated else 'interrupted'}", err=True)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _key_error(exc: KeyError) -> str:
    """scalai's own KeyErrors carry a sentence; a bare key (``KeyError(2)``) is a bug in scalai."""
    if exc.args and isinstance(exc.args[0], str) and " " in exc.args[0]:
        return exc.args[0]
    return (f"internal error ({type(exc).__name__}: {exc.args[0] if exc.args else ''!r}); rerun with "
            f"SCALAI_DEBUG=1 for the traceback and report it")


def _run(argv: list[str] | None) -> int:
    try:
        code = cli.main(args=argv, prog_name="scalai", standalone_mode=False)
        if isinstance(code, int):
            return code
    except click.exceptions.Abort as exc:
        return _interrupted(exc)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"scalai: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except (ValueError, KeyError, FileExistsError, FileNotFoundError, NotADirectoryError,
            PermissionError, ConnectionError, TimeoutError, ScalaiError) as exc:
        if os.environ.get("SCALAI_DEBUG"):
            raise
        message = _key_error(exc) if isinstance(exc, KeyError) else exc
        click.echo(f"scalai: error: {message}", err=True)
        return 1 if isinstance(exc, ScalaiError) else 2
    except OSError as exc:  # a full or read-only disk, an I/O error: what and where, in one line
        if os.environ.get("SCALAI_DEBUG"):
            raise
        click.echo(f"scalai: error: {_os_error(exc)}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
