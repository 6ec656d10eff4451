"""The store daemon: an aiohttp application over a :class:`~scalai.store.catalog.Catalog`.

Routes are listed in :mod:`scalai.store.openapi` (and tested to match); errors and the
token check are middlewares (:mod:`scalai.store.http_util`).

Bodies: tensor uploads stream to a private file as they arrive (never held whole) and
are refused with 413 past ``max_upload`` bytes; JSON bodies are limited to ``max_json``
bytes, parsed and validated against the OpenAPI schemas on worker threads. Reads stream
the selected region block by block from the file mapping. CPU-heavy work (PTCs, plans,
manifests) runs on the worker threads, never on the event loop.

Clients on the store's own machine may write a tensor file themselves into its upload
directory and have it adopted (``GET /v1/local`` says where, ``POST .../adopt`` renames
it in, with the same checks as an upload): see :mod:`scalai.store.local`.

Writers: a version belongs to the owner that created it (``X-Scalai-Owner``); uploads,
commits, transformations and owner-scoped deletes of another owner's version get 409.
Uncommitted versions expire when their lease is not renewed (``POST .../lease``): a
background task deletes them and cancels a transformation writing them. Connections are
bounded (:mod:`scalai.store.connections`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod

import numpy as np
from aiohttp import web

from ..storage.blocks import blocks
from ..dtypes import itemsize
from ..limits import ELEMENTS
from ..tls import Tls, client_context
from .catalog import Catalog, Conflict, NotFound, VersionEntry
from .connections import ConnectionGuard
from .files import DATA_OFFSET, TensorUpload
from .http_util import (FROM_HEADER, Keys, auth, errors, in_pool, json_body, limited, path_names, read_chunks,
                        tensor_key, writer)
from .lease import DEFAULT_LEASE_S, MIN_LEASE_S
from .local import LOCAL_KEY_HEADER
from .manifest import VersionManifest, untrusted_layout
from .names import (NameError_, check_dtype, check_name, check_rank, check_tensor_name, format_shape, parse_shape,
                    parse_window)
from .openapi import API_VERSION, SPEC
from .ratelimit import Link
from .roots import LOCAL_KEY, sweep_local
from .transform import TransformSpec, run_host_part

__all__ = ["StoreConfig", "make_app"]

log = logging.getLogger("scalai.store")
CHUNK = 1 << 20          # bytes per streamed write


@dataclass(frozen=True)
class StoreConfig:
    """Settings of one store (sizes in bytes, rates in bytes per second)."""

    root: str
    name: str
    token: str | None = None
    tls: Tls | None = None               # serve HTTPS (cert, key); verify peers (ca)
    spill: str | None = None
    memory_limit: int | None = None
    max_upload: int = 16 << 30
    max_json: int = 64 << 20
    link_up: float | None = None
    link_down: float | None = None
    workers: int = 2
    lease_s: float = DEFAULT_LEASE_S     # lease of versions whose writer names none
    idle_timeout: float = 30.0           # seconds a connection (or a body) may send nothing
    max_connections: int = 1024


# -- handlers -------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    from .. import __version__

    app = request.app
    return web.json_response({"status": "ok", "name": app[Keys.NAME], "api": API_VERSION, "scalai": __version__,
                              "uptime_s": round(time.monotonic() - app[Keys.STARTED], 3),
                              "limited": app[Keys.LINK].up is not None or app[Keys.LINK].down is not None})


async def usage(request: web.Request) -> web.Response:
    out = request.app[Keys.CATALOG].usage()
    out["traffic"] = {k: dict(v) for k, v in request.app[Keys.TRAFFIC].items()}
    return web.json_response(out)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)


async def list_jobs(request: web.Request) -> web.Response:
    catalog = request.app[Keys.CATALOG]
    return web.json_response({"jobs": [{"job": j, "versions": catalog.summaries(j)} for j in catalog.job_names()]})


async def get_job(request: web.Request) -> web.Response:
    (job,) = path_names(request)
    return web.json_response({"job": job, "versions": request.app[Keys.CATALOG].summaries(job)})


async def get_version(request: web.Request) -> web.Response:
    job, version = path_names(request)
    entry = request.app[Keys.CATALOG].version(job, version)
    flag = request.query.get("tensors", "true")
    if flag not in ("true", "false"):
        raise NameError_("tensors must be true or false")
    out = {"job": job, "version": version, "committed": entry.committed, "bytes": entry.nbytes,
           "manifest": entry.manifest}
    if flag == "true":
        ranks: dict[str, dict] = defaultdict(dict)
        for (rank, name), t in request.app[Keys.CATALOG].listing(entry):
            ranks[str(rank)][name] = t.meta.to_json()
        out["ranks"] = ranks
    return web.json_response(out)


async def delete(request: web.Request) -> web.Response:
    """Delete a version (or a job) and cancel the transformations writing it. With an owner
    (``X-Scalai-Owner``), only a version that owner created: a writer's cleanup."""
    names = path_names(request)
    job, version = names[0], (names[1] if len(names) > 1 else None)
    owner, _ = writer(request)
    app = request.app
    catalog: Catalog = app[Keys.CATALOG]
    if owner is not None:
        if version is None:
            raise NameError_("a whole job is deleted without an owner; give a version to delete one that an "
                             "owner created")
        entry = catalog.version(job, version)  # 404 if absent
        if entry.owner != owner:
            catalog.delete(job, version, owner=owner)  # raises the Conflict that says whose it is
    cancelled = [(v, task) for (j, v), (task, by) in list(app[Keys.TRANSFORMS].items())
                 if j == job and version in (None, v) and owner in (None, by)]
    for _, task in cancelled:
        task.cancel()
    await asyncio.gather(*(t for _, t in cancelled), return_exceptions=True)
    try:
        removed = await _drop(app, job, version, owner=owner)
    except NotFound:
        if not cancelled:
            raise
        removed = []
    return web.json_response({"job": job, "deleted": sorted(set(removed) | {v for v, _ in cancelled})})


