"""HTTP plumbing of the store: JSON errors, token checks, path names, JSON bodies.

Every request passes two middlewares: :func:`errors` (every failure becomes a JSON
``{"error": {"code", "message"}}`` with a 4xx status, or 502/507 for peers and space; never
a traceback) and :func:`auth` (when the store has a token, ``Authorization: Bearer
<token>`` is compared in constant time on every request, health included).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from .catalog import Conflict, NotFound, StorageFull
from .errors import PeerError
from .names import NameError_, check_name, check_rank, check_tensor_name
from .openapi import BodyError, validate_body

__all__ = ["Keys", "errors", "auth", "path_names", "tensor_key", "limited", "json_body", "FROM_HEADER"]

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


FROM_HEADER = "X-Scalai-From"  # the name of the store a request comes from (store-to-store reads)


def _error(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


_STATUS = [(NameError_, 400, "bad_request"), (BodyError, 400, "bad_body"), (ValueError, 400, "bad_request"),
           (KeyError, 400, "bad_request"), (NotFound, 404, "not_found"), (Conflict, 409, "conflict"),
           (StorageFull, 507, "storage_full")]


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
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            return _error(507, "storage_full", f"no space left in store {request.app[Keys.NAME]}")
        log.exception("I/O error on %s %s", request.method, request.path)
        return _error(500, "io_error", f"store {request.app[Keys.NAME]}: {exc.strerror or exc}")
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


def limited(request: web.Request) -> bool:
    """Traffic with another store crosses the simulated link; clients' (push, pull) does not."""
    peer = request.headers.get(FROM_HEADER)
    return peer is not None and peer != request.app[Keys.NAME]


async def json_body(request: web.Request, schema: str) -> dict:
    if request.content_length is not None and request.content_length > request.app[Keys.CONFIG].max_json:
        raise web.HTTPRequestEntityTooLarge(max_size=request.app[Keys.CONFIG].max_json,
                                            actual_size=request.content_length,
                                            text="JSON body too large")
    try:
        obj = await request.json()
    except web.HTTPException:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"body is not valid JSON ({exc})") from None
    validate_body(obj, schema)
    return obj
