"""The worker's side of ``scalai run``: what a training script calls to be elastic.

``scalai run`` launches the workers with torchrun and tells them, through environment
variables, where the job state lives (the stores of their hosts), where to report
(``RUN_DIR/events``) and how to stop. A script built on :mod:`scalai.training` adds a few
calls (the reference trainer, :mod:`scalai.examples.gpt.train`, does)::

    elastic = ElasticWorker.from_env()              # None outside scalai run
    if elastic:
        elastic.announce(describe_on_meta)          # optional: the new layout's PTC, early
        elastic.wait_devices()                      # the previous workers have exited
    job = describe(...)
    if elastic:
        elastic.ready(job)                          # placement check; "ready" mark
        elastic.resume(job)                         # wait for the runner, load from the stores
    with (elastic.stop_flag() if elastic else StopFlag(...)) as stop:
        try:
            while job.step < steps:
                train_one_step()                    # optimizer.step() after the last collective
                if elastic:
                    elastic.step_done(job)          # first-step mark, periodic commit
                if stop.should_stop(): break
        except RuntimeError:                        # a peer died: its collective failed here
            if elastic:
                sys.exit(elastic.dump(job))         # this rank's shards -> own store, no collective
            raise
    if elastic:
        elastic.save(job)                           # all ranks -> their own stores, rank 0 commits

**Failure semantics.** ``dump`` saves the state of ``job.step``, the last step this rank
completed. That is consistent across ranks when the optimizer steps only after the step's
last collective (the loss all-reduce): a rank either failed before it (its weights are those
of ``job.step``) or passed it, and then nothing collective remains for that step. The runner
checks that every surviving rank dumped the same step before it uses the dumps.

Environment (set by the runner for every agent; workers inherit it):

=========================  ==========================================================
``SCALAI_RUN_DIR``         the run's directory (events, stop and go files)
``SCALAI_GENERATION``      launch number
``SCALAI_HOST``            this agent's host (its store's name)
``SCALAI_HOSTS``           the placement's hosts in slot order: rank r on ``hosts[r // G]``
``SCALAI_GPUS_PER_HOST``   G
``SCALAI_STORES``          ``host=url,...`` for the placement's hosts
``SCALAI_JOB``             the job's name in the stores
``SCALAI_TOKEN``           the stores' token (when they need one)
``SCALAI_RESUME``          ``1``: wait for the go file, then load the version it names
``SCALAI_COMMIT_EVERY``    commit the state to the stores every N steps (0: never)
``SCALAI_DUMP_VERSION``    the version name survivors dump into after a failure
``SCALAI_ANNOUNCE``        optional; ``0``: the runner knows the layout's PTC, skip ``announce``
=========================  ==========================================================
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import EXIT_DUMPED, RankLog

__all__ = ["ElasticWorker", "EXIT_DUMPED", "stop_file", "go_file", "free_file", "layout_file", "ENV",
           "process_start_time"]

ENV = ("SCALAI_RUN_DIR", "SCALAI_GENERATION", "SCALAI_HOST", "SCALAI_HOSTS", "SCALAI_GPUS_PER_HOST",
       "SCALAI_STORES", "SCALAI_JOB", "SCALAI_RESUME", "SCALAI_COMMIT_EVERY", "SCALAI_DUMP_VERSION")


def stop_file(run_dir: str | os.PathLike, generation: int) -> Path:
    """Touched by the runner to stop generation ``generation`` after the same step everywhere."""
    return Path(run_dir) / "control" / f"stop-g{generation:03d}"


def free_file(run_dir: str | os.PathLike, generation: int) -> Path:
    """Created by the runner once the previous generation's workers have exited: the
    devices are free for generation ``generation`` to build its model on."""
    return Path(run_dir) / "control" / f"free-g{generation:03d}"


def go_file(run_dir: str | os.PathLike, generation: int) -> Path:
    """Written by the runner (the version to load) once the state is in the new layout."""
    return Path(run_dir) / "control" / f"go-g{generation:03d}.json"


def layout_file(run_dir: str | os.PathLike, generation: int) -> Path:
    """Written by rank 0 of ``generation`` (:meth:`ElasticWorker.announce`): the job's PTC
    under the generation's layout, the target of the transformation."""
    from .events import events_dir

    return events_dir(run_dir, generation) / "layout.json"


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process (the torchrun agent) dies. Elsewhere: nothing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the agent died before the call
        os._exit(1)


