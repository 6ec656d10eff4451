"""``scalai scale`` and ``scalai run``'s registry: finding a running job and asking it to change.

The coordinator of a run (:mod:`.coordinator`) serves, besides its agents::

    GET  /v1/status                      {"job", "state", "step", "steps", "layout", "hosts", ...}
    POST /v1/scale   {"devices": 4}      202 {"accepted": {...}}: the job stops after the same
                     {"layout": "tp=2,pp=1,dp=2"}  step everywhere and moves to it
                     {"redeploy": true}

With the run's token set (required off loopback), every request must carry
``Authorization: Bearer <token>`` (compared in constant time). Bodies are small JSON
objects, validated strictly (:func:`parse_request`); nothing is unpickled. The runner
writes where it listens to ``RUN_DIR/control.json`` and to
``$SCALAI_CACHE/runs/<job>.json`` (:func:`register`), where ``scalai scale`` finds it by
the job's name (:func:`find_endpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..bounded import read_json
from ..config import ParallelConfig
from .events import write_json_atomic

__all__ = ["parse_request", "registry_path", "register", "unregister", "send_scale", "find_endpoint"]


def registry_path(job: str) -> Path:
    cache = Path(os.environ.get("SCALAI_CACHE") or Path.home() / ".cache" / "scalai")
    return cache / "runs" / f"{job}.json"


def register(job: str, url: str, run_dir: str | Path, **extra: Any) -> None:
    """Write where the run of ``job`` listens (its run directory and the per-user registry)."""
    entry = {"job": job, "url": url, "pid": os.getpid(), "run_dir": str(run_dir), **extra}
    write_json_atomic(Path(run_dir) / "control.json", entry)
    write_json_atomic(registry_path(job), entry)


def unregister(job: str) -> None:
    """Remove ``job`` from the registry if this process registered it."""
    path = registry_path(job)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


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


def send_scale(url: str, body: dict, token: str | None = None, timeout: float = 10.0, tls=None) -> dict:
    """POST ``body`` to ``url``/v1/scale; returns the runner's answer (an ``https://`` runner
    verified against ``tls.ca``).

    Raises:
        ValueError: the runner refused the request (its reason).
        TlsError: its certificate does not verify, or it does not speak TLS.
        ConnectionError: nothing answers at ``url``.
    """
    from .wire import JsonClient, WireError

    try:
        return JsonClient(url, token, timeout=timeout, tls=tls).post("/v1/scale", body)
    except WireError as exc:
        raise ValueError(f"the runner refused: {exc.message}") from None
    except ConnectionError:
        raise ConnectionError(f"no runner answers at {url} (or it did not answer within {timeout:g} s); "
                              f"has the run ended?") from None