async def _drop(app: web.Application, job: str, version: str | None, owner: str | None = None,
                entry: VersionEntry | None = None) -> list[str]:
    catalog: Catalog = app[Keys.CATALOG]
    names, trash = catalog.delete(job, version, owner=owner, entry=entry)
    await asyncio.get_running_loop().run_in_executor(app[Keys.POOL], catalog.purge, trash)
    return names


async def fence(request: web.Request) -> web.Response:
    """Refuse writers of the job's generations below the one given (see ``Catalog.fence``)."""
    (job,) = path_names(request)
    body = await json_body(request, "FenceRequest")
    return web.json_response({"job": job, "generation": request.app[Keys.CATALOG].fence(job, body["generation"])})


async def lease(request: web.Request) -> web.Response:
    """Create (``?create=true``) or renew the caller's lease of an uncommitted version."""
    job, version = path_names(request)
    owner, seconds = writer(request)
    if owner is None:
        raise NameError_("give the writer's owner id in the X-Scalai-Owner header")
    create = request.query.get("create", "false")
    if create not in ("true", "false") or set(request.query) - {"create"}:
        raise NameError_("the only query parameter is create=true|false")
    entry, created = request.app[Keys.CATALOG].lease(job, version, owner, seconds, create == "true")
    return web.json_response(_lease_json(entry, created))


def _lease_json(entry: VersionEntry, created: bool = False) -> dict:
    out = {"job": entry.job, "version": entry.version, "owner": entry.owner, "committed": entry.committed,
           "created": created, "lease_s": entry.lease_s}
    if not entry.committed:
        out["expires_in_s"] = round(max(0.0, entry.expires - time.monotonic()), 3)
    return out


