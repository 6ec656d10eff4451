"""A synchronous Python client of one store: connection reuse, streaming, retries.

:class:`StoreClient` keeps a pool of HTTP connections to its store (thread-safe, so one
client serves many threads: :meth:`StoreClient.read_many` runs ranged reads in parallel).
Idempotent requests (GET, PUT of a tensor, DELETE, commit) are retried on connection
errors with exponential backoff; when the store stays unreachable the error names it::

    StoreUnavailable: store host2 (http://10.0.0.3:7070) is unreachable after 4 attempts
    (connection refused); is 'scalai store serve' running there?

A client on the store's own machine (proven, see :mod:`scalai.store.local`) writes tensor
files into the store's upload directory and has them adopted instead of sending their
bytes (:meth:`StoreClient.put`); anywhere else it uploads over HTTP.

Arrays cross the API as raw bits (:func:`scalai.storage.arrays.as_raw`): uploads take
numpy arrays or torch tensors of the declared dtype; reads return the dtype's unsigned
integer type of the same width (use :func:`scalai.storage.arrays.to_torch` to get a
typed tensor).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator
from urllib.parse import quote, urlencode, urlsplit

import numpy as np

from ..bounded import read_regular
from ..storage.arrays import as_raw
from ..dtypes import raw_numpy
from ..planner.plan import Window
from ..regions import Region
from ..tls import PLAIN_HINT, Tls, client_context, tls_failure
from .errors import StoreRequestError, StoreUnavailable
from .files import TensorMeta, local_name, write_tensor_file
from .lease import LEASE_HEADER, OWNER_HEADER
from .local import LOCAL_KEY_HEADER, discover, local_enabled, unlink_quietly as _unlink
from .names import check_name, check_rank, check_tensor_name, format_shape, parse_shape, window_query

__all__ = ["StoreClient", "load_token", "TOKEN_ENV"]

TOKEN_ENV = "SCALAI_TOKEN"
MIN_TOKEN = 16


def load_token(token_file: str | os.PathLike | None = None, env: bool = True) -> str | None:
    """The shared token: from ``token_file`` if given, else ``$SCALAI_TOKEN``, else None.

    Raises:
        ValueError: the file is missing or empty, or the token is shorter than 16 characters.
    """
    if token_file is not None:
        try:
            token = read_regular(token_file, 64 << 10, "token file").decode("utf-8", "replace").strip()
        except FileNotFoundError:
            raise ValueError(f"cannot read token file {token_file}: it does not exist") from None
        where = f"token file {token_file}"
    elif env and os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise ValueError(f"the token in {where} must be at least {MIN_TOKEN} characters without spaces; "
                         f"make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


class StoreClient:
    """Client of the store at ``url`` (``http://host:port``).

    Args:
        token: the store's token (see :func:`load_token`), or None for a loopback store
            without one.
        timeout: seconds to wait for each read from the socket (transformations: none).
        retries: attempts on connection errors; waits ``backoff``, 2x, 4x... seconds between.
        pool_size: connections kept open (and the most requests in flight at once).
        from_host: the name of the host this client runs on; requests from a store's own
            host are not counted against its simulated link (see ``ratelimit.py``).
        tls: ``https://`` stores are verified against ``tls.ca`` (None: this system's CAs);
            a certificate that does not verify raises :class:`~scalai.tls.TlsError` at once.
        local: write tensors straight into the store's upload directory when this process
            sees it (:mod:`scalai.store.local`); default: unless ``SCALAI_STORE_LOCAL=0``.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 0.2, pool_size: int = 8, from_host: str | None = None, tls: Tls | None = None,
                 local: bool | None = None):
        import urllib3

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"store address {url!r} is not like http://HOST:PORT")
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.timeout = max(1, retries), backoff, timeout
        self._name: str | None = None
        self.tls = tls
        kw = {"ssl_context": client_context(tls)} if parts.scheme == "https" else {}
        cls = urllib3.HTTPSConnectionPool if parts.scheme == "https" else urllib3.HTTPConnectionPool
        self._pool = cls(parts.hostname, parts.port, maxsize=pool_size, block=True, retries=False,
                         timeout=urllib3.Timeout(connect=5.0, read=timeout), **kw)
        self.local = local_enabled() if local is None else bool(local)
        self._local_dir: str | None | bool = False  # False: not asked yet
        self._local_key = ""  # the store's key, as read from its key file
        self.adoptions = 0  # tensors stored through the upload directory (no HTTP body)
        self._headers = {"X-Scalai-From": from_host} if from_host else {}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    # -- plumbing ---------------------------------------------------------------------
    @property
    def label(self) -> str:
        return f"{self._name} ({self.url})" if self._name else self.url

    def _request(self, method: str, path: str, *, query: dict | None = None, body=None,
                 headers: dict | None = None, stream: bool = False, timeout: Any = "default",
                 idempotent: bool = True):
        import urllib3

        target = path + ("?" + urlencode(query) if query else "")
        all_headers = {**self._headers, **(headers or {})}
        kwargs = {} if timeout == "default" else {"timeout": urllib3.Timeout(connect=5.0, read=timeout)}
        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._pool.urlopen(method, target, body=body, headers=all_headers, retries=False,
                                          preload_content=not stream, redirect=False, **kwargs)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failure = tls_failure(exc, self.url, self.tls, f"store {self._name}" if self._name else "the store")
                if failure is not None:
                    raise failure from None
                last = exc
                connect = isinstance(exc, (urllib3.exceptions.NewConnectionError,
                                           urllib3.exceptions.ConnectTimeoutError))
                if not idempotent and not connect:
                    break
                continue
            if resp.status >= 400:
                raise self._refused(method, path, resp)
            return resp
        reason = _reason(last)
        hint = f" ({PLAIN_HINT})" if self.url.startswith("http:") and reason == "remote end closed connection" else ""
        raise StoreUnavailable(f"store {self.label} is unreachable after {attempt + 1} attempts ({reason}); "
                               f"is 'scalai store serve' running there?{hint}", self._name or self.url)

    def _refused(self, method: str, path: str, resp) -> StoreRequestError:
        data = resp.data if resp.data is not None else resp.read()
        try:
            err = json.loads(data)["error"]
            code, message = str(err.get("code", "error")), str(err.get("message", ""))
            host = err.get("host")
        except (ValueError, KeyError, TypeError):
            code, message, host = "error", data[:200].decode("utf-8", "replace"), None
        where = f"store {self.label}"
        if host and host != self._name:
            where += f" (peer {host})"
        return StoreRequestError(f"{where}: {method} {path}: {resp.status} {message}",
                                 host or self._name or self.url, resp.status, code)

    def _json(self, method: str, path: str, obj: Any = None, headers: dict | None = None, **kw) -> Any:
        body = None if obj is None else json.dumps(obj).encode()
        headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        return json.loads(self._request(method, path, body=body, headers=headers, **kw).data)

    @staticmethod
    def _writer(owner: str | None, lease: float | None = None) -> dict[str, str]:
        """Headers naming the writer (see :mod:`scalai.store.lease`)."""
        out = {}
        if owner is not None:
            out[OWNER_HEADER] = check_name(owner, "owner")
        if lease is not None:
            out[LEASE_HEADER] = f"{lease:g}"
        return out

    @staticmethod
    def _tensor_path(job: str, version: str, rank: int, tensor: str) -> str:
        check_name(job, "job"), check_name(version, "version"), check_rank(rank), check_tensor_name(tensor)
        return f"/v1/jobs/{job}/versions/{version}/ranks/{rank}/tensors/{quote(tensor)}"

    # -- API --------------------------------------------------------------------------
    def health(self) -> dict:
        out = self._json("GET", "/v1/health")
        self._name = out["name"]
        return out

    @property
    def name(self) -> str:
        """The store's host name (asked once)."""
        if self._name is None:
            self.health()
        return self._name

    def usage(self) -> dict:
        return self._json("GET", "/v1/usage")

    def jobs(self) -> list[dict]:
        return self._json("GET", "/v1/jobs")["jobs"]

    def job(self, job: str) -> dict:
        return self._json("GET", f"/v1/jobs/{check_name(job, 'job')}")

    def version(self, job: str, version: str, tensors: bool = True) -> dict:
        return self._json("GET", f"/v1/jobs/{check_name(job, 'job')}/versions/{check_name(version, 'version')}",
                          query=None if tensors else {"tensors": "false"})

    def files(self, job: str, version: str, rank: int) -> dict[str, dict]:
        """``{tensor: {path, offset, dtype, shape, bytes, crc32}}``: the files of a committed
        rank, for a client on the store's own machine to map (loopback, or one that read the
        store's key: :meth:`local_dir`; the store refuses others)."""
        headers = {LOCAL_KEY_HEADER: self._local_key} if self.local_dir() is not None else None
        return self._json("GET", f"/v1/jobs/{check_name(job, 'job')}/versions/{check_name(version, 'version')}"
                                 f"/ranks/{int(rank)}/files", headers=headers)["files"]

    def local_dir(self) -> str | None:
        """The store's upload directory when this process sees it (same machine and mount
        namespace: it reads the store's key there), else None (asked once)."""
        if self._local_dir is False:
            found = None
            if self.local:
                try:
                    info = self._json("GET", "/v1/local")
                    found = discover(info)
                    self._local_key = str(info["key"]) if found is not None else ""
                except StoreRequestError:  # a store without the route: HTTP
                    found = None
            self._local_dir = found
        return self._local_dir

    def adopt(self, job: str, version: str, rank: int, tensor: str, path: str, meta: TensorMeta,
              owner: str | None = None, lease: float | None = None) -> dict:
        """Have the store adopt the tensor file ``path`` (written with its CRC-32 into
        :meth:`local_dir`) as ``tensor`` of ``rank``; the file is gone afterwards, adopted
        or (refused, failed) deleted by the store, or by this call when the request
        failed. Returns what :meth:`put` returns."""
        try:
            out = self._json("POST", self._tensor_path(job, version, rank, tensor) + "/adopt",
                             query={"file": os.path.basename(path), "dtype": meta.dtype,
                                    "shape": format_shape(meta.shape)},
                             headers=self._writer(owner, lease), idempotent=False)
        except BaseException:
            _unlink(path)
            raise
        self.adoptions += 1
        return out

    def put(self, job: str, version: str, rank: int, tensor: str, array, dtype: str, owner: str | None = None,
            lease: float | None = None, local: bool = True) -> dict:
        """Store ``array`` (numpy or torch, dtype ``dtype``, the local shape) as ``tensor``
        of ``rank``, replaced if stored before (uncommitted): written into the store's
        upload directory and adopted when this process sees it (:meth:`local_dir`), else
        streamed over HTTP from its memory.

        ``owner``: the writer's id (the version is created for it, or must be its own);
        ``lease``: seconds the version lives without renewal (see :mod:`scalai.store.lease`);
        ``local=False``: over HTTP in any case.
        """
        raw = as_raw(array, dtype, f"{tensor} of rank {rank}")
        uploads = self.local_dir() if local else None
        if uploads is not None:
            out = self._put_local(uploads, job, version, rank, tensor, raw, dtype, owner, lease)
            if out is not None:
                return out
        raw = np.ascontiguousarray(raw)
        body = _Chunks(memoryview(raw.reshape(-1).view(np.uint8)) if raw.size else memoryview(b""))
        resp = self._request("PUT", self._tensor_path(job, version, rank, tensor), body=body,
                             query={"dtype": dtype, "shape": format_shape(raw.shape)},
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Length": str(raw.nbytes), **self._writer(owner, lease)})
        return json.loads(resp.data)

    def _put_local(self, uploads: str, job: str, version: str, rank: int, tensor: str, raw: np.ndarray,
                   dtype: str, owner: str | None, lease: float | None) -> dict | None:
        """:meth:`put` through the upload directory; None where the file cannot be written
        there, or the store has no room for it in memory (then HTTP, which may spill)."""
        path = local_name(uploads)
        try:
            meta = write_tensor_file(path, raw, dtype)
        except OSError:  # e.g. the directory went away with its store: HTTP says what is wrong
            return None
        try:
            return self.adopt(job, version, rank, tensor, path, meta, owner, lease)
        except StoreRequestError as exc:
            if exc.status == 507:
                return None
            raise

    def read(self, job: str, version: str, rank: int, tensor: str, window: Window | Region | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Raw array of a stored tensor or of a window of it (sliced on the server).

        ``out``: a raw array of the selection's shape to read into (no other copy is made
        when it is contiguous); returned.
        """
        path = self._tensor_path(job, version, rank, tensor)
        for attempt in range(self.retries):
            resp = self._request("GET", path, query=window_query(window), stream=True)
            try:
                dtype = raw_numpy(resp.headers["X-Scalai-Dtype"])
                shape = parse_shape(resp.headers["X-Scalai-Shape"])
                target = out if out is not None and out.flags.c_contiguous else np.empty(shape, dtype)
                if target.shape != shape or target.dtype.itemsize != dtype.itemsize:
                    raise ValueError(f"out has shape {target.shape}, the selection is {shape}")
                _read_exact(resp, memoryview(target.reshape(-1).view(np.uint8)) if target.size else None)
                break
            except (OSError, ConnectionError, _urllib3_errors()) as exc:
                if attempt == self.retries - 1:
                    raise StoreUnavailable(f"store {self.label} broke off sending {tensor} of rank {rank}: "
                                           f"{_reason(exc)}", self._name or self.url) from None
            finally:
                resp.release_conn()
        if out is not None and target is not out:
            np.copyto(out, target)
            return out
        return target

    def stream(self, job: str, version: str, rank: int, tensor: str, window: Window | Region | None = None,
               chunk: int = 4 << 20) -> Iterator[bytes]:
        """The bytes of a tensor (or window) in chunks of at most ``chunk`` bytes, as they arrive."""
        resp = self._request("GET", self._tensor_path(job, version, rank, tensor), query=window_query(window),
                             stream=True)
        total, pos = int(resp.headers.get("Content-Length", -1)), 0
        try:
            while True:
                data = resp.read(chunk)
                if not data:
                    break
                pos += len(data)
                yield data
        except (OSError, _urllib3_errors()) as exc:
            raise StoreUnavailable(f"store {self.label} broke off sending {tensor} of rank {rank} after "
                                   f"{pos} bytes: {_reason(exc)}", self._name or self.url) from None
        finally:
            resp.release_conn()
        if total >= 0 and pos != total:
            raise StoreUnavailable(f"store {self.label} sent {pos} of {total} bytes of {tensor} of rank {rank}",
                                   self._name or self.url)

    def read_many(self, items: Iterable[tuple], workers: int = 8) -> list[np.ndarray]:
        """:meth:`read` for many ``(job, version, rank, tensor, window[, out])`` in parallel."""
        items = list(items)
        with ThreadPoolExecutor(max(1, min(workers, len(items) or 1))) as pool:
            return list(pool.map(lambda it: self.read(*it), items))

    def commit(self, job: str, version: str, manifest: dict, owner: str | None = None) -> dict:
        return self._json("POST", f"/v1/jobs/{check_name(job, 'job')}/versions/{check_name(version, 'version')}/commit",
                          {"manifest": manifest}, headers=self._writer(owner))

    def delete(self, job: str, version: str | None = None, owner: str | None = None) -> dict:
        """Delete a version (or the whole job); with ``owner``, only a version that owner
        created (409 otherwise): a writer's cleanup never removes another's version."""
        path = f"/v1/jobs/{check_name(job, 'job')}"
        if version is not None:
            path += f"/versions/{check_name(version, 'version')}"
        return self._json("DELETE", path, headers=self._writer(owner))

    def lease(self, job: str, version: str, owner: str, seconds: float | None = None, create: bool = False,
              timeout: float | None = None) -> dict:
        """Renew ``owner``'s lease of an uncommitted version, or claim it (``create``);
        ``timeout``: seconds to wait for the answer (default: the client's)."""
        kw = {} if timeout is None else {"timeout": timeout}
        return self._json("POST", f"/v1/jobs/{check_name(job, 'job')}/versions/{check_name(version, 'version')}"
                                  f"/lease", query={"create": "true" if create else "false"},
                          headers=self._writer(owner, seconds), **kw)

    def fence(self, job: str, generation: int) -> dict:
        """Refuse writers of ``job``'s generations below ``generation`` (see ``Catalog.fence``)."""
        return self._json("POST", f"/v1/jobs/{check_name(job, 'job')}/fence", {"generation": int(generation)})

    def transform(self, job: str, request: dict, owner: str | None = None, lease: float | None = None) -> dict:
        """Run this store's part of a transformation (blocks until it is done)."""
        return self._json("POST", f"/v1/jobs/{check_name(job, 'job')}/transform", request,
                          timeout=None, idempotent=False, headers=self._writer(owner, lease))

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreClient({self.label})"


class _Chunks:
    """A request body sent 1 MiB at a time (re-iterable, for retries). Sending a large
    buffer in one call would have to finish within the socket's timeout (the connect
    timeout, while a request is sent); per chunk, a slow link never trips it."""

    def __init__(self, view: memoryview, size: int = 1 << 20):
        self.view, self.size = view, size

    def __iter__(self):
        return (self.view[i:i + self.size] for i in range(0, self.view.nbytes, self.size))


def _urllib3_errors():
    import urllib3

    return urllib3.exceptions.HTTPError


def _read_exact(resp, view: memoryview | None) -> None:
    pos, total = 0, 0 if view is None else view.nbytes
    while pos < total:
        n = resp.readinto(view[pos:pos + (8 << 20)])
        if not n:
            raise ConnectionError(f"connection closed after {pos} of {total} bytes")
        pos += n
    if resp.read(1):
        raise ConnectionError("the store sent more bytes than announced")


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    text = str(exc)
    for known in ("Connection refused", "timed out", "Connection reset", "Name or service not known",
                  "Remote end closed connection", "No route to host"):
        if known.lower() in text.lower():
            return known.lower()
    return text[:200] or type(exc).__name__

