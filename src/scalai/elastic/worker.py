r"""The worker's side of ``scalai run``: what a training script calls to be elastic.

``scalai run`` starts the workers through each machine's agent (:mod:`.agent`, with
torchrun's environment) and tells them, through environment variables, their layout, where
the job state lives (the stores of their hosts), where to report (``SCALAI_RUN_DIR``, on
their own machine: the agent relays it) and how to stop. A script built on
:mod:`scalai.training` adds a few calls to its loop; the reference trainer
(:mod:`scalai.examples.gpt.train`) does, and so does this complete script of one's own (a
small model, FSDP2 over the data-parallel ranks; ``scalai run --module NAME -- ARGS`` runs
it with its own arguments, and the tests run this very text)::

    import argparse
    import json
    import time
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from scalai.config import ParallelConfig
    from scalai.data import DataState, ElasticDataLoader, TokenDataset
    from scalai.elastic.worker import ElasticWorker
    from scalai.training import StopFlag, describe, gather_fed


    class TinyLM(torch.nn.Module):  # a byte-level model of one's own; its layers in `layers`
        def __init__(self, width=32, depth=2):
            super().__init__()
            self.embed = torch.nn.Embedding(256, width)
            self.layers = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU())
                for _ in range(depth))
            self.head = torch.nn.Linear(width, 256)

        def forward(self, tokens):
            h = self.embed(tokens)
            for layer in self.layers:
                h = h + layer(h)
            return self.head(h)


    def options():
        # The script's own arguments (scalai run --module NAME -- ARGS). Under scalai run the
        # layout, the step to stop after and the metrics file come from the worker protocol.
        parser = argparse.ArgumentParser()
        parser.add_argument("--data", required=True, help="a sample index (scalai data index)")
        parser.add_argument("--layout", default="tp=1,pp=1,dp=1")
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument("--metrics", default=None)
        parser.add_argument("--global-batch", type=int, default=8)
        parser.add_argument("--micro-batch", type=int, default=4)
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--seed", type=int, default=0)
        return parser.parse_args()


    def build(opts, config, dataset):
        # This rank's model (FSDP2 over the data-parallel ranks) and the job state around it.
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if config.tp > 1 or config.pp > 1:
            raise ValueError(f"this script runs data parallelism only, not {config}")
        torch.manual_seed(opts.seed)  # the same initial weights on every rank
        model = TinyLM()
        if config.dp > 1:
            mesh = init_device_mesh("cpu", (config.dp,), mesh_dim_names=("dp",))
            if config.zero:  # parameters, gradients and Adam moments sharded over the replicas
                for layer in model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
            else:
                replicate(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
        data = DataState(seed=opts.seed, global_batch=opts.global_batch, num_samples=len(dataset))
        return model, describe(model, optimizer, config, num_layers=len(model.layers), data=data, seed=opts.seed)


    def train_step(model, job, dataset, micro_batch, updating):
        # One step; returns the global batch's mean loss and (on rank 0) the ids every rank fed.
        config = job.config
        loader = ElasticDataLoader(dataset, job.data, config.dp, config.coords(job.rank).dp,
                                   micro_batch_size=micro_batch, steps=1)
        fed, loss_sum = [], torch.zeros(1, dtype=torch.float64)
        for batch in loader:  # this replica's micro-batches; every row comes with its sample id
            if config.dp > 1:
                model.set_requires_gradient_sync(batch["last_in_step"])
            tokens = batch["tokens"]
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) * batch["loss_scale"]
            loss.backward()
            loss_sum += loss.detach().double()
            fed += batch["sample_ids"].tolist()
        samples = gather_fed(fed, config)  # what every rank fed its model, on rank 0
        dist.all_reduce(loss_sum)  # the step's last collective: the optimizer steps after it
        with updating():  # the state changes as a whole (an abort's dump waits for it)
            job.optimizer.step()
            job.optimizer.zero_grad(set_to_none=True)
            job.step, job.data = job.step + 1, loader.state
        return loss_sum.item() / config.dp, samples


    def main():
        opts = options()
        elastic = ElasticWorker.from_env()  # None outside scalai run
        layout = ParallelConfig.parse(elastic.layout if elastic else opts.layout)
        last_step = elastic.last_step if elastic else opts.steps
        metrics_file = elastic.metrics if elastic else opts.metrics
        dist.init_process_group("gloo", timeout=elastic.timeout if elastic else None)
        if elastic:
            elastic.started(dist.get_rank())  # reports; SCALAI_TIMEOUT for every group
            elastic.wait_devices()  # the previous generation's workers have exited
        dataset = TokenDataset(opts.data)
        model, job = build(opts, layout, dataset)
        if elastic:
            elastic.ready(job)  # placement check
            elastic.resume(job)  # wait for the runner; load from the stores; aborts dump from now on
        metrics = open(metrics_file, "a") if metrics_file and job.rank == 0 else None
        updating = elastic.updating if elastic else nullcontext
        with (elastic.stop_flag() if elastic else StopFlag()) as stop:
            try:
                while job.step < last_step:
                    loss, samples = train_step(model, job, dataset, opts.micro_batch, updating)
                    if metrics:
                        row = {"step": job.step, "loss": loss, "layout": str(job.config), "time": time.time()}
                        metrics.write(json.dumps({**row, **samples.to_json()}) + "\n")
                        metrics.flush()
                    if elastic:
                        elastic.step_done(job, last_step)  # first-step mark; commits every N steps
                    if job.step < last_step and stop.should_stop():
                        break
            except Exception as exc:  # a peer died: one of the step's collectives failed here
                if elastic is None:
                    raise
                elastic.exit(elastic.dump(job, exc))  # own shards -> own store; exits, no teardown
        if elastic:
            elastic.save(job)  # every rank -> its host's store; rank 0 commits
            elastic.exit(0)  # tears the group down, exits without interpreter teardown
        dist.destroy_process_group()


    if __name__ == "__main__":
        main()

The calls, in order: :meth:`~ElasticWorker.from_env` for the layout and the step to stop
after; :meth:`~ElasticWorker.started` right after ``init_process_group``;
optionally :meth:`~ElasticWorker.announce` (the new layout's PTC described on the meta
device, before the devices are free; without it the runner transforms by the old layout's
split rules); :meth:`~ElasticWorker.wait_devices` before touching the devices;
:meth:`~ElasticWorker.ready` and :meth:`~ElasticWorker.resume` once the job is described;
:meth:`~ElasticWorker.step_done` ``(job, last_step)`` after every optimizer step, whose
update runs inside :meth:`~ElasticWorker.updating`; on a
failed collective :meth:`~ElasticWorker.dump` and :meth:`~ElasticWorker.exit` with its code;
at the end :meth:`~ElasticWorker.save` and :meth:`~ElasticWorker.exit`. Each step appends one
metrics row (``step``, ``loss``, ``layout``, ``time`` and the ``sample_ids`` the ranks fed
their models, from :func:`scalai.training.gather_fed`) to ``SCALAI_METRICS``: the agent
sends the rows to the coordinator, and its exactly-once check counts those ids.

**Failure semantics.** ``dump`` saves the state of ``job.step``, the last step this rank
completed. That is consistent across ranks when the optimizer steps only after the step's
last collective (the loss all-reduce): a rank either failed before it (its weights are those
of ``job.step``) or passed it, and then nothing collective remains for that step. The runner
checks that every surviving rank dumped the same step before it uses the dumps.

Environment (set by the worker's agent, besides torchrun's ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...):

=========================  ==========================================================
``SCALAI_LAYOUT``          this generation's layout, e.g. ``tp=2,pp=1,dp=2``
``SCALAI_STEPS``           the step this generation stops after (the job's total for the last)
``SCALAI_METRICS``         rank 0's metrics file (one JSON row per step; on this machine)
``SCALAI_RUN_DIR``         the protocol's files on this machine (events, stop, go, abort)
``SCALAI_GENERATION``      launch number
``SCALAI_HOST``            this agent's host (its store's name)
``SCALAI_HOSTS``           the placement's hosts in slot order: rank r on ``hosts[r // G]``
``SCALAI_GPUS_PER_HOST``   G
``SCALAI_STORES``          ``host=url,...`` for the placement's hosts
``SCALAI_JOB``             the job's name in the stores
``SCALAI_TOKEN``           the stores' token (when they need one)
``SCALAI_TLS_CA``          the CA bundle that ``https://`` stores' certificates verify against
``SCALAI_RESUME``          ``1``: wait for the go file, then load the version it names
``SCALAI_COMMIT_EVERY``    commit the state to the stores every N steps (0: never)
``SCALAI_COMMIT_MODE``     optional; ``background`` (default: the step returns once the shards
                           are staged in host memory, see :mod:`.commits`) or ``blocking``
``SCALAI_DUMP_VERSION``    the version name survivors dump into after a failure
``SCALAI_ANNOUNCE``        optional; ``0``: the runner knows the layout's PTC, skip ``announce``
``SCALAI_TIMEOUT``         optional; seconds a collective may wait (a frozen peer) before it
                           fails: :meth:`~ElasticWorker.started` gives it to the default
                           process group; ``ElasticWorker.timeout`` for ``init_process_group``
=========================  ==========================================================

**Aborts.** A machine that freezes (stopped, cut off) does not make its peers' collectives
fail: they wait for it. The runner notices its silence within seconds and aborts the
generation: a thread of every survivor (started by :meth:`~ElasticWorker.resume`, see
:mod:`.abort`) dumps its shards and leaves while the main thread still waits. The dump is
of a whole step because the loop changes the job's state (the optimizer's update, the step
counter, the data position) inside :meth:`~ElasticWorker.updating`; a loop that does not is
not dumped on an abort (its worker exits, and the job goes back to its last commit).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from ..tls import Tls
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
    timeout_s: float | None = None
    commit_mode: str = "background"
    layout: str | None = None
    last_step: int | None = None
    metrics: str | None = None
    rank: int = 0
    log: RankLog | None = None
    _first_step_seen: bool = False
    dumped: bool = False
    _watch: Any = None

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
        timeout = env.get("SCALAI_TIMEOUT")
        try:
            timeout_s = float(timeout) if timeout else None
        except ValueError:
            raise ValueError(f"SCALAI_TIMEOUT={timeout!r} is not a number of seconds") from None
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"SCALAI_TIMEOUT={timeout!r} must be a positive number of seconds")
        steps = env.get("SCALAI_STEPS")
        mode = env.get("SCALAI_COMMIT_MODE") or "background"
        from .commits import COMMIT_MODES

        if mode not in COMMIT_MODES:
            raise ValueError(f"SCALAI_COMMIT_MODE={mode!r}; use one of {', '.join(COMMIT_MODES)}")
        return cls(env["SCALAI_RUN_DIR"], int(env["SCALAI_GENERATION"]), env["SCALAI_HOST"],
                   tuple(env["SCALAI_HOSTS"].split(",")), int(env["SCALAI_GPUS_PER_HOST"]), stores,
                   env["SCALAI_JOB"], env["SCALAI_RESUME"] == "1", int(env["SCALAI_COMMIT_EVERY"]),
                   env["SCALAI_DUMP_VERSION"], env.get("SCALAI_ANNOUNCE", "1") != "0", timeout_s, mode,
                   env.get("SCALAI_LAYOUT"), int(steps) if steps else None, env.get("SCALAI_METRICS"))

    # -- helpers ----------------------------------------------------------------------
    @property
    def timeout(self) -> timedelta | None:
        """The runner's collective timeout (``SCALAI_TIMEOUT``), for ``init_process_group``."""
        return timedelta(seconds=self.timeout_s) if self.timeout_s is not None else None

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
                                              token=load_token(), owner_kind=f"g{self.generation}-save",
                                              tls=Tls.from_env())
        return self._cached_writer

    def _periodic(self):
        """This worker's periodic commits (:mod:`.commits`), made once."""
        from .commits import PeriodicCommits

        if self.__dict__.get("_cached_commits") is None:
            self._cached_commits = PeriodicCommits(self.commit_every, self.commit_mode, self._writer,
                                                   self.log.update, self.rank)
        return self._cached_commits

    # -- the calls --------------------------------------------------------------------
    def started(self, rank: int) -> None:
        """Right after ``init_process_group``: open this rank's report with when its process
        started and joined the group, and give the default process group the runner's
        timeout (``SCALAI_TIMEOUT``; groups made from it later, e.g. a ``DeviceMesh``'s,
        inherit it), so that a collective waiting for a host that froze without closing its
        connections fails after that long, whatever timeout the script passed. From now on
        this worker dies with its agent (a host that dies takes its workers along)."""
        die_with_parent()
        self._apply_timeout()
        self.rank = rank
        self.log = RankLog(self.run_dir, self.generation, rank, host=self.host)
        assigned = os.environ.get("SCALAI_ASSIGNED_AT")  # a standby worker: when it got this job
        born = float(assigned) if assigned else process_start_time()
        if born is not None:
            self.log.mark("process_start", born)
        self.log.mark("joined")

    def _apply_timeout(self) -> None:
        import torch.distributed as dist

        if self.timeout_s is None or not dist.is_available() or not dist.is_initialized():
            return
        try:  # torch has no public setter; without this one the script's own timeout stays
            from torch.distributed.distributed_c10d import _set_pg_timeout
        except ImportError:
            return
        _set_pg_timeout(self.timeout)

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
        """Check that this rank runs on the host the runner placed it on; mark "ready".

        Raises:
            ValueError: the rank landed on another host (a worker started by hand with
                another agent's environment).
        """
        self.rank = job.rank
        slot = self.rank // self.gpus_per_host
        if self.log is None:
            self.log = RankLog(self.run_dir, self.generation, self.rank, host=self.host)
        self.log.update(layout=str(job.config), step=job.step)
        if slot >= len(self.hosts) or self.hosts[slot] != self.host:
            raise ValueError(f"rank {self.rank} runs on {self.host} but the placement puts it on "
                             f"{self.hosts[slot] if slot < len(self.hosts) else 'no host'}; start elastic "
                             f"workers through their machine's agent (scalai run), not by hand")
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
            self._arm(job)
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
            self._arm(job)
            return None
        # This host's store is on this machine: map its files instead of streaming them
        reader = StoreReader(self.urls, self.job_name, version, token=load_token(), local_host=self.host,
                             tls=Tls.from_env())
        try:
            report = load(job, reader, verify=verify, placement=Placement(self.gpus_per_host, self.hosts))
        finally:
            reader.close()
        self.log.mark("load_end", step=job.step, loaded={"version": version, "step": job.step,
                                                         "bytes": report.rank_bytes})
        self._arm(job)
        return report

    def _arm(self, job: Any) -> None:
        """From now on the job holds its state: an abort dumps it (see the module docstring)."""
        from .abort import AbortWatch, abort_file

        if self._watch is None:
            cause = RuntimeError("the runner aborted this generation: a peer's machine stopped answering")
            self._watch = AbortWatch(abort_file(self.run_dir, self.generation),
                                     lambda: self.exit(self.dump(job, cause))).start()

    def updating(self):
        """A context manager around every change of the job's state in the loop (the
        optimizer's update, ``job.step``, ``job.data``): an abort's dump waits for it, so it
        never sees half of an update (see the module docstring)."""
        from contextlib import nullcontext

        return self._watch.updating() if self._watch is not None else nullcontext()

    def step_done(self, job: Any, last_step: int) -> None:
        """After every optimizer step: mark the first one; commit every N steps (collective).

        In the background (the default, see :mod:`.commits`) the step returns once the
        shards are staged; the version is reported in rank 0's ``commits`` only once the
        stores hold it committed (checked, without waiting, after each later step)."""
        if not self._first_step_seen:
            self._first_step_seen = True
            self.log.mark("first_step", step=job.step)
        else:
            self.log.data["step"] = job.step  # written with the next mark
        if self.commit_every:
            self._periodic().after_step(job, last_step)

    def save(self, job: Any) -> str:
        """Save the job into the stores of the placement (collective); returns the version.

        A periodic commit still in flight is committed (or its failure reported) first; one
        of this very step is the save."""
        from ..training import save

        self.log.mark("save_start", step=job.step)
        done = self._periodic().settle(job, wait=True)
        if done is not None and done.step == job.step:
            version, nbytes = done.token.split("@")[0], done.total_bytes
        else:
            writer = self._writer()
            nbytes = save(job, writer).total_bytes
            version = writer.last_version
        self.log.mark("save_end", saved={"version": version, "step": job.step, "bytes": nbytes})
        return version

    def dump(self, job: Any, error: BaseException | None = None) -> int:
        """After a collective failed: upload this rank's shards of step ``job.step`` to its
        own host's store (no collective), report the non-tensor state; returns the exit code
        (:data:`EXIT_DUMPED`) to leave with, through :meth:`exit`.

        The shards are found whatever phase the failed step left the model in (FSDP2 swaps
        in unsharded parameters during forward and backward; :class:`~scalai.training.JobState`
        keeps the sharded ones). SIGTERM is ignored from now on: the process leaves through
        :meth:`exit`. Called a second time (the main thread's collective failing while an
        abort dumps on its thread), it waits for the first dump and does nothing more.
        """
        import threading

        with self.__dict__.setdefault("_dump_lock", threading.Lock()):
            if self.dumped:
                return EXIT_DUMPED
            self.dumped = True
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return self._dump(job, error)

    def _dump(self, job: Any, error: BaseException | None) -> int:
        from ..storage.arrays import as_raw
        from ..store.client import StoreClient, load_token
        from ..training.nontensor import capture, rank_snapshot
        from .recovery import dump_owner

        log = self.log or RankLog(self.run_dir, self.generation, job.rank, host=self.host)
        log.mark("dump_start", error=f"{type(error).__name__}: {error}" if error else None)
        try:
            client = StoreClient(self.stores[self.host], load_token(), retries=1, tls=Tls.from_env())
            total = 0
            for name, tensor in job.local_tensors().items():
                dtype = job.ptc.spec(name).dtype
                total += client.put(self.job_name, self.dump_version, job.rank, name,
                                    as_raw(tensor, dtype, name), dtype, owner=dump_owner(self.generation))["bytes"]
            state = capture(job, [rank_snapshot(job)])
            state["rng"]["ranks"] = {str(job.rank): state["rng"]["ranks"]["0"]}
            log.mark("dump_end", dump={"version": self.dump_version, "step": job.step, "bytes": total,
                                       "state": state})
        except Exception as exc:  # noqa: BLE001 - the runner falls back to the last commit
            log.mark("dump_end", dump=None, dump_error=f"{type(exc).__name__}: {exc}")
        return EXIT_DUMPED

    def exit(self, code: int = 0) -> NoReturn:
        """Leave the worker process with ``code``; never returns.

        After :meth:`dump` (a peer died, the process group is broken) it exits at once,
        without tearing the group down: teardown (``destroy_process_group``, or the
        interpreter's own at ``sys.exit``) may wait for the dead peer until torchrun kills
        the process, and the runner would see a signal instead of :data:`EXIT_DUMPED`.
        Otherwise (the run ended, or this generation stopped for a change) it tears the
        group down and exits. Either way the interpreter does not shut down (so the
        collectives' work objects held in reference cycles are never freed there, where
        gloo's thread destructors could abort the process; no ``gc.collect()`` is needed
        first, which cost half a second of the old workers' exit): flush what the script
        wrote to its own files.
        """
        import sys

        if self._watch is not None:
            self._watch.stop()
        commits = self.__dict__.get("_cached_commits")
        if commits is not None and commits.pending is not None and self.log is not None:
            # never committed nor reported: it expires from the stores with its lease
            self.log.update(commit_abandoned=commits.pending)
        if not self.dumped:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        if self.log is not None:
            self.log.mark("exit", exit_code=code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