async def _expire(app: web.Application) -> None:
    """Delete uncommitted versions whose lease ran out; cancel transformations writing them;
    every second, delete the local upload files nobody wrote for a lease (their
    writer died before asking for their adoption)."""
    catalog: Catalog = app[Keys.CATALOG]
    config: StoreConfig = app[Keys.CONFIG]
    stale = max(config.lease_s, config.idle_timeout)
    ticks = 0
    while True:
        await asyncio.sleep(MIN_LEASE_S / 2)
        ticks += 1
        if ticks % 2 == 0:
            try:
                swept = await asyncio.get_running_loop().run_in_executor(app[Keys.POOL], sweep_local,
                                                                         catalog.uploads, stale)
                if swept:
                    log.info("%s: deleted %d local upload files unwritten for %g s", app[Keys.NAME], swept, stale)
            except Exception:  # noqa: BLE001 - never stop the expiry loop
                log.exception("%s: sweeping %s failed", app[Keys.NAME], catalog.uploads)
        for entry in catalog.expired():
            try:
                trash = catalog.expire(entry)
                if trash is None:
                    continue  # renewed, committed or deleted meanwhile
                task = app[Keys.TRANSFORMS].get((entry.job, entry.version), (None, None))[0]
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                await asyncio.get_running_loop().run_in_executor(app[Keys.POOL], catalog.purge, trash)
            except Exception:  # noqa: BLE001 - one bad version must not stop every later expiry
                log.exception("%s: expiring %s/%s failed", app[Keys.NAME], entry.job, entry.version)
                continue
            log.info("%s: deleted %s/%s of %s: its lease of %g s was not renewed%s", app[Keys.NAME], entry.job,
                     entry.version, entry.owner or "an unnamed writer", entry.lease_s,
                     " (its transformation was cancelled)" if task is not None else "")


async def commit(request: web.Request) -> web.Response:
    job, version = path_names(request)
    owner, _ = writer(request)
    app = request.app
    body = await json_body(request, "CommitRequest")
    if (job, version) in app[Keys.TRANSFORMS]:
        raise Conflict(f"version {version!r} of job {job!r} is still being written by a transformation")
    expected = await in_pool(request, untrusted_layout, _expected, body["manifest"], job, version, app[Keys.NAME])
    if (job, version) in app[Keys.TRANSFORMS]:
        raise Conflict(f"version {version!r} of job {job!r} is still being written by a transformation")
    entry = app[Keys.CATALOG].commit(job, version, body["manifest"], expected, owner or "")
    return web.json_response({"job": job, "version": version, "committed": True, "bytes": entry.nbytes,
                              "manifest": entry.manifest})


def _expected(raw: dict, job: str, version: str, host: str) -> dict:
    """What this store must hold of a manifest (CPU-heavy for large PTCs: a worker thread)."""
    manifest = VersionManifest.from_json(raw)
    if (manifest.job, manifest.version) != (job, version):
        raise ValueError(f"manifest is for {manifest.job}/{manifest.version}, not {job}/{version}")
    return manifest.expected(host)


def _incoming(request: web.Request, job: str, version: str, tensor: str, extra: tuple[str, ...] = (),
              length: int | None = None) -> tuple[str, tuple[int, ...], int]:
    """The checks a tensor arriving into ``version`` passes first (an upload, ``length``:
    its body's, or an adoption): exactly the query parameters dtype, shape and ``extra``;
    the element and ``--max-upload`` limits; no transformation writing the version.
    Returns ``(dtype, shape, bytes)``."""
    q = request.query
    if set(q) != {"dtype", "shape", *extra}:
        example = "".join(f"{k}=...&" for k in extra)
        raise NameError_(f"give the query parameters {', '.join([*extra, 'dtype', 'shape'])} (e.g. ?{example}"
                         f"dtype=bfloat16&shape=768,3072), and no others")
    dtype, shape = check_dtype(q["dtype"]), parse_shape(q["shape"])
    ELEMENTS.check(prod(shape), f"tensor {tensor}")
    nbytes = prod(shape) * itemsize(dtype)
    limit = request.app[Keys.CONFIG].max_upload
    if nbytes > limit or (length is not None and length > limit):
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=max(nbytes, length or 0),
                                            text=f"tensor of {max(nbytes, length or 0)} bytes is larger than "
                                                 f"this store accepts ({limit}); raise --max-upload")
    if length is not None and length != nbytes:
        raise NameError_(f"body has {length} bytes but dtype {dtype} x shape {list(shape)} needs {nbytes}")
    if (job, version) in request.app[Keys.TRANSFORMS]:
        raise Conflict(f"version {version!r} of job {job!r} is being written by a transformation")
    return dtype, shape, nbytes


