"""``scalai agent``: one per machine; runs its store and, on the coordinator's command, its workers.

::

    scalai agent --join COORDINATOR:PORT --name NAME --root DIR [--devices N] [--device cpu|cuda]
                 --token-file F

Started by whatever the site uses (ssh, ``srun --ntasks-per-node=1``, a Kubernetes
StatefulSet, systemd). It

1. starts the machine's tensor store (``scalai store serve`` on this machine's address,
   its files under ``DIR/store`` or ``--store-root``);
2. joins the coordinator (retrying until it answers), reporting its devices and store;
3. makes its own copy of the training data (checked against the coordinator's digest)
   and keeps a started standby worker per device (:mod:`.standby`);
4. then, in two threads: long-polls the coordinator for commands (launch a generation's
   workers, signal them, kill them, release) and reports what happened on the machine
   (workers' reports and exits, rank 0's metrics rows: :mod:`.relay`) at least every
   heartbeat, which is how the coordinator knows the machine is alive.

Everything it writes stays under ``DIR`` (and the store root): ``DIR/run`` (the workers'
protocol files), ``DIR/logs``, ``DIR/data``. A coordinator that no longer knows it (a
new coordinator, or one that declared this machine dead while it was stopped or cut off)
answers 410: the agent kills its workers (they belong to a generation given up) and joins
again. SIGTERM asks to leave: the coordinator moves the job off this machine (a planned
change, so what only this store holds moves to the survivors) and then releases it; a
second SIGTERM, or ``--leave-timeout`` seconds without a release, exits at once; an agent
that has not joined (yet, or again) holds nothing of the job and exits at once. SIGINT
(Ctrl-C) stops it at once: for the job, the machine fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import ScalaiError
from ..tls import plain_warning
from .devices import offer, worker_env
from .machine import StandbyPool, Workers, die_with_parent_preexec, interface_for, kill_tree, route_address
from .relay import Relay
from .wire import JsonClient, TlsError, WireError, check_listen, split_address

__all__ = ["Agent", "AgentExit"]


class AgentExit(ScalaiError):
    """The agent cannot go on (bad token, no store): the message says why."""


class Agent:
    """One machine's agent (see the module docstring).

    Args:
        join: the coordinator, ``HOST:PORT`` (``https://`` with ``tls``, else ``http://``) or a URL.
        name: this machine's name in the job (its store's name; host names in placements).
        root: this agent's directory (created).
        devices / kind / memory_gib: what this machine offers (:func:`~.devices.offer`:
            ``devices=None`` with ``kind="cuda"`` offers every GPU torch sees; the workers
            get ``SCALAI_DEVICE`` and ``CUDA_VISIBLE_DEVICES``).
        token: the run's token (required off loopback).
        address: this machine's address for peers (default: the one routing to the coordinator).
        store_root: where the store keeps shards (default ``root/store``; use tmpfs).
        standby: started workers to keep (default: one per device).
        link: the store's simulated link to other stores (``1gbit``...), for tests on one machine.
        leave_timeout: seconds to wait for a release after SIGTERM.
        tls: its store serves HTTPS with ``tls.cert``/``tls.key``; the coordinator, peer
            stores and (through ``$SCALAI_TLS_CA``) its workers verify against ``tls.ca``.
    """

    def __init__(self, join: str, name: str, root: str | Path, devices: int | None = 1, kind: str = "cpu",
                 token: str | None = None, address: str | None = None, store_root: str | None = None,
                 standby: int | None = None, memory_gib: float = 0.0, link: str | None = None,
                 leave_timeout: float = 300.0, say=print, tls=None):
        from ..store.names import check_name

        url = join if "://" in join else ("https://" if tls else "http://") + join
        host, port = split_address(url.split("://", 1)[1].rstrip("/"), "--join")
        check_name(name, "--name")
        offered = offer(kind, devices, memory_gib)
        devices, kind, memory_gib = offered.count, offered.kind, offered.memory_gib
        self.offered = offered
        self.address = address or route_address(host, port)
        check_listen(self.address, token, what="serve a store", flag="--token-file")
        self.url, self.coord_host, self.name, self.root = url.rstrip("/"), host, name, Path(root)
        self.devices, self.kind, self.memory_gib, self.token = devices, kind, memory_gib, token
        self.store_root = Path(store_root) if store_root else self.root / "store"
        self.standby = devices if standby is None else standby
        self.link, self.leave_timeout, self.say = link, leave_timeout, say
        self.incarnation, self.tls = secrets.token_hex(8), tls
        self.client = JsonClient(self.url, token, timeout=10.0, tls=tls)
        self.epoch: str | None = None
        self.welcome: dict = {}
        self.store_url = ""
        self._store: subprocess.Popen | None = None
        self.pool: StandbyPool | None = None
        self.workers: Workers | None = None
        self.relay = Relay(self.root / "run")
        self.last_generation = -1
        self._leaving = threading.Event()
        self._released = threading.Event()
        self._stop = threading.Event()
        self._rejoin = threading.Event()
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._after = 0
        self._data: dict | None = None

    # -- start ------------------------------------------------------------------------
    def run(self) -> int:
        """Run until released (0) or stopped; raises :class:`AgentExit` on a fatal error."""
        for sub in ("run", "logs", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._install_signals()
        try:
            self._start_store()
            if not self._join_until_accepted():
                self.say(f"scalai agent {self.name}: SIGTERM before joining: nothing to hand off; leaving")
                return 0
            threading.Thread(target=self._command_loop, name="scalai-commands", daemon=True).start()
            self._report_loop()  # returns when released or stopped
            return 0
        finally:
            self.shutdown()

    def _install_signals(self) -> None:
        """SIGTERM: leave once the job holds nothing here (a second one: at once).
        SIGINT: stop now (the workers are killed; the job sees this machine fail)."""
        def on_term(signum, frame):
            if self._leaving.is_set():
                self._stop.set()
            self._leaving.set()

        def on_int(signum, frame):
            self._stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
            signal.signal(signal.SIGINT, on_int)

    def _start_store(self) -> None:
        """This machine's store, on its address, its files under the store root."""
        self.store_root.mkdir(parents=True, exist_ok=True)
        url_file = self.root / "store.url"
        url_file.unlink(missing_ok=True)
        token_file = self.root / ".token"
        if self.token:
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
        cmd = [sys.executable, "-m", "scalai.cli", "store", "serve", "--root", str(self.store_root), "--name", self.name,
               "--host", self.address, "--port", "0", "--url-file", str(url_file)]
        cmd += ["--token-file", str(token_file)] if self.token else []
        cmd += self.tls.options() if self.tls else []
        cmd += ["--link", self.link] if self.link else []
        log = open(self.root / "logs" / "store.log", "ab")
        self._store = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "SCALAI_STORE_LOG": "WARNING"}, start_new_session=True,
                                       preexec_fn=die_with_parent_preexec)
        log.close()
        deadline = time.monotonic() + 60
        while not url_file.exists():
            if self._store.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "logs" / "store.log").read_text(errors="replace")[-600:]
                raise AgentExit(f"the store of {self.name} did not start: {tail.strip()}")
            time.sleep(0.05)
        self.store_url = url_file.read_text().strip()
        warning = plain_warning(f"the store of {self.name}", self.address, self.tls)
        if warning:
            self.say(f"scalai agent {self.name}: {warning}")

    def _join_until_accepted(self) -> bool:
        """Join (again), retrying while the coordinator is unreachable; on the first join,
        make the data copy and the standbys in the background (heartbeats go on meanwhile).
        False: SIGTERM came first (the job holds nothing on a machine it does not know)."""
        noted = 0.0
        while not self._stop.is_set():
            if self._leaving.is_set():
                return False
            try:
                answer = self.client.post("/v1/agents/join", self._join_body(), timeout=30)
                break
            except TlsError as exc:
                raise AgentExit(str(exc)) from None
            except ConnectionError:
                if time.monotonic() - noted > 10:
                    self.say(f"scalai agent {self.name}: waiting for the coordinator at {self.url}")
                    noted = time.monotonic()
            except WireError as exc:
                if exc.status in (401, 400):
                    raise AgentExit(f"the coordinator at {self.url} refused {self.name}: {exc.message}") from None
                if time.monotonic() - noted > 10:
                    self.say(f"scalai agent {self.name}: {exc.message}; retrying")
                    noted = time.monotonic()
            time.sleep(1.0)
        else:
            raise AgentExit("stopped before joining")
        first = not self.welcome
        self.epoch, self.welcome, self._after = answer["epoch"], answer, 0
        self.say(f"scalai agent {self.name}: joined {self.url} ({self.devices} {self.kind} devices, store "
                 f"{self.store_url})")
        if first:
            threading.Thread(target=self._prepare, name="scalai-prepare", daemon=True).start()
        elif self._data is not None:
            self._send({"data": self._data})
        return True

    def _join_body(self) -> dict:
        return {"name": self.name, "incarnation": self.incarnation, "address": self.address, "store": self.store_url,
                "devices": {"count": self.devices, "kind": self.kind, "memory_gib": self.memory_gib},
                "last_step": self.relay.last_step, "last_generation": self.last_generation}

    def _prepare(self) -> None:
        """The data copy (checked against the coordinator's digest) and the standby pool,
        once per agent; then the data report, from which on this machine counts as joined."""
        from .trainer import load_trainer

        data = {"digest": None, "path": None, "run_dir": str(self.root / "run")}
        try:
            trainer = load_trainer(self.welcome["trainer"])
            spec = self.welcome.get("data") or {}
            if spec.get("digest"):
                path, digest = trainer.prepare_data(str(self.root / "data"), spec)
                data.update(digest=digest, path=path)
                if digest != spec["digest"]:
                    data["error"] = (f"the data on {self.name} ({path}) differs from the coordinator's (digest "
                                     f"{digest} != {spec['digest']}); give every machine the same data")
            self.pool = StandbyPool(trainer.to_json(), self._base_env(), self.root / "logs", self.standby,
                                    cwd=self.root / "run")
            self.workers = Workers(self.pool, self.root / "run", self.root / "logs")
            # Join the job with a warm standby: a change that grows onto this machine then
            # does not wait for an interpreter to start.
            if not self.pool.wait_warm(300):
                self.say(f"scalai agent {self.name}: no standby worker is ready (see {self.root / 'logs'}); "
                         f"joining anyway")
        except (OSError, ValueError) as exc:
            data["error"] = f"{self.name} cannot prepare for the job: {exc}"
        self._data = data
        self._send({"data": data})

    def _base_env(self) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
               "PYTHONWARNINGS": "ignore"}
        ifname = interface_for(self.address)
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname
        if self.token:
            env["SCALAI_TOKEN"] = self.token
        if self.tls:
            env.update(self.tls.env())
        env.update(worker_env(self.offered, os.environ))
        return env

    # -- the two loops ------------------------------------------------------------------
    def _command_loop(self) -> None:
        while not self._stop.is_set() and not self._released.is_set():
            if self._rejoin.is_set():
                time.sleep(0.05)
                continue
            query = f"incarnation={self.incarnation}&epoch={self.epoch}&after={self._after}&wait=2"
            try:
                answer = self.client.get(f"/v1/agents/{self.name}/commands?{query}", timeout=10)
            except WireError as exc:
                if exc.status == 410:
                    self._rejoin.set()
                time.sleep(0.2)
                continue
            except (ConnectionError, TlsError):  # TlsError: the report loop says it and stops
                time.sleep(0.5)
                continue
            for command in answer.get("commands", []):
                if command["seq"] <= self._after:
                    continue
                self._after = command["seq"]
                try:
                    self._execute(command)
                except Exception as exc:  # noqa: BLE001 - reported, never fatal to the agent
                    self.say(f"scalai agent {self.name}: command {command.get('kind')} failed: {exc}")

    def _report_loop(self) -> None:
        interval = float(self.welcome.get("heartbeat_s", 1.0))
        last = 0.0
        leave_deadline = None
        retired: list[int] = []
        while not self._stop.is_set() and not self._released.is_set():
            if self._rejoin.is_set():
                self._fenced()
                continue
            if self._leaving.is_set() and leave_deadline is None:
                leave_deadline = time.monotonic() + self.leave_timeout
                self.say(f"scalai agent {self.name}: SIGTERM; asking the coordinator to move the job off this "
                         f"machine")
            if leave_deadline is not None and time.monotonic() > leave_deadline:
                self.say(f"scalai agent {self.name}: no release within {self.leave_timeout:.0f} s; leaving")
                return
            if self._store is not None and self._store.poll() is not None:  # a machine without its store is gone
                raise AgentExit(f"the store of {self.name} exited ({self._store.returncode}); see "
                                f"{self.root / 'logs' / 'store.log'}")
            with self._lock:
                for gen in retired:  # collected once more since their last exit: done with
                    self.relay.forget(gen)
                    self.workers.forget(gen)
                retired = self.workers.finished() if self.workers else []
                for gen, rank, code in self.workers.exits() if self.workers else []:
                    self.relay.exited(gen, rank, code, self.workers.tail(gen, rank))
                self.relay.collect()
            if not self.relay.empty() or time.monotonic() - last >= interval or self._leaving.is_set():
                if self._send({}):
                    last = time.monotonic()
            time.sleep(0.05)

    def _send(self, extra: dict) -> bool:
        """One report: what the relay holds, plus ``extra`` (one sender at a time)."""
        with self._send_lock:
            with self._lock:
                body = self.relay.pending()
                relay = self.relay
            body.update(extra, incarnation=self.incarnation, epoch=self.epoch, leaving=self._leaving.is_set())
            try:
                self.client.post(f"/v1/agents/{self.name}/report", body, timeout=10)
            except WireError as exc:
                if exc.status == 410:
                    self._rejoin.set()
                return False
            except ConnectionError:
                return False
            with self._lock:
                relay.sent(body)
            return True

    def _fenced(self) -> None:
        """The coordinator does not know this agent (any more): whatever runs here belongs
        to a generation it gave up on. Kill it, forget it, join again."""
        with self._lock:
            if self.workers is not None:
                self.workers.kill()
            self.relay.fenced()
        self.say(f"scalai agent {self.name}: the coordinator does not know this machine any more; its workers "
                 f"were stopped, joining again")
        if not self._join_until_accepted():
            self.say(f"scalai agent {self.name}: SIGTERM before joining again: nothing to hand off; leaving")
            self._stop.set()
        self._rejoin.clear()

    # -- commands ---------------------------------------------------------------------
    def _execute(self, c: dict) -> None:
        kind = c["kind"]
        if kind == "launch":
            self._launch(c)
        elif kind == "signal":
            self._signal(c["generation"], c["what"], c.get("version"))
        elif kind == "kill":
            self.workers.kill(c["generation"], c.get("ranks"))
        elif kind == "crash":
            self._crash()
        elif kind == "release":
            self.say(f"scalai agent {self.name}: released by the coordinator ({c.get('reason') or 'the job left'})")
            self._released.set()
        else:
            raise ValueError(f"unknown command {kind!r}")

    def _launch(self, c: dict) -> None:
        """Start this machine's ranks of a generation (the coordinator built their command
        line and environment; torchrun's variables are added here)."""
        if self._data is None or self._data.get("error") or self.workers is None:
            raise ValueError((self._data or {}).get("error") or "not prepared yet")
        gen, ranks = int(c["generation"]), [int(r) for r in c["ranks"]]
        env = {**c["env"], "SCALAI_RUN_DIR": str(self.root / "run"), "SCALAI_HOST": self.name,
               "MASTER_ADDR": self.coord_host, "MASTER_PORT": str(c["store_port"]),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": c["run_id"],
               "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
               "WORLD_SIZE": str(c["world"]), "GROUP_RANK": str(c["slot"]), "GROUP_WORLD_SIZE": str(c["slots"]),
               "ROLE_NAME": "default", "ROLE_WORLD_SIZE": str(c["world"])}
        with self._lock:
            self.last_generation = max(self.last_generation, gen)
            if c.get("free"):
                self._touch(gen, "free")
            self.relay.watch(gen, ranks, self.workers.metrics_file(gen))
            self.workers.launch(gen, ranks, c["module"], [str(a) for a in c["argv"]], env)

    def _touch(self, gen: int, what: str, version=None) -> None:
        from .events import write_json_atomic

        control = self.root / "run" / "control"
        if what == "go":
            write_json_atomic(control / f"go-g{gen:03d}.json", {"version": version})
        else:
            (control / f"{what}-g{gen:03d}").touch()

    def _signal(self, gen: int, what: str, version=None) -> None:
        if what not in ("stop", "free", "go", "abort"):
            raise ValueError(f"unknown signal {what!r}")
        self._touch(int(gen), what, version)

    def _crash(self) -> None:
        """The schedule's ``fail: HOST``: what a power loss leaves (nothing, and no goodbye)."""
        self.say(f"scalai agent {self.name}: crashing on the coordinator's command (a simulated failure)")
        if self.workers is not None:
            self.workers.kill()
        if self.pool is not None:
            self.pool.close()
        if self._store is not None:
            kill_tree(self._store)
        shutil.rmtree(self.store_root, ignore_errors=True)
        os._exit(1)

    # -- end --------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stop.set()
        if self.workers is not None:
            self.workers.kill()
        if self.pool is not None:
            self.pool.close()
        if self._store is not None and self._store.poll() is None:
            self._store.send_signal(signal.SIGTERM)
            try:
                self._store.wait(10)
            except subprocess.TimeoutExpired:
                kill_tree(self._store)
