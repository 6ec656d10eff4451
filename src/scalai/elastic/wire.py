"""JSON over HTTP between the coordinator, the agents and ``scalai scale``: one server, one client.

Every HTTP endpoint of the elastic runner is a :class:`JsonServer` and every caller a
:class:`JsonClient`, so that transport settings live here only: the token check
(``Authorization: Bearer TOKEN``, compared in constant time; a token never appears in a
URL, a log line or an error message), body limits, strict JSON, and the place where TLS
is switched on (:class:`~scalai.tls.Tls`: the server handshakes on each request's thread
and answers plain HTTP with a 400 naming its https:// URL; the client verifies the server
against the CA bundle and turns a failure into one :class:`~scalai.tls.TlsError` line).

Handlers are plain functions ``handler(request) -> (status, object)`` on a thread of their
own (long polls may block); they raise :class:`HttpError` to answer 4xx with a message,
and ``ValueError`` for a bad body (400).
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from ..net import is_loopback
from ..tls import Tls, TlsError, client_context, tls_failure

__all__ = ["Tls", "TlsError", "Request", "HttpError", "JsonServer", "JsonClient", "WireError", "is_loopback",
           "check_listen", "split_address", "refuses_connections"]

MAX_BODY = 64 << 20  # bytes; PTCs of big models are the largest bodies
HANDSHAKE_S = 10.0   # seconds a new connection may take to start TLS


def check_listen(host: str, token: str | None, what: str = "listen", flag: str = "--token-file") -> None:
    """Raise ``ValueError`` unless ``host`` is loopback or a token is given."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to {what} on {host} without a token; give {flag} FILE "
                         f"(python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)")