async def put_tensor(request: web.Request) -> web.Response:
    job, version, rank, tensor = tensor_key(request)
    app = request.app
    owner, seconds = writer(request)
    dtype, shape, nbytes = _incoming(request, job, version, tensor, length=request.content_length)
    catalog: Catalog = app[Keys.CATALOG]
    up = catalog.open_upload(job, version, rank, tensor, nbytes, owner or "", seconds)
    link = app[Keys.LINK] if limited(request) else None
    try:
        upload = TensorUpload(up.tmp, dtype, shape)
        try:
            async for chunk in read_chunks(request, CHUNK):
                if link is not None:
                    await link.receive(len(chunk))
                upload.write(chunk)
            meta = upload.finish()
        except BaseException:
            upload.abort()
            raise
        catalog.finish_upload(up, meta)  # 404/409 if deleted or committed meanwhile
    except BaseException:
        catalog.abort_upload(up)
        raise
    app[Keys.TRAFFIC]["received"][request.headers.get(FROM_HEADER, "client")] += nbytes
    return web.json_response({"job": job, "version": version, "rank": rank, "tensor": tensor,
                              "bytes": nbytes, "crc32": meta.to_json()["crc32"], "spilled": up.spilled},
                             status=201)


async def local_info(request: web.Request) -> web.Response:
    """Where a client on this machine may write tensor files for :func:`adopt_tensor`, and
    the random key in that directory that proves it sees the same directory."""
    catalog: Catalog = request.app[Keys.CATALOG]
    return web.json_response({"name": request.app[Keys.NAME], "uploads": catalog.uploads,
                              "key_file": os.path.join(catalog.root_dir, LOCAL_KEY), "key": catalog.local_key})


async def adopt_tensor(request: web.Request) -> web.Response:
    """Adopt a tensor file a client on this machine wrote into the upload directory (the
    same owner, lease, fencing and commit checks as a PUT; the file is deleted if refused)."""
    job, version, rank, tensor = tensor_key(request)
    app = request.app
    owner, seconds = writer(request)
    catalog: Catalog = app[Keys.CATALOG]
    name = request.query.get("file", "")
    try:
        dtype, shape, nbytes = _incoming(request, job, version, tensor, extra=("file",))
        meta = catalog.adopt(job, version, rank, tensor, name, dtype, shape, owner or "", seconds)
    except BaseException:
        catalog.discard_local(name)
        raise
    app[Keys.TRAFFIC]["adopted"][request.headers.get(FROM_HEADER, "client")] += nbytes
    return web.json_response({"job": job, "version": version, "rank": rank, "tensor": tensor,
                              "bytes": nbytes, "crc32": meta.to_json()["crc32"], "spilled": False},
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


def _select(request: web.Request, job: str, version: str, rank: int, tensor: str,
            query) -> tuple[object, np.ndarray, bool]:
    """``(stored tensor, the selection of it that query names, whether that is all of it)``."""
    catalog = request.app[Keys.CATALOG]
    stored = catalog.tensor(job, version, rank, tensor)
    window = parse_window(query, stored.meta.shape)
    array = catalog.array(stored)
    return stored, (array if window is None else window.select(array)), window is None


async def _stream(request: web.Request, headers: dict, sels: list[np.ndarray]) -> web.StreamResponse:
    """Send the bytes of ``sels`` one after the other (row-major), through the simulated link."""
    app = request.app
    nbytes = sum(sel.nbytes for sel in sels)
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream",
                                                   "Content-Length": str(nbytes), **headers})
    await resp.prepare(request)
    link = app[Keys.LINK] if limited(request) else None
    idle = app[Keys.CONFIG].idle_timeout
    for sel in sels:
        for part in _parts(sel):
            if link is not None:
                await link.send(part.nbytes)
            await asyncio.wait_for(resp.write(part), idle)  # a client that stops reading is cut off
    app[Keys.TRAFFIC]["sent"][request.headers.get(FROM_HEADER, "client")] += nbytes
    await resp.write_eof()
    return resp


