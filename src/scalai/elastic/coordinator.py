"""The coordinator's side of the agent protocol: registrations, heartbeats, reports, commands.

One :class:`~.wire.JsonServer` serves the agents and ``scalai scale``::

    POST /v1/agents/join                  an agent registers (its name, devices, store)
    POST /v1/agents/{name}/report         what happened on its machine since the last report;
                                          sent at least every heartbeat_s (the heartbeat)
    GET  /v1/agents/{name}/commands       long poll: the commands after ?after=SEQ
    GET  /v1/status                       the run's state (scalai scale, humans)
    POST /v1/scale                        {"devices": N} | {"layout": L} | {"redeploy": true}

Agent routes always need the run's token; the control routes need it when the run has
one (required off loopback). An agent is identified by its name and an *incarnation*
(random, new at every start); the coordinator by an *epoch* (random, new at every start).
A report or poll with an incarnation or epoch the coordinator does not know is answered
410: the agent kills whatever it runs for the job and joins again. That is how agents
find a coordinator started again, and how a machine declared dead that comes back
(SIGCONT, a link restored) is fenced out before it is used again.

Everything an agent sends becomes an item on the run's queue (``on_item``):
``("joined", AgentRecord, previous record or None)``, ``("data", host, {"digest", "path"[,
"error"]})`` (the agent's copy of the data: it counts as joined from then on),
``("row", gen, row)``, ``("report", gen, rank, report)``,
``("ptc", gen, ready, ptc_json)``, ``("exit", gen, rank, code)``, ``("leaving", host)``,
``("logs", host, {gen: {rank: text}})``; the run (:mod:`.runner`) turns them into
the controller's events. Dead agents are found by :meth:`AgentService.overdue` (pure
rule: :func:`overdue`).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from .wire import HttpError, JsonServer, Request, Tls, is_loopback

__all__ = ["AgentRecord", "AgentService", "overdue", "HEARTBEAT_S", "DEAD_AFTER_S", "parse_join"]

HEARTBEAT_S = 1.0    # an agent reports at least this often
DEAD_AFTER_S = 5.0   # an agent unheard of this long is dead (its machine stopped, its link cut)
MAX_WAIT_S = 30.0    # longest long poll


def overdue(last_seen: dict[str, float], now: float, dead_after: float) -> list[str]:
    """Agents not heard from for more than ``dead_after`` seconds (pure), sorted."""
    return sorted(h for h, t in last_seen.items() if now - t > dead_after)


@dataclass
class AgentRecord:
    """One registered agent (see the module docstring)."""

    name: str
    incarnation: str
    address: str
    store: str
    devices: int
    kind: str
    memory_gib: float
    last_step: int
    last_generation: int
    last_seen: float
    state: str = "up"  # up | released (may go; not watched) | dead | gone
    leaving: bool = False
    commands: list[dict] = field(default_factory=list)
    next_seq: int = 1
    fetched: int = 0  # the highest command seq handed out
    data: dict | None = None


def _field(body: dict, key: str, kind, what: str, optional: bool = False):
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{what}: {key} must be {getattr(kind, '__name__', kind)}")
    return value


def parse_join(body: Any) -> dict:
    """The fields of a join request, checked (pure).

    Raises:
        ValueError: a field is missing or of the wrong type.
    """
    from ..store.names import check_name

    if not isinstance(body, dict):
        raise ValueError("a join request is a JSON object")
    name = check_name(_field(body, "name", str, "join"), "agent name")
    devices = _field(body, "devices", dict, "join")
    count = _field(devices, "count", int, "join devices")
    if count < 1:
        raise ValueError("join: devices.count must be at least 1")
    kind = _field(devices, "kind", str, "join devices")
    if kind not in ("cpu", "cuda"):
        raise ValueError("join: devices.kind must be cpu or cuda")
    return {"name": name, "incarnation": _field(body, "incarnation", str, "join"),
            "address": _field(body, "address", str, "join"), "store": _field(body, "store", str, "join"),
            "devices": count, "kind": kind, "memory_gib": float(devices.get("memory_gib") or 0.0),
            "last_step": _field(body, "last_step", int, "join", optional=True) or 0,
            "last_generation": _field(body, "last_generation", int, "join", optional=True)
            if body.get("last_generation") is not None else -1}


class AgentService:
    """The agents of one run, behind the coordinator's HTTP server.

    Args:
        on_item: receives every item an agent sends (see the module docstring), from the
            server's threads.
        welcome: what a joining agent is told about the job (the trainer, its data).
        status / scale: the control routes' handlers (``scale`` raises ValueError to refuse).
        host / port / token / tls: where and how to listen (``tls`` serving HTTPS: agents
            whose store serves plain HTTP off loopback are refused).
        control_token: the token the control routes need (None: none).
    """

    def __init__(self, on_item: Callable[[tuple], None], welcome: dict, status: Callable[[], dict],
                 scale: Callable[[dict], dict], host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 control_token: str | None = None, tls: Tls | None = None, heartbeat_s: float = HEARTBEAT_S,
                 dead_after_s: float = DEAD_AFTER_S):
        self.on_item, self.welcome = on_item, welcome
        self.epoch = secrets.token_hex(8)
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.agents: dict[str, AgentRecord] = {}
        self._cv = threading.Condition()
        self._status, self._scale = status, scale
        agent = token is not None
        routes = {
            ("POST", "/v1/agents/join"): (self._join, agent),
            ("POST", "/v1/agents/{name}/report"): (self._report, agent, True),  # a loss may be NaN
            ("GET", "/v1/agents/{name}/commands"): (self._commands, agent),
            ("GET", "/v1/status"): (lambda r: (200, self._status()), False),
            ("POST", "/v1/scale"): (self._scale_route, False),
        }
        # One server, two tokens at most: the control routes check theirs themselves.
        self._control_token = control_token
        self._tls = tls is not None and tls.serves
        self.server = JsonServer(routes, host, port, token, tls, name="coordinator")
        self.url = self.server.url

    # -- routes -----------------------------------------------------------------------
    def _control(self, request: Request) -> None:
        if self._control_token is None:
            return
        import hmac

        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {self._control_token}".encode()):
            raise HttpError(401, "missing or wrong token (scalai scale --token-file FILE)")

    def _scale_route(self, request: Request) -> tuple[int, Any]:
        self._control(request)
        return 202, {"accepted": self._scale(request.body)}

    def _join(self, request: Request) -> tuple[int, Any]:
        info = parse_join(request.body)
        if self._tls and info["store"].startswith("http:") and not is_loopback(urlsplit(info["store"]).hostname or ""):
            raise HttpError(400, f"this run serves HTTPS, but the store of {info['name']} ({info['store']}) serves "
                                 f"plain HTTP: start the agent with --tls-cert/--tls-key (and --tls-ca)")
        now = time.monotonic()
        with self._cv:
            old = self.agents.get(info["name"])
            if old is not None and old.incarnation == info["incarnation"] and old.state == "up":
                old.last_seen = now
                return 200, self._welcome(old)
            if old is not None and old.state == "up" and now - old.last_seen <= self.dead_after_s:
                raise HttpError(409, f"an agent named {info['name']} is registered and alive; give each machine "
                                     f"its own --name (or wait {self.dead_after_s:g} s after stopping the old one)")
            record = AgentRecord(info["name"], info["incarnation"], info["address"], info["store"], info["devices"],
                                 info["kind"], info["memory_gib"], info["last_step"], info["last_generation"], now)
            self.agents[record.name] = record
            self._cv.notify_all()
        self.on_item(("joined", record, old))
        return 200, self._welcome(record)

    def _welcome(self, record: AgentRecord) -> dict:
        return {"epoch": self.epoch, "heartbeat_s": self.heartbeat_s, "dead_after_s": self.dead_after_s,
                **self.welcome}

    def _known(self, request: Request, incarnation: Any, epoch: Any) -> AgentRecord:
        record = self.agents.get(request.params["name"])
        if record is None or record.incarnation != incarnation or epoch != self.epoch \
                or record.state not in ("up", "released"):
            raise HttpError(410, "this coordinator does not know this agent (any more): join again")
        record.last_seen = time.monotonic()
        return record

    def _report(self, request: Request) -> tuple[int, Any]:
        body = request.body
        if not isinstance(body, dict):
            raise ValueError("a report is a JSON object")
        with self._cv:
            record = self._known(request, body.get("incarnation"), body.get("epoch"))
        host = record.name
        items = []
        for gen, row in body.get("metrics", []):
            items.append(("row", int(gen), dict(row)))
        for gen, ready, ptc in body.get("ptcs", []):
            items.append(("ptc", int(gen), bool(ready), ptc))
        for gen, rank, report in body.get("reports", []):
            items.append(("report", int(gen), int(rank), dict(report)))
        if body.get("logs"):  # before the exits they explain (the last exit may end the run)
            items.append(("logs", host, body["logs"]))
        for gen, rank, code in body.get("exits", []):
            items.append(("exit", int(gen), int(rank), int(code)))
        if body.get("data") is not None:
            record.data = body["data"]
            items.append(("data", host, body["data"]))
        if body.get("leaving") and not record.leaving:
            record.leaving = True
            items.append(("leaving", host))
        for item in items:
            self.on_item(item)
        return 200, {"ok": True}

    def _commands(self, request: Request) -> tuple[int, Any]:
        q = request.query
        try:
            after = int(q.get("after", "0"))
            wait = min(MAX_WAIT_S, max(0.0, float(q.get("wait", "0"))))
        except ValueError:
            raise ValueError("after must be an integer, wait a number of seconds") from None
        deadline = time.monotonic() + wait
        with self._cv:
            record = self._known(request, q.get("incarnation"), q.get("epoch"))
            record.commands = [c for c in record.commands if c["seq"] > after]  # acknowledged ones go
            while not record.commands and record.state in ("up", "released"):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if record.state not in ("up", "released"):
                raise HttpError(410, "this coordinator declared this agent gone: join again")
            record.last_seen = time.monotonic()
            if record.commands:
                record.fetched = max(record.fetched, record.commands[-1]["seq"])
                self._cv.notify_all()
            return 200, {"commands": list(record.commands)}

    # -- the run's side -----------------------------------------------------------------
    def send(self, host: str, kind: str, **fields: Any) -> None:
        """Queue a command for ``host``'s agent (delivered at its next poll)."""
        with self._cv:
            record = self.agents.get(host)
            if record is None or record.state not in ("up", "released"):
                return
            record.commands.append({"seq": record.next_seq, "kind": kind, **fields})
            record.next_seq += 1
            self._cv.notify_all()

    def up(self) -> list[AgentRecord]:
        with self._cv:
            return [r for r in self.agents.values() if r.state == "up"]

    def wait_for(self, count: int, timeout: float, stop: Callable[[], bool] = lambda: False) -> list[AgentRecord]:
        """Wait until ``count`` agents are up; returns them (fewer after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while len([r for r in self.agents.values() if r.state == "up"]) < count and not stop():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.2))
            return [r for r in self.agents.values() if r.state == "up"]

    def overdue(self) -> list[str]:
        """Agents not heard from for the detection time; they are marked dead (their polls
        and reports are refused from now on: they must join again)."""
        with self._cv:
            now = time.monotonic()
            late = overdue({n: r.last_seen for n, r in self.agents.items() if r.state == "up"}, now,
                           self.dead_after_s)
            for name in late:
                self.agents[name].state = "dead"
            if late:
                self._cv.notify_all()
            return late

    def silent(self, after: float) -> list[tuple[str, str]]:
        """``(name, store URL)`` of the agents that are up but not heard from for more than
        ``after`` seconds (suspects, not dead yet: see :meth:`declare_dead`)."""
        with self._cv:
            now = time.monotonic()
            return sorted((n, r.store) for n, r in self.agents.items()
                          if r.state == "up" and now - r.last_seen > after)

    def declare_dead(self, name: str, silent_for: float) -> bool:
        """Mark ``name`` dead if it is up and still not heard from for ``silent_for`` s (a
        probe found its machine gone); False if it spoke meanwhile or is not up."""
        with self._cv:
            r = self.agents.get(name)
            if r is None or r.state != "up" or time.monotonic() - r.last_seen <= silent_for:
                return False
            r.state = "dead"
            self._cv.notify_all()
            return True

    def mark(self, host: str, state: str) -> None:
        """Mark ``host`` ``released`` (it may leave: no longer watched), ``dead`` or ``gone``."""
        with self._cv:
            if host in self.agents:
                self.agents[host].state = state
                self._cv.notify_all()

    def delivered(self, timeout: float) -> bool:
        """Wait until every agent that is up has fetched its commands (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(r.commands and r.commands[-1]["seq"] > r.fetched and r.state in ("up", "released")
                      for r in self.agents.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        with self._cv:
            for r in self.agents.values():
                r.state = "gone"
            self._cv.notify_all()
        self.server.close()
