"""The store daemon: an aiohttp application over a :class:`~scalai.store.catalog.Catalog`.

Routes are listed in :mod:`scalai.store.openapi` (and tested to match). Every request
passes two middlewares: errors (every failure becomes a JSON ``{"error": {"code",
"message"}}`` with a 4xx status, or 502/507 for peers and space; never a traceback) and
auth (when the store has a token, ``Authorization: Bearer <token>`` is compared in
constant time on every request, health included).

Bodies: tensor uploads stream to a file as they arrive (never held whole) and are
refused with 413 past ``max_upload`` bytes; JSON bodies are limited to ``max_json`` bytes
and validated against the OpenAPI schemas. Reads stream the selected region block by
block from the file mapping.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod

import numpy as np
from aiohttp import web

from ..checkpoint.transfer import blocks
from ..dtypes import itemsize
from .catalog import Catalog, Conflict, NotFound, StorageFull, remove_trees
from .files import TensorUpload
from .manifest import VersionManifest
from .names import (NameError_, check_dtype, check_name, check_rank, check_tensor_name,
                    format_shape, parse_shape, parse_window)
from .openapi import API_VERSION, SPEC, BodyError, validate_body
from .ratelimit import Link
from .errors import PeerError
from .transform import TransformSpec, run_host_part

__all__ = ["StoreConfig", "make_app"]

log = logging.getLogger("scalai.store")
CHUNK = 1 << 20          # bytes per streamed write
FROM_HEADER = "X-Scalai-From"


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one store (sizes in bytes, rates in bytes per second)."""

    root: str
    name: str
    token: str | None = None
    spill: str | None = None
    memory_limit: int | None = None
    max_upload: int = 16 << 30
    max_json: int = 64 << 20
    link_up: float | None = None
    link_down: float | None = None
    workers: int = 2