async def get_tensor(request: web.Request) -> web.StreamResponse:
    job, version, rank, tensor = tensor_key(request)
    stored, sel, whole = _select(request, job, version, rank, tensor, request.query)
    headers = {"X-Scalai-Dtype": stored.meta.dtype, "X-Scalai-Shape": format_shape(sel.shape)}
    if whole and stored.meta.crc32 is not None:
        headers["X-Scalai-Crc32"] = f"{stored.meta.crc32:08x}"
    return await _stream(request, headers, [sel])


#: The most bytes one ``windows`` request may ask for (a peer packs small reads up to 4 MiB).
MAX_WINDOWS_BYTES = 64 << 20


async def get_windows(request: web.Request) -> web.StreamResponse:
    """Several windows of one rank's tensors in one response, their bytes one after the
    other in the request's order (a peer's many small reads during a transformation)."""
    job, version = path_names(request)
    rank = check_rank(request.match_info["rank"])
    body = await json_body(request, "WindowsRequest")
    sels, nbytes = [], 0
    for read in body["reads"]:
        query = {k: read[k] for k in ("region", "view", "sub") if k in read}
        _, sel, _ = _select(request, job, version, rank, check_tensor_name(read["tensor"]), query)
        nbytes += sel.nbytes
        if nbytes > MAX_WINDOWS_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_WINDOWS_BYTES, actual_size=nbytes,
                                                text=f"the windows come to more than {MAX_WINDOWS_BYTES} bytes; "
                                                     f"ask for fewer per request")
        sels.append(sel)
    return await _stream(request, {"X-Scalai-Count": str(len(sels))}, sels)


async def rank_files(request: web.Request) -> web.Response:
    """The files of one rank's committed tensors, for a client on this machine to map them
    itself (no bytes through HTTP): to loopback clients, and to clients that show the key
    they read from the store's key file (a machine's own address, e.g. a worker in a
    network namespace of its own); a path means nothing elsewhere."""
    job, version = path_names(request)
    rank = check_rank(request.match_info["rank"])
    key = request.headers.get(LOCAL_KEY_HEADER, "")
    shown = hmac.compare_digest(key.encode(), request.app[Keys.CATALOG].local_key.encode())
    if not (_loopback(request.remote) or shown):
        raise web.HTTPForbidden(text=f"store {request.app[Keys.NAME]} gives file paths to clients on its "
                                     f"own machine only; read the tensors over HTTP")
    entry = request.app[Keys.CATALOG].committed(job, version)
    files = {name: {"path": t.path, "offset": DATA_OFFSET, **t.meta.to_json()}
             for (r, name), t in entry.tensors.items() if r == rank}
    return web.json_response({"job": job, "version": version, "rank": rank, "files": files})


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