def split_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` (``[v6]:PORT`` too) -> ``(host, port)``.

    Raises:
        ValueError: not of that form, or the port is not 0-65535.
    """
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"{what} {text!r} must look like HOST:PORT, e.g. 10.0.0.1:7000")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {text!r}: the port must be 0-65535")
    return host, int(port)


def refuses_connections(url: str, timeout: float = 1.0) -> bool:
    """Whether the host of ``url`` actively refuses a TCP connection to its port (a reset:
    the machine answers but nothing listens there any more). A connection accepted, a
    timeout (a frozen process, a cut link, a powered-off machine) or any other error: False."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        return False


class HttpError(Exception):
    """Raised by a handler: answer ``status`` with ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    """What a handler sees: the path parameters, the query (one value per key) and the
    JSON body (``None`` for a GET)."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: Any = None
    client: str = ""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], tuple[int, Any]]


class JsonServer:
    """An HTTP server on a thread of its own, one thread per request.

    Args:
        routes: ``{(method, pattern): (handler, needs_token[, allow_nan])}``; a pattern is a
            path with ``{name}`` parameters (one path segment each). Bodies are parsed
            strictly and within bounds (:func:`scalai.bounded.loads`); ``allow_nan``
            accepts ``NaN``/``Infinity`` (a diverged loss in a metrics row).
        host / port: where to listen (``port`` 0: any free port).
        token: the bearer token routes with ``needs_token`` require; checked only when set.
        tls: serve HTTPS (``tls.cert``/``tls.key``). The handshake runs on the request's
            thread, within :data:`HANDSHAKE_S` (a connection that sends nothing cannot stall
            the server), and a plain-HTTP request is answered 400 saying to use https://.
        name: for error messages.

    Raises:
        ValueError: the address cannot be bound (in use, not an address of this machine).
    """

    def __init__(self, routes: dict[tuple[str, str], tuple[Handler, bool]], host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, tls: Tls | None = None, name: str = "server"):
        compiled = []
        for (method, pattern), (handler, needs_token, *nan) in routes.items():
            regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$"
            compiled.append((method, re.compile(regex), handler, needs_token, bool(nan and nan[0])))
        owner = self
        expected = f"Bearer {token}".encode() if token else None

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: the owner prints what matters
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                parts = urlsplit(self.path)
                raw = b""
                if method == "POST":  # read the whole body first: the connection is reused
                    try:
                        length = int(self.headers.get("Content-Length") or 0)
                    except ValueError:
                        length = -1
                    if not 0 <= length <= MAX_BODY:
                        self.close_connection = True
                        self._send(413, {"error": f"body must be 0-{MAX_BODY} bytes"})
                        return
                    raw = self.rfile.read(length)
                allowed = []
                for m, regex, handler, needs_token, allow_nan in compiled:
                    match = regex.match(parts.path)
                    if not match:
                        continue
                    allowed.append(m)
                    if m != method:
                        continue
                    if needs_token and expected is not None:
                        given = self.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
                        if not hmac.compare_digest(given, expected):
                            self._send(401, {"error": "missing or wrong token (Authorization: Bearer ...)"})
                            return
                    self._run(method, parts, match.groupdict(), handler, raw, allow_nan)
                    return
                if allowed:
                    self._send(405, {"error": f"{method} {parts.path}: use {', '.join(sorted(set(allowed)))}"})
                else:
                    self._send(404, {"error": f"no route {parts.path} on the {owner.name}"})

            def _run(self, method: str, parts, params: dict, handler: Handler, raw: bytes,
                     allow_nan: bool) -> None:
                from ..bounded import loads

                body = None
                if method == "POST":
                    try:
                        body = loads(raw or b"null", "the request body", allow_nan=allow_nan)
                    except ValueError as exc:
                        self._send(400, {"error": str(exc)})
                        return
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                request = Request(method, parts.path, params, query, body, self.client_address[0],
                                  dict(self.headers.items()))
                try:
                    code, obj = handler(request)
                except HttpError as exc:
                    code, obj = exc.status, {"error": exc.message}
                except ValueError as exc:  # bad input: the message says what and how to fix it
                    code, obj = 400, {"error": str(exc)}
                except (TypeError, KeyError) as exc:  # a body of the wrong shape
                    code, obj = 400, {"error": f"malformed request ({type(exc).__name__}: {exc})"}
                try:
                    self._send(code, obj)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller went away (a long poll it gave up on)

            def do_GET(self) -> None:  # noqa: N802 - http.server's names
                self._dispatch("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._dispatch("POST")

        self.name = name
        try:
            context = tls.server_context() if tls is not None and tls.serves else None
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise ValueError(f"the {name} cannot listen on {host}:{port} ({exc.strerror or exc}); choose another "
                             f"address or port (0: any free one)") from None
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if context else 'http'}://{shown}:{self.port}"
        self._server.tls, self._server.what = context, f"the {name} serves HTTPS: use {self.url}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"scalai-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls = None   # an ssl.SSLContext: serve HTTPS
    what = ""    # the answer to a plain-HTTP request when serving HTTPS

    def process_request_thread(self, request, client_address) -> None:
        """With TLS, the handshake happens here, on the request's thread (not in ``accept``
        on the serving thread, where one silent client would stall every other)."""
        if self.tls is None:
            return super().process_request_thread(request, client_address)
        try:
            request.settimeout(HANDSHAKE_S)
            first = request.recv(1, socket.MSG_PEEK)
            if first and first != b"\x16":  # not a TLS handshake record: plain HTTP
                _refuse_plain(request, self.what)
                self.shutdown_request(request)
                return
            conn = self.tls.wrap_socket(request, server_side=True)
            conn.settimeout(None)
        except OSError:  # ssl.SSLError too: a bad handshake, a client that went away
            self.shutdown_request(request)
            return
        try:
            self.finish_request(conn, client_address)
        except Exception:  # noqa: BLE001 - socketserver's own policy
            self.handle_error(conn, client_address)
        finally:
            self.shutdown_request(conn)

    def handle_error(self, request, client_address) -> None:
        """A caller that went away (a poll cut short, a machine that froze) is not news."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, OSError)):
            super().handle_error(request, client_address)


def _refuse_plain(sock: socket.socket, message: str) -> None:
    """Answer a plain-HTTP request on an HTTPS port with 400 and ``message`` (JSON), having
    read its head (so that closing does not reset the connection before the answer)."""
    head = b""
    try:
        sock.settimeout(1.0)
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        data = json.dumps({"error": message}).encode()
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    except OSError:
        pass


class WireError(Exception):
    """The other side answered with an error (``status``, its message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class JsonClient:
    """Calls a :class:`JsonServer` at ``url`` (``http://HOST:PORT``), reusing connections.

    ``https://`` URLs verify the server against ``tls.ca`` (None: this system's CAs).

    Raises (from :meth:`get` and :meth:`post`):
        WireError: the server answered 4xx/5xx (its message).
        TlsError: the server's certificate does not verify, or it does not speak TLS.
        ConnectionError: nothing answers, or no answer within ``timeout`` seconds.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0, tls: Tls | None = None):
        import urllib3

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"address {url!r} is not like http://HOST:PORT")
        self.url, self.timeout, self.tls = url.rstrip("/"), timeout, tls
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        if parts.scheme == "https":
            context = client_context(tls)
            self._pool = urllib3.HTTPSConnectionPool(parts.hostname, parts.port, maxsize=4, ssl_context=context,
                                                     retries=False)
        else:
            self._pool = urllib3.HTTPConnectionPool(parts.hostname, parts.port, maxsize=4, retries=False)

    def get(self, path: str, timeout: float | None = None) -> Any:
        return self._call("GET", path, None, timeout)

    def post(self, path: str, body: Any, timeout: float | None = None) -> Any:
        return self._call("POST", path, json.dumps(body).encode(), timeout)

    def _call(self, method: str, path: str, body: bytes | None, timeout: float | None) -> Any:
        import urllib3

        wait = self.timeout if timeout is None else timeout
        try:
            resp = self._pool.urlopen(method, path, body=body, headers=self._headers, redirect=False,
                                      timeout=urllib3.Timeout(connect=min(5.0, wait), read=wait))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            failure = tls_failure(exc, self.url, self.tls)
            if failure is not None:
                raise failure from None
            raise ConnectionError(f"{self.url} does not answer ({type(exc).__name__})") from None
        try:
            obj = json.loads(resp.data or b"null")
        except ValueError:
            obj = None
        if resp.status >= 400:
            message = obj.get("error") if isinstance(obj, dict) else None
            raise WireError(resp.status, str(message or f"HTTP {resp.status}"))
        return obj

    def close(self) -> None:
        self._pool.close()
