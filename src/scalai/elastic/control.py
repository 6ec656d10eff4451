"""The runner's control endpoint: ``scalai scale JOB N`` and a status read-out, over HTTP.

::

    GET  /v1/status                      {"job", "state", "step", "steps", "layout", "hosts", ...}
    POST /v1/scale   {"devices": 4}      202 {"accepted": {...}}: the job stops after the same
                     {"layout": "tp=2,pp=1,dp=2"}  step everywhere and moves to it
                     {"redeploy": true}

It listens on 127.0.0.1 by default. On any other address it refuses to start without a
token (``--control-token-file``); with a token, every request must carry
``Authorization: Bearer <token>`` (compared in constant time). Bodies are small JSON
objects, validated strictly; nothing is unpickled. The runner writes where it listens to
``RUN_DIR/control.json`` and to ``$SCALAI_CACHE/runs/<job>.json``, where ``scalai scale``
finds it by the job's name.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from ..bounded import loads, read_json
from ..config import ParallelConfig
from .events import write_json_atomic

__all__ = ["ControlServer", "check_listen", "parse_request", "registry_path", "send_scale", "find_endpoint"]

MAX_BODY = 4096


def registry_path(job: str) -> Path:
    cache = Path(os.environ.get("SCALAI_CACHE") or Path.home() / ".cache" / "scalai")
    return cache / "runs" / f"{job}.json"


def parse_request(body: Any) -> tuple[str, Any]:
    """``(action, value)`` from a scale request body (pure).

    Raises:
        ValueError: not exactly one of devices (int >= 1), layout (text) or redeploy (true).
    """
    if not isinstance(body, dict) or len(body) != 1:
        raise ValueError('give exactly one of {"devices": N}, {"layout": "tp=..,pp=..,dp=.."}, {"redeploy": true}')
    (key, value), = body.items()
    if key == "devices" and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return key, value
    if key == "layout" and isinstance(value, str):
        return key, ParallelConfig.parse(value)
    if key == "redeploy" and value is True:
        return key, True
    raise ValueError(f"{key}={value!r}: devices must be an integer >= 1, layout a string like "
                     f"\"tp=1,pp=2,dp=2\", redeploy true")


def check_listen(host: str, token: str | None) -> None:
    """Raise ``ValueError`` unless ``host`` is loopback or a token is given."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"refusing to listen on {host} without a token; give --control-token-file "
                         f"(python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)")


class ControlServer:
    """A small HTTP server on a thread (see the module docstring).

    Args:
        status: returns the JSON status of the run.
        scale: takes ``(action, value)``; raises ``ValueError`` to refuse (400).
    """

    def __init__(self, status: Callable[[], dict], scale: Callable[[str, Any], dict],
                 host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        check_listen(host, token)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the runner prints progress
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if not token:
                    return True
                given = self.headers.get("Authorization", "")
                if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return True
                self._send(401, {"error": "missing or wrong token"})
                return False

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if not self._authorized():
                    return
                if self.path == "/v1/status":
                    self._send(200, owner.status())
                else:
                    self._send(404, {"error": f"no route {self.path}; use GET /v1/status or POST /v1/scale"})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                if self.path != "/v1/scale":
                    self._send(404, {"error": f"no route {self.path}; use POST /v1/scale"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._send(413, {"error": f"body over {MAX_BODY} bytes"})
                    return
                try:
                    body = loads(self.rfile.read(length) or b"null", "the request body", max_bytes=MAX_BODY)
                    accepted = owner.scale(*parse_request(body))
                except ValueError as exc:
                    self._send(400, {"error": str(exc)})
                    return
                self._send(202, {"accepted": accepted})

        self.status, self.scale = status, scale
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ValueError(f"the control endpoint cannot listen on {host}:{port} ({exc.strerror or exc}); "
                             f"choose another --control-port (0: any free one)") from None
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="scalai-control", daemon=True)
        self._thread.start()

    def register(self, job: str, run_dir: str | Path, **extra: Any) -> None:
        """Write where this endpoint listens (run dir and the per-user registry)."""
        entry = {"job": job, "url": self.url, "pid": os.getpid(), "run_dir": str(run_dir), **extra}
        write_json_atomic(Path(run_dir) / "control.json", entry)
        write_json_atomic(registry_path(job), entry)

    def close(self, job: str | None = None) -> None:
        self._server.shutdown()
        self._server.server_close()
        if job is not None:
            path = registry_path(job)
            try:
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
            except (OSError, ValueError):
                pass


def find_endpoint(job: str) -> str:
    """The control URL of the running job ``job`` (from the registry).

    Raises:
        FileNotFoundError: no run of that name is registered (or it ended).
    """
    path = registry_path(job)
    try:
        return read_json(path, 1 << 20, "control registry")["url"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"no running job named {job!r} (no {path}); start one with 'scalai run "
                                f"--job {job} ...', or give its endpoint with --url") from None


def send_scale(url: str, body: dict, token: str | None = None, timeout: float = 10.0) -> dict:
    """POST ``body`` to ``url``/v1/scale; returns the runner's answer.

    Raises:
        ValueError: the runner refused the request (its reason).
        ConnectionError: nothing answers at ``url``.
    """
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url.rstrip('/')}/v1/scale", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise ValueError(f"the runner refused: {reason}") from None
    except urllib.error.URLError as exc:
        raise ConnectionError(f"no runner answers at {url} ({exc.reason}); has the run ended?") from None
    except (TimeoutError, OSError) as exc:
        raise ConnectionError(f"the runner at {url} did not answer ({exc}); is it overloaded or gone?") from None