async def transform(request: web.Request) -> web.Response:
    (job,) = path_names(request)
    app = request.app
    owner, seconds = writer(request)
    body = await json_body(request, "TransformRequest")
    spec = await in_pool(request, TransformSpec.from_json, job, body)  # builds PTCs: off the loop
    key = (job, spec.to_version)
    catalog: Catalog = app[Keys.CATALOG]
    headers = {FROM_HEADER: app[Keys.NAME]}
    if app[Keys.CONFIG].token:
        headers["Authorization"] = f"Bearer {app[Keys.CONFIG].token}"
    session = await _session(app)
    # no await between creating the version and registering its transformation: uploads and
    # commits of it are refused from the first moment
    entry = catalog.begin(job, spec.to_version, owner or "", seconds, body.get("claimed", False))
    task = asyncio.ensure_future(run_host_part(catalog, spec, entry, session, app[Keys.LINK], app[Keys.POOL],
                                               headers, app[Keys.CONFIG].tls))
    app[Keys.TRANSFORMS][key] = (task, owner)
    try:
        result = await task
    except BaseException as exc:
        # stopped by a delete or by its lease running out, not by the server shutting down
        stopped = isinstance(exc, asyncio.CancelledError) and task.cancelled() and not _cancelling()
        # a failed or cancelled part leaves nothing behind: the new version never existed here
        if catalog.is_current(entry) and not entry.committed:
            try:
                await asyncio.shield(_drop(app, job, spec.to_version, entry=entry))
            except NotFound:
                pass
        if stopped:
            raise NotFound(f"version {spec.to_version!r} of job {job!r} was deleted from store {app[Keys.NAME]} "
                           f"while this transformation wrote it (its lease ran out, or it was deleted); the "
                           f"transformation was cancelled") from None
        raise
    finally:
        if app[Keys.TRANSFORMS].get(key, (None,))[0] is task:
            del app[Keys.TRANSFORMS][key]
    for host, n in result["fetched_bytes"].items():
        app[Keys.TRAFFIC]["received"][host] += n
    log.info("%s: transformed %s/%s -> %s in %.2f s", app[Keys.NAME], job, spec.from_version,
             spec.to_version, result["seconds"]["total"])
    return web.json_response(result)


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (Python 3.11+ can tell)."""
    task = asyncio.current_task()
    return bool(task is not None and getattr(task, "cancelling", lambda: 0)())


async def _session(app: web.Application):
    """The client session this store uses to read from its peers (connections reused;
    ``https://`` peers verified against the store's CA bundle, or this system's CAs)."""
    import aiohttp

    if app.get(Keys.SESSION) is None:
        app[Keys.SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=16, ssl=client_context(app[Keys.CONFIG].tls)),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=60))
    return app[Keys.SESSION]


async def _start(app: web.Application) -> None:
    app[Keys.TASKS].extend([asyncio.ensure_future(_expire(app)), asyncio.ensure_future(app[Keys.GUARD].run())])


async def _close(app: web.Application) -> None:
    for task in app[Keys.TASKS]:
        task.cancel()
    if app.get(Keys.SESSION) is not None:
        await app[Keys.SESSION].close()
    for task, _ in app[Keys.TRANSFORMS].values():
        task.cancel()
    app[Keys.POOL].shutdown(wait=False)


def make_app(config: StoreConfig) -> web.Application:
    """The store's application (serve it with :func:`aiohttp.web.run_app` or a runner)."""
    check_name(config.name, "store name")
    guard = ConnectionGuard(config.max_connections, config.idle_timeout)
    app = web.Application(client_max_size=config.max_json,
                          middlewares=[guard.middleware, errors, auth(config.token)])
    app[Keys.CONFIG] = config
    app[Keys.NAME] = config.name
    app[Keys.GUARD] = guard
    app[Keys.TASKS] = []
    app[Keys.CATALOG] = Catalog(config.root, config.spill, config.memory_limit, config.name, config.lease_s)
    app[Keys.LINK] = Link(config.link_up, config.link_down)
    app[Keys.POOL] = ThreadPoolExecutor(config.workers, thread_name_prefix="store")
    app[Keys.TRANSFORMS] = {}
    app[Keys.TRAFFIC] = {"sent": defaultdict(int), "received": defaultdict(int), "adopted": defaultdict(int)}
    app[Keys.STARTED] = time.monotonic()
    app[Keys.SESSION] = None
    app.on_startup.append(_start)
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
    app.router.add_post("/v1/jobs/{job}/versions/{version}/lease", lease)
    app.router.add_post("/v1/jobs/{job}/fence", fence)
    app.router.add_get("/v1/jobs/{job}/versions/{version}/ranks/{rank}/files", rank_files, allow_head=False)
    app.router.add_post("/v1/jobs/{job}/versions/{version}/ranks/{rank}/windows", get_windows)
    app.router.add_get(tensor, get_tensor, allow_head=False)
    app.router.add_put(tensor, put_tensor)
    app.router.add_post(tensor + "/adopt", adopt_tensor)
    app.router.add_get("/v1/local", local_info, allow_head=False)
    app.router.add_post("/v1/jobs/{job}/transform", transform)
    return app