def _error(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


_STATUS = [(NameError_, 400, "bad_request"), (BodyError, 400, "bad_body"), (ValueError, 400, "bad_request"),
           (KeyError, 400, "bad_request"), (NotFound, 404, "not_found"), (Conflict, 409, "conflict"),
           (StorageFull, 507, "storage_full")]


@web.middleware
async def _errors(request: web.Request, handler):
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
            return _error(507, "storage_full", f"no space left in store {request.app['name']}")
        log.exception("I/O error on %s %s", request.method, request.path)
        return _error(500, "io_error", f"store {request.app['name']}: {exc.strerror or exc}")
    except Exception as exc:
        for kind, status, code in _STATUS:
            if isinstance(exc, kind):
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                return _error(status, code, str(message))
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal error in the store (see its log)")


def _auth(token: str | None):
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


def _names(request: web.Request) -> tuple[str, ...]:
    m = request.match_info
    out = [check_name(m["job"], "job")]
    if "version" in m:
        out.append(check_name(m["version"], "version"))
    return tuple(out)


def _tensor_key(request: web.Request) -> tuple[str, str, int, str]:
    job, version = _names(request)
    return job, version, check_rank(request.match_info["rank"]), check_tensor_name(request.match_info["tensor"])


def _limited(request: web.Request) -> bool:
    """Traffic with another store crosses the simulated link; clients' (push, pull) does not."""
    peer = request.headers.get(FROM_HEADER)
    return peer is not None and peer != request.app["name"]


async def _json_body(request: web.Request, schema: str) -> dict:
    if request.content_length is not None and request.content_length > request.app["config"].max_json:
        raise web.HTTPRequestEntityTooLarge(max_size=request.app["config"].max_json,
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


# -- handlers -------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    from .. import __version__

    app = request.app
    return web.json_response({"status": "ok", "name": app["name"], "api": API_VERSION, "scalai": __version__,
                              "uptime_s": round(time.monotonic() - app["started"], 3),
                              "limited": app["link"].up is not None or app["link"].down is not None})


async def usage(request: web.Request) -> web.Response:
    out = request.app["catalog"].usage()
    out["traffic"] = {k: dict(v) for k, v in request.app["traffic"].items()}
    return web.json_response(out)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)


def _job_json(catalog: Catalog, job: str) -> dict:
    versions = catalog.jobs.get(job)
    if versions is None:
        raise NotFound(f"job {job!r} is not in store {catalog.name}")
    return {"job": job, "versions": [e.summary() for _, e in sorted(versions.items())]}


async def list_jobs(request: web.Request) -> web.Response:
    catalog = request.app["catalog"]
    return web.json_response({"jobs": [_job_json(catalog, j) for j in sorted(catalog.jobs)]})


async def get_job(request: web.Request) -> web.Response:
    (job,) = _names(request)
    return web.json_response(_job_json(request.app["catalog"], job))


async def get_version(request: web.Request) -> web.Response:
    job, version = _names(request)
    entry = request.app["catalog"].version(job, version)
    flag = request.query.get("tensors", "true")
    if flag not in ("true", "false"):
        raise NameError_("tensors must be true or false")
    out = {"job": job, "version": version, "committed": entry.committed, "bytes": entry.nbytes,
           "manifest": entry.manifest}
    if flag == "true":
        ranks: dict[str, dict] = defaultdict(dict)
        for (rank, name), t in sorted(entry.tensors.items()):
            ranks[str(rank)][name] = t.meta.to_json()
        out["ranks"] = ranks
    return web.json_response(out)


async def delete(request: web.Request) -> web.Response:
    names = _names(request)
    job, version = names[0], (names[1] if len(names) > 1 else None)
    app = request.app
    cancelled = [(v, task) for (j, v), task in list(app["transforms"].items())
                 if j == job and version in (None, v)]
    for _, task in cancelled:
        task.cancel()
    await asyncio.gather(*(t for _, t in cancelled), return_exceptions=True)
    try:
        removed = await _drop(app, job, version)
    except NotFound:
        if not cancelled:
            raise
        removed = []
    return web.json_response({"job": job, "deleted": sorted(set(removed) | {v for v, _ in cancelled})})


async def _drop(app: web.Application, job: str, version: str | None) -> list[str]:
    names, trash = app["catalog"].delete(job, version)
    await asyncio.get_running_loop().run_in_executor(app["pool"], remove_trees, trash)
    return names


async def commit(request: web.Request) -> web.Response:
    job, version = _names(request)
    body = await _json_body(request, "CommitRequest")
    if (job, version) in request.app["transforms"]:
        raise Conflict(f"version {version!r} of job {job!r} is still being written by a transformation")
    manifest = VersionManifest.from_json(body["manifest"])
    entry = request.app["catalog"].commit(job, version, manifest, body["manifest"])
    return web.json_response({"job": job, "version": version, "committed": True, "bytes": entry.nbytes,
                              "manifest": entry.manifest})


async def put_tensor(request: web.Request) -> web.Response:
    job, version, rank, tensor = _tensor_key(request)
    app, q = request.app, request.query
    unknown = set(q) - {"dtype", "shape"}
    if unknown or "dtype" not in q or "shape" not in q:
        raise NameError_("give the query parameters dtype and shape (e.g. ?dtype=bfloat16&shape=768,3072), "
                         "and no others")
    dtype, shape = check_dtype(q["dtype"]), parse_shape(q["shape"])
    nbytes = prod(shape) * itemsize(dtype)
    limit = app["config"].max_upload
    length = request.content_length
    if nbytes > limit or (length is not None and length > limit):
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=max(nbytes, length or 0),
                                            text=f"upload of {max(nbytes, length or 0)} bytes is larger than "
                                                 f"this store accepts ({limit}); raise --max-upload")
    if length is not None and length != nbytes:
        raise NameError_(f"body has {length} bytes but dtype {dtype} x shape {list(shape)} needs {nbytes}")
    if (job, version) in app["transforms"]:
        raise Conflict(f"version {version!r} of job {job!r} is being written by a transformation")
    path, spilled = app["catalog"].place(job, version, rank, tensor, nbytes)
    upload = TensorUpload(path, dtype, shape)
    link = app["link"] if _limited(request) else None
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            if link is not None:
                await link.receive(len(chunk))
            upload.write(chunk)
        meta = upload.finish()
    except BaseException:
        upload.abort()
        raise
    app["catalog"].add(job, version, rank, tensor, path, meta, spilled)
    app["traffic"]["received"][request.headers.get(FROM_HEADER, "client")] += nbytes
    return web.json_response({"job": job, "version": version, "rank": rank, "tensor": tensor,
                              "bytes": nbytes, "crc32": meta.to_json()["crc32"], "spilled": spilled},
                             status=201)


