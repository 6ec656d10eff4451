"""Bounded connections for the store's HTTP server: a connection limit and idle timeouts.

Without them, clients that connect and send nothing (or half a request: a *slowloris*)
hold a descriptor each until the store runs out. :class:`ConnectionGuard` wraps the
server's protocol factory:

- a connection with no request in progress is closed ``idle_s`` seconds after it opened
  or after its last answer: that is the header timeout (a request's headers must arrive
  within ``idle_s``) and the keep-alive timeout in one;
- at most ``limit`` connections are open; at the limit, a new connection evicts the one
  with no request in progress that has been quiet longest (a half-open connection goes
  before a client between two requests does), and is refused only when every connection
  is busy.

A connection is *busy* from the moment its request reaches the application (the
:meth:`ConnectionGuard.middleware`) until the answer is written; request bodies and
streamed answers have their own per-read/write timeouts in the handlers, so a client
that stalls in the middle of an upload is cut off too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from aiohttp import web

__all__ = ["ConnectionGuard", "GuardedSite"]

log = logging.getLogger("scalai.store")


class _Conn(asyncio.Protocol):
    """A protocol that forwards to the server's own, and tells the guard what happens."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self.last = time.monotonic()
        self.refused = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.guard._admit(self):
            self.refused = True
            transport.abort()
            return
        self.inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        self.guard._forget(self)
        if not self.refused:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ConnectionGuard:
    """Limit and idle timeout of a server's connections (see the module docstring).

    Args:
        limit: most connections open at once.
        idle_s: seconds a connection may stay open with no request in progress.
    """

    def __init__(self, limit: int = 1024, idle_s: float = 30.0):
        if limit < 1 or not idle_s > 0:
            raise ValueError(f"connection limit {limit} and idle timeout {idle_s} must be positive")
        self.limit, self.idle_s = limit, idle_s
        self._open: dict[object, _Conn] = {}  # transport -> connection
        self.refused = 0
        self.closed_idle = 0

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory to serve with, around the server's own."""
        return lambda: _Conn(self, factory())

    @property
    def count(self) -> int:
        return len(self._open)

    def _admit(self, conn: _Conn) -> bool:
        if len(self._open) >= self.limit:
            idle = min((c for c in self._open.values() if not c.busy), key=lambda c: c.last, default=None)
            if idle is None:
                self.refused += 1
                if self.refused == 1 or self.refused % 100 == 0:
                    log.warning("connection limit %d reached with every connection busy: refused %d so far "
                                "(raise --max-connections)", self.limit, self.refused)
                return False
            self._drop(idle)
        self._open[conn.transport] = conn
        return True

    def _forget(self, conn: _Conn) -> None:
        self._open.pop(conn.transport, None)

    def _drop(self, conn: _Conn) -> None:
        self._open.pop(conn.transport, None)
        self.closed_idle += 1
        conn.close()

    def sweep(self, now: float | None = None) -> int:
        """Close the connections idle for longer than ``idle_s``; returns how many."""
        now = time.monotonic() if now is None else now
        stale = [c for c in self._open.values() if not c.busy and now - c.last > self.idle_s]
        for c in stale:
            self._drop(c)
        return len(stale)

    async def run(self) -> None:
        """Sweep forever (a background task of the server)."""
        while True:
            await asyncio.sleep(min(1.0, self.idle_s / 4))
            closed = self.sweep()
            if closed:
                log.info("closed %d connections idle for more than %g s (%d open)", closed, self.idle_s,
                         len(self._open))

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Marks the request's connection busy while the application handles it."""
        conn = self._open.get(request.transport)
        if conn is None:
            return await handler(request)
        conn.busy += 1
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            conn.last = time.monotonic()


class GuardedSite(web.BaseSite):
    """A site serving a listening socket whose connections pass through a
    :class:`ConnectionGuard` (``ssl``: an :class:`ssl.SSLContext` to serve HTTPS, the
    handshake within ``handshake_s`` seconds)."""

    def __init__(self, runner: web.BaseRunner, sock, guard: ConnectionGuard, ssl=None, handshake_s: float = 30.0):
        super().__init__(runner)
        self._sock, self._guard, self._ssl, self._handshake_s = sock, guard, ssl, handshake_s

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": self._handshake_s} if self._ssl else {}
        self._server = await loop.create_server(self._guard.wrap(self._runner.server), sock=self._sock, **tls)
