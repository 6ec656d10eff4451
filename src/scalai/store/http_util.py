"""HTTP plumbing of the store: JSON errors, token checks, path names, writers, bodies.

Every request passes two middlewares: :func:`errors` (every failure becomes a JSON
``{"error": {"code", "message"}}`` with a 4xx status, or 502/507 for peers and space; never
a traceback) and :func:`auth` (when the store has a token, ``Authorization: Bearer
<token>`` is compared in constant time on every request, health included).

Bodies are read with a size cap and a timeout per read (a client that stops sending is
cut off with 408); JSON bodies are parsed (:func:`scalai.bounded.loads`: depth checked
before parsing, no NaN) and validated against their schema on a worker thread, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from ..bounded import loads
from ..limits import LimitError
from .catalog import Conflict, NotFound, StorageFull
from .errors import PeerError
from .lease import LEASE_HEADER, OWNER_HEADER, lease_seconds
from .names import NameError_, check_name, check_rank, check_tensor_name
from .openapi import BodyError, validate_body

__all__ = ["Keys", "errors", "auth", "path_names", "tensor_key", "limited", "json_body", "read_chunks",
           "writer", "FROM_HEADER", "in_pool"]

log = logging.getLogger("scalai.store")


class Keys:
    """Typed keys of the store application's state (``app[Keys.CATALOG]``)."""

    CONFIG = web.AppKey("config", object)
    NAME = web.AppKey("name", str)
    CATALOG = web.AppKey("catalog", object)
    LINK = web.AppKey("link", object)
    POOL = web.AppKey("pool", object)
    SESSION = web.AppKey("session", object)
    STARTED = web.AppKey("started", float)
    TRAFFIC = web.AppKey("traffic", dict)
    TRANSFORMS = web.AppKey("transforms", dict)
    GUARD = web.AppKey("guard", object)
    TASKS = web.AppKey("tasks", list)


FROM_HEADER = "X-Scalai-From"  # the name of the store a request comes from (store-to-store reads)


def _error(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


_STATUS = [(NameError_, 400, "bad_request"), (BodyError, 400, "bad_body"), (LimitError, 422, "limit_exceeded"),
           (ValueError, 400, "bad_request"), (KeyError, 400, "bad_request"), (NotFound, 404, "not_found"),
           (Conflict, 409, "conflict"), (StorageFull, 507, "storage_full")]


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), reason)
    except PeerError as exc:
        return _error(502, "peer_failed", str(exc), host=exc.host)
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        return _error(408, "request_timeout", f"store {request.app[Keys.NAME]}: the client sent nothing for "
                                              f"{request.app[Keys.CONFIG].idle_timeout:g} s in the middle of "
                                              f"its request; the request was dropped")
    except ConnectionError as exc:  # the client went away: one line, no traceback, nothing to answer
        log.info("%s %s: the client disconnected (%s)", request.method, request.path,
                 exc.strerror or str(exc) or type(exc).__name__)
        return web.Response(status=400)  # never sent: the server drops it quietly
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            return _error(507, "storage_full", f"no space left in store {request.app[Keys.NAME]}")
        log.exception("I/O error on %s %s", request.method, request.path)
        return _error(500, "io_error", f"store {request.app[Keys.NAME]}: {exc.strerror or exc}")
    except RecursionError:
        return _error(400, "bad_body", "the request is nested too deeply to process")
    except Exception as exc:
        for kind, status, code in _STATUS:
            if isinstance(exc, kind):
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                return _error(status, code, str(message))
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error in the store (see its log)")


def auth(token: str | None):
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler):
        if expected is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                why = "wrong token" if given else "this store requires a token"
                return web.json_response(
                    {"error": {"code": "unauthorized", "message": f"{why}: send 'Authorization: Bearer "
                               f"<token>' (scalai: --token-file FILE or SCALAI_TOKEN)"}},
                    status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


def path_names(request: web.Request) -> tuple[str, ...]:
    m = request.match_info
    out = [check_name(m["job"], "job")]
    if "version" in m:
        out.append(check_name(m["version"], "version"))
    return tuple(out)


def tensor_key(request: web.Request) -> tuple[str, str, int, str]:
    job, version = path_names(request)
    return job, version, check_rank(request.match_info["rank"]), check_tensor_name(request.match_info["tensor"])


def writer(request: web.Request) -> tuple[str | None, float | None]:
    """``(owner, lease seconds)`` from the request's ``X-Scalai-Owner`` and ``X-Scalai-Lease``
    headers (``None`` for each one absent)."""
    owner = request.headers.get(OWNER_HEADER)
    if owner is not None:
        check_name(owner, f"owner ({OWNER_HEADER})")
    lease = request.headers.get(LEASE_HEADER)
    return owner, (None if lease is None else lease_seconds(lease, LEASE_HEADER))


def limited(request: web.Request) -> bool:
    """Traffic with another store crosses the simulated link; clients' (push, pull) does not."""
    peer = request.headers.get(FROM_HEADER)
    return peer is not None and peer != request.app[Keys.NAME]


async def in_pool(request: web.Request, fn, *args):
    """Run ``fn(*args)`` on the store's worker threads (CPU-heavy work off the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(request.app[Keys.POOL], fn, *args)


async def read_chunks(request: web.Request, size: int = 1 << 20):
    """The request body in chunks of at most ``size`` bytes; asyncio.TimeoutError (408) when
    the client sends nothing for the store's idle timeout."""
    idle = request.app[Keys.CONFIG].idle_timeout
    while True:
        chunk = await asyncio.wait_for(request.content.read(size), idle)
        if not chunk:
            return
        yield chunk


def _parse(data: bytes, schema: str) -> dict:
    obj = loads(data, "the JSON body", error=BodyError)  # depth checked before parsing
    validate_body(obj, schema)
    return obj


async def json_body(request: web.Request, schema: str) -> dict:
    """The request's JSON body: at most ``max_json`` bytes (413), strict JSON nested at most
    :data:`scalai.bounded.MAX_JSON_DEPTH` levels and valid against ``schema`` (400)."""
    limit = request.app[Keys.CONFIG].max_json
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"JSON body of {request.content_length} bytes is larger than "
                                                 f"this store accepts ({limit})")
    parts, total = [], 0
    async for chunk in read_chunks(request):
        total += len(chunk)
        if total > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total,
                                                text=f"JSON body is larger than this store accepts ({limit} bytes)")
        parts.append(chunk)
    return await in_pool(request, _parse, b"".join(parts), schema)