def process_start_time() -> float | None:
    """When this process started (wall clock), from /proc on Linux; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass
class ElasticWorker:
    """One worker's link to the runner (see the module docstring)."""

    run_dir: str
    generation: int
    host: str
    hosts: tuple[str, ...]
    gpus_per_host: int
    stores: dict[str, str]
    job_name: str
    resume_from_stores: bool
    commit_every: int
    dump_version: str
    announce_layout: bool = True
    rank: int = 0
    log: RankLog | None = None
    _first_step_seen: bool = False

    @classmethod
    def from_env(cls, env: dict | None = None) -> ElasticWorker | None:
        """The worker's settings from the environment, or ``None`` outside ``scalai run``.

        Raises:
            ValueError: some but not all variables are set, or one does not parse.
        """
        env = os.environ if env is None else env
        if "SCALAI_RUN_DIR" not in env:
            return None
        missing = [k for k in ENV if k not in env]
        if missing:
            raise ValueError(f"scalai run sets {', '.join(ENV)}; {', '.join(missing)} missing: launch "
                             f"elastic workers with 'scalai run', not by hand")
        stores = dict(item.split("=", 1) for item in env["SCALAI_STORES"].split(",") if item)
        return cls(env["SCALAI_RUN_DIR"], int(env["SCALAI_GENERATION"]), env["SCALAI_HOST"],
                   tuple(env["SCALAI_HOSTS"].split(",")), int(env["SCALAI_GPUS_PER_HOST"]), stores,
                   env["SCALAI_JOB"], env["SCALAI_RESUME"] == "1", int(env["SCALAI_COMMIT_EVERY"]),
                   env["SCALAI_DUMP_VERSION"], env.get("SCALAI_ANNOUNCE", "1") != "0")

    # -- helpers ----------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        """The placement's stores in slot order (rank r's store is ``urls[r // G]``)."""
        return [self.stores[h] for h in self.hosts]

    def stop_flag(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        from ..training import StopFlag

        return StopFlag(stop_file(self.run_dir, self.generation), signals=signals)

    def _writer(self):
        """The stores of the placement, as a training StateWriter (made once per worker)."""
        from ..store.client import load_token
        from ..store.training import StoreWriter

        if self.__dict__.get("_cached_writer") is None:
            self._cached_writer = StoreWriter(self.urls, self.job_name, gpus_per_host=self.gpus_per_host,
                                              token=load_token())
        return self._cached_writer

    # -- the calls --------------------------------------------------------------------
    def started(self, rank: int) -> None:
        """Open this rank's report with when its process started and joined the group; from
        now on this worker dies with its agent (a host that dies takes its workers along)."""
        die_with_parent()
        self.rank = rank
        self.log = RankLog(self.run_dir, self.generation, rank, host=self.host)
        born = process_start_time()
        if born is not None:
            self.log.mark("process_start", born)
        self.log.mark("joined")

    def announce(self, describe: Any) -> None:
        """Before the devices are free: tell the runner the job's PTC under this generation's
        layout (collective: ``describe()`` runs on every rank; rank 0 writes it).

        The runner transforms the state into this PTC. Without it, the runner applies the
        old PTC's split rules at the new degrees, which cannot know how a tensor that was
        whole splits along an axis that appears (a weight replicated at ``tp=1`` is sharded
        at ``tp=2``; FSDP sharding comes with ``zero=1``): every rank would then receive
        whole tensors, and the runner waits for this announcement instead. ``describe`` may
        build the model on the meta device (no memory, no values): only the layout counts.
        Skipped (``describe`` not called) when the runner already knows the PTC: a generation
        of this run reported one under a layout that uses the same parallel axes.
        """
        if not self.announce_layout:  # the runner knows this layout's PTC already
            return
        ptc = describe()
        if self.rank == 0:
            from .events import write_json_atomic

            write_json_atomic(layout_file(self.run_dir, self.generation), ptc.to_json())
        if self.log is not None:
            self.log.mark("announced")

    def wait_devices(self, poll: float = 0.02, timeout: float = 900.0) -> None:
        """Before building the model: wait until the previous generation's workers are gone.

        The runner starts a new generation's agents ahead of a change (a few steps before a
        scheduled one, at once for a requested one), so that Python, torch and the
        rendezvous start while the old workers still train, save and exit; the devices are
        touched only once they are free.
        """
        free = free_file(self.run_dir, self.generation)
        if self.log is not None:
            self.log.mark("waiting")
        deadline = time.time() + timeout
        while not free.exists():
            if time.time() > deadline:
                raise RuntimeError(f"the runner did not free the devices within {timeout:.0f} s; is it gone?")
            time.sleep(poll)
        if self.log is not None:
            self.log.mark("devices")

    def ready(self, job: Any) -> None:
        """Check that torchrun gave this rank the host the runner placed it on; mark "ready".

        Raises:
            ValueError: the rank landed on another host (agents must be ordered by their
                ``--local-addr``, which the runner sets).
        """
        self.rank = job.rank
        slot = self.rank // self.gpus_per_host
        if self.log is None:
            self.log = RankLog(self.run_dir, self.generation, self.rank, host=self.host)
        self.log.update(layout=str(job.config), step=job.step)
        if slot >= len(self.hosts) or self.hosts[slot] != self.host:
            raise ValueError(f"rank {self.rank} runs on {self.host} but the placement puts it on "
                             f"{self.hosts[slot] if slot < len(self.hosts) else 'no host'}; torchrun "
                             f"ordered the agents differently from the runner's --local-addr order")
        if self.rank == 0:  # the runner needs the layout's PTC to plan around dead ranks
            from .events import events_dir, write_json_atomic

            write_json_atomic(events_dir(self.run_dir, self.generation) / "ptc.json", job.ptc.to_json())
        self.log.mark("ready")

    def resume(self, job: Any, verify: bool = True, poll: float = 0.02) -> Any:
        """Wait until the runner names the version to load, then load it (collective).

        Returns:
            the :class:`~scalai.training.LoadReport`, or ``None`` for a fresh start.
        """
        import json

        from ..config import Placement
        from ..store.client import load_token
        from ..store.training import StoreReader
        from ..training import load

        if not self.resume_from_stores:
            return None
        go = go_file(self.run_dir, self.generation)
        deadline = time.time() + 900.0
        while not go.exists():
            if time.time() > deadline:
                raise RuntimeError("the runner did not name a version to load within 900 s; is it gone?")
            time.sleep(poll)
        version = json.loads(go.read_text())["version"]
        self.log.mark("load_start")
        if version is None:  # nothing was ever committed: the runner restarts the job from scratch
            self.log.mark("load_end", loaded=None)
            return None
        # This host's store is on this machine: map its files instead of streaming them
        reader = StoreReader(self.urls, self.job_name, version, token=load_token(), local_host=self.host)
        try:
            report = load(job, reader, verify=verify, placement=Placement(self.gpus_per_host, self.hosts))
        finally:
            reader.close()
        self.log.mark("load_end", step=job.step, loaded={"version": version, "step": job.step,
                                                         "bytes": report.rank_bytes})
        return report

    def step_done(self, job: Any, last_step: int) -> None:
        """After every optimizer step: mark the first one, commit every N steps (collective)."""
        if not self._first_step_seen:
            self._first_step_seen = True
            self.log.mark("first_step", step=job.step)
        else:
            self.log.data["step"] = job.step  # written with the next mark
        if self.commit_every and job.step % self.commit_every == 0 and job.step < last_step:
            from ..training import save

            t0 = time.time()
            writer = self._writer()
            save(job, writer)
            if self.rank == 0:
                commits = self.log.data["commits"] + [{"version": writer.last_version, "step": job.step,
                                                        "time": time.time(), "seconds": time.time() - t0}]
                self.log.update(commits=commits, step=job.step)

    def save(self, job: Any) -> str:
        """Save the job into the stores of the placement (collective); returns the version."""
        from ..training import save

        self.log.mark("save_start", step=job.step)
        writer = self._writer()
        report = save(job, writer)
        self.log.mark("save_end", saved={"version": writer.last_version, "step": job.step,
                                         "bytes": report.total_bytes})
        return writer.last_version

    def dump(self, job: Any, error: BaseException | None = None) -> int:
        """After a collective failed: upload this rank's shards of step ``job.step`` to its
        own host's store (no collective), report the non-tensor state; returns the exit code.

        SIGTERM (torchrun stopping the host's other workers) is ignored meanwhile.
        """
        from ..checkpoint.arrays import as_raw
        from ..store.client import StoreClient, load_token
        from ..training.nontensor import capture, rank_snapshot

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log = self.log or RankLog(self.run_dir, self.generation, job.rank, host=self.host)
        log.mark("dump_start", error=f"{type(error).__name__}: {error}" if error else None)
        try:
            client = StoreClient(self.stores[self.host], load_token(), retries=1)
            total = 0
            for name, tensor in job.local_tensors().items():
                dtype = job.ptc.spec(name).dtype
                total += client.put(self.job_name, self.dump_version, job.rank, name,
                                    as_raw(tensor, dtype, name), dtype)["bytes"]
            state = capture(job, [rank_snapshot(job)])
            state["rng"]["ranks"] = {str(job.rank): state["rng"]["ranks"]["0"]}
            log.mark("dump_end", dump={"version": self.dump_version, "step": job.step, "bytes": total,
                                       "state": state})
        except Exception as exc:  # noqa: BLE001 - the runner falls back to the last commit
            log.mark("dump_end", dump=None, dump_error=f"{type(exc).__name__}: {exc}")
        return EXIT_DUMPED
