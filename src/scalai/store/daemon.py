"""Running a store: bind checks, start-up line, clean shutdown on SIGTERM/SIGINT.

A store listens on loopback by default. Any other address (a LAN address, ``0.0.0.0``)
is refused unless the store has a token, because anyone who can reach the port could
otherwise read and delete the job's state. With ``config.tls`` holding a certificate and
key it serves HTTPS (the handshake within ``idle_timeout``); without, the token and every
tensor byte cross the network in clear.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys

from ..checkpoint.manifest import atomic_write
from ..net import is_loopback
from ..tls import plain_warning
from .connections import GuardedSite
from .http_util import Keys
from .server import StoreConfig, make_app

__all__ = ["serve", "listen", "is_loopback", "check_bind"]

log = logging.getLogger("scalai.store")


def check_bind(host: str, token: str | None) -> None:
    """Raise ValueError when ``host`` is not loopback and there is no token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to listen on {host} without a token: anyone who reaches it could read "
                         f"and delete job state; give --token-file FILE (or set SCALAI_TOKEN), or listen "
                         f"on 127.0.0.1")


def serve(config: StoreConfig, host: str = "127.0.0.1", port: int = 0, url_file: str | None = None,
          announce=print) -> None:
    """Serve ``config`` on ``host:port`` until SIGTERM or SIGINT (``port=0``: any free one).

    Once listening, calls ``announce`` with one line holding the store's URL and, if
    given, writes the URL to ``url_file`` (atomically: a script can wait for the file).
    """
    check_bind(host, config.token)
    sock = listen(host, port)  # before anything is created: a busy port leaves no trace
    try:
        _raise_fd_limit(config.max_connections)
        logging.basicConfig(level=os.environ.get("SCALAI_STORE_LOG", "INFO"), stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("aiohttp.server").addFilter(_one_line_bad_http)
        asyncio.run(_serve(config, sock, url_file, announce))
    finally:
        sock.close()


def listen(host: str, port: int, backlog: int = 256) -> socket.socket:
    """A TCP socket listening on ``host:port`` (``port`` 0: any free one).

    Raises:
        ValueError: the port is out of range, the address is not this machine's, or the
            port is in use (one line saying which and what to do).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port {port!r} is not a TCP port; use 1..65535, or 0 for any free port")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=backlog)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}: {exc.strerror}; give an address of this machine "
                         f"(127.0.0.1 by default)") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"cannot listen on {host}:{port}: the port is in use (another store or "
                             f"program); choose another --port, or --port 0 for any free one") from None
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; give an address of this "
                         f"machine and a port you may use (above 1023 without root)") from None


async def _serve(config: StoreConfig, sock: socket.socket, url_file: str | None, announce) -> None:
    from aiohttp import web

    app = make_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=config.idle_timeout,
                           read_bufsize=int(os.environ.get("SCALAI_STORE_BUFSIZE", 4 << 20)))
    await runner.setup()
    tls = config.tls if config.tls is not None and config.tls.serves else None
    site = GuardedSite(runner, sock, app[Keys.GUARD], tls.server_context() if tls else None, config.idle_timeout)
    await site.start()
    bound = sock.getsockname()  # the port chosen when 0 was asked for
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"{'https' if tls else 'http'}://{shown}:{bound[1]}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if url_file:
        atomic_write(url_file, (url + "\n").encode(), sync=False)
    usage = app[Keys.CATALOG].usage()
    announce(f"scalai store {config.name} serving {url} (root {config.root}, "
             f"{usage['memory_bytes']} bytes held{', token required' if config.token else ''}{', TLS' if tls else ''})")
    warning = plain_warning(f"store {config.name}", bound[0], config.tls)
    sys.stdout.flush()
    if warning:
        print(f"scalai: {warning}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _one_line_bad_http(record: logging.LogRecord) -> bool:
    """A request that is not valid HTTP (a bad header character, a malformed request line)
    is answered 400 by the HTTP layer; log it as one INFO line, not an ERROR traceback."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg, record.args = "%s: not a valid HTTP request: %s", (record.getMessage(),
                                                                       " ".join(str(exc.message).split())[:200])
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.INFO)
    return True


def _raise_fd_limit(connections: int) -> None:
    """Cached mappings (up to 512), transformations' files and open connections each hold a
    descriptor: allow many, and refuse a connection limit the process cannot honour."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and connections + 1024 > soft:
        raise ValueError(f"--max-connections {connections} needs {connections + 1024} open files but this "
                         f"process may open {soft} (ulimit -n); lower --max-connections")


def default_name() -> str:
    """This machine's short host name, made a valid store name."""
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "_-" else "-" for c in name).lstrip("-_") or "store"
    return cleaned[:64]