def _parts(sel: np.ndarray):
    """The selection's bytes in row-major order, as blocks of at most CHUNK bytes."""
    if sel.flags.c_contiguous:
        flat = memoryview(sel.reshape(-1).view(np.uint8)) if sel.size else memoryview(b"")
        for lo in range(0, flat.nbytes, CHUNK):
            yield flat[lo:lo + CHUNK]
        return
    for index in blocks(sel.shape, max(1, CHUNK // sel.itemsize)):
        yield np.ascontiguousarray(sel[index]).reshape(-1).view(np.uint8).data


async def get_tensor(request: web.Request) -> web.StreamResponse:
    job, version, rank, tensor = _tensor_key(request)
    app = request.app
    stored = app["catalog"].tensor(job, version, rank, tensor)
    window = parse_window(request.query, stored.meta.shape)
    array = app["catalog"].array(stored)
    sel = array if window is None else window.select(array)
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(sel.nbytes),
               "X-Scalai-Dtype": stored.meta.dtype, "X-Scalai-Shape": format_shape(sel.shape)}
    if window is None and stored.meta.crc32 is not None:
        headers["X-Scalai-Crc32"] = f"{stored.meta.crc32:08x}"
    resp = web.StreamResponse(status=200, headers=headers)
    await resp.prepare(request)
    link = app["link"] if _limited(request) else None
    for part in _parts(sel):
        if link is not None:
            await link.send(part.nbytes)
        await resp.write(part)
    app["traffic"]["sent"][request.headers.get(FROM_HEADER, "client")] += sel.nbytes
    await resp.write_eof()
    return resp


async def transform(request: web.Request) -> web.Response:
    (job,) = _names(request)
    app = request.app
    spec = TransformSpec.from_json(job, await _json_body(request, "TransformRequest"))
    key = (job, spec.to_version)
    app["catalog"].begin(job, spec.to_version)  # Conflict if it exists
    headers = {FROM_HEADER: app["name"]}
    if app["config"].token:
        headers["Authorization"] = f"Bearer {app['config'].token}"
    task = asyncio.ensure_future(run_host_part(app["catalog"], spec, await _session(app), app["link"],
                                               app["pool"], headers))
    app["transforms"][key] = task
    try:
        result = await task
    except BaseException:
        # a failed or cancelled part leaves nothing behind: the new version never existed here
        entry = app["catalog"].jobs.get(job, {}).get(spec.to_version)
        if entry is not None and not entry.committed:
            await asyncio.shield(_drop(app, job, spec.to_version))
        raise
    finally:
        app["transforms"].pop(key, None)
    for host, n in result["fetched_bytes"].items():
        app["traffic"]["received"][host] += n
    log.info("%s: transformed %s/%s -> %s in %.2f s", app["name"], job, spec.from_version,
             spec.to_version, result["seconds"]["total"])
    return web.json_response(result)


async def _session(app: web.Application):
    """The client session this store uses to read from its peers (connections reused)."""
    import aiohttp

    if app.get("session") is None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=16),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=60))
    return app["session"]


async def _close(app: web.Application) -> None:
    if app.get("session") is not None:
        await app["session"].close()
    for task in app["transforms"].values():
        task.cancel()
    app["pool"].shutdown(wait=False)


def make_app(config: StoreConfig) -> web.Application:
    """The store's application (serve it with :func:`aiohttp.web.run_app` or a runner)."""
    check_name(config.name, "store name")
    app = web.Application(client_max_size=config.max_json, middlewares=[_errors, _auth(config.token)])
    app["config"] = config
    app["name"] = config.name
    app["catalog"] = Catalog(config.root, config.spill, config.memory_limit, config.name)
    app["link"] = Link(config.link_up, config.link_down)
    app["pool"] = ThreadPoolExecutor(config.workers, thread_name_prefix="store")
    app["transforms"] = {}
    app["traffic"] = {"sent": defaultdict(int), "received": defaultdict(int)}
    app["started"] = time.monotonic()
    app["session"] = None
    app.on_cleanup.append(_close)
    tensor = "/v1/jobs/{job}/versions/{version}/ranks/{rank}/tensors/{tensor}"
    app.router.add_get("/v1/health", health, allow_head=False)
    app.router.add_get("/v1/usage", usage, allow_head=False)
    app.router.add_get("/v1/openapi.json", openapi, allow_head=False)
    app.router.add_get("/v1/jobs", list_jobs, allow_head=False)
    app.router.add_get("/v1/jobs/{job}", get_job, allow_head=False)
    app.router.add_delete("/v1/jobs/{job}", delete)
    app.router.add_get("/v1/jobs/{job}/versions/{version}", get_version, allow_head=False)
    app.router.add_delete("/v1/jobs/{job}/versions/{version}", delete)
    app.router.add_post("/v1/jobs/{job}/versions/{version}/commit", commit)
    app.router.add_get(tensor, get_tensor, allow_head=False)
    app.router.add_put(tensor, put_tensor)
    app.router.add_post("/v1/jobs/{job}/transform", transform)
    return app
