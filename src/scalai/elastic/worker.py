r"""The worker's side of ``scalai run``: what a training script calls to be elastic.

``scalai run`` launches the workers with torchrun and tells them, through environment
variables, where the job state lives (the stores of their hosts), where to report
(``RUN_DIR/events``) and how to stop. A script built on :mod:`scalai.training` adds a few
calls to its loop; the reference trainer (:mod:`scalai.examples.gpt.train`) does, and so
does this complete script of one's own (a small model, FSDP2 over the data-parallel ranks;
``scalai run --module NAME`` runs it with the reference trainer's arguments, and the tests
run this very text)::

    import json
    import time

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from scalai.data import DataState, ElasticDataLoader, TokenDataset
    from scalai.elastic.worker import ElasticWorker
    from scalai.examples.gpt.options import parse_args
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


    def build(opts, dataset):
        # This rank's model (FSDP2 over the data-parallel ranks) and the job state around it.
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        config = opts.config
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


    def train_step(model, job, dataset, micro_batch):
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
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.step, job.data = job.step + 1, loader.state
        return loss_sum.item() / config.dp, samples


    def main():
        opts = parse_args()  # scalai run passes the reference trainer's arguments
        elastic = ElasticWorker.from_env()  # None outside scalai run
        dist.init_process_group("gloo", timeout=elastic.timeout if elastic else None)
        if elastic:
            elastic.started(dist.get_rank())  # reports; SCALAI_TIMEOUT for every group
            elastic.wait_devices()  # the previous generation's workers have exited
        dataset = TokenDataset(opts.data)
        model, job = build(opts, dataset)
        if elastic:
            elastic.ready(job)  # placement check
            elastic.resume(job, verify=opts.verify)  # wait for the runner; load from the stores
        metrics = open(opts.metrics, "a") if opts.metrics and job.rank == 0 else None
        with (elastic.stop_flag() if elastic else StopFlag(opts.stop_file)) as stop:
            try:
                while job.step < opts.steps:
                    loss, samples = train_step(model, job, dataset, opts.micro_batch)
                    if metrics:
                        row = {"step": job.step, "loss": loss, "layout": str(job.config), "time": time.time()}
                        metrics.write(json.dumps({**row, **samples.to_json()}) + "\n")
                        metrics.flush()
                    if elastic:
                        elastic.step_done(job, opts.steps)  # first-step mark; commits every N steps
                    if job.step < opts.steps and stop.should_stop():
                        break
            except Exception as exc:  # a peer died: one of the step's collectives failed here
                if elastic is None:
                    raise
                elastic.exit(elastic.dump(job, exc))  # own shards -> own store; exits, no teardown
        if elastic:
            elastic.save(job)  # every rank -> its host's store; rank 0 commits
            elastic.exit(0)  # frees the collectives' work, tears the group down, exits
        dist.destroy_process_group()


    if __name__ == "__main__":
        main()

The calls, in order: :meth:`~ElasticWorker.started` right after ``init_process_group``;
optionally :meth:`~ElasticWorker.announce` (the new layout's PTC described on the meta
device, before the devices are free; without it the runner transforms by the old layout's
split rules); :meth:`~ElasticWorker.wait_devices` before touching the devices;
:meth:`~ElasticWorker.ready` and :meth:`~ElasticWorker.resume` once the job is described;
:meth:`~ElasticWorker.step_done` ``(job, last_step)`` after every optimizer step; on a
failed collective :meth:`~ElasticWorker.dump` and :meth:`~ElasticWorker.exit` with its code;
at the end :meth:`~ElasticWorker.save` and :meth:`~ElasticWorker.exit`. Each step appends one
metrics row (``step``, ``loss``, ``layout``, ``time`` and the ``sample_ids`` the ranks fed
their models, from :func:`scalai.training.gather_fed`) to ``--metrics``: the runner follows
that file, and its exactly-once check counts those ids.

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
``SCALAI_TIMEOUT``         optional; seconds a collective may wait (a frozen peer) before it
                           fails: :meth:`~ElasticWorker.started` gives it to the default
                           process group; ``ElasticWorker.timeout`` for ``init_process_group``
=========================  ==========================================================
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

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
    rank: int = 0
    log: RankLog | None = None
    _first_step_seen: bool = False
    dumped: bool = False

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
        return cls(env["SCALAI_RUN_DIR"], int(env["SCALAI_GENERATION"]), env["SCALAI_HOST"],
                   tuple(env["SCALAI_HOSTS"].split(",")), int(env["SCALAI_GPUS_PER_HOST"]), stores,
                   env["SCALAI_JOB"], env["SCALAI_RESUME"] == "1", int(env["SCALAI_COMMIT_EVERY"]),
                   env["SCALAI_DUMP_VERSION"], env.get("SCALAI_ANNOUNCE", "1") != "0", timeout_s)

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
                                              token=load_token())
        return self._cached_writer

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
        born = process_start_time()
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
        own host's store (no collective), report the non-tensor state; returns the exit code
        (:data:`EXIT_DUMPED`) to leave with, through :meth:`exit`.

        The shards are found whatever phase the failed step left the model in (FSDP2 swaps
        in unsharded parameters during forward and backward; :class:`~scalai.training.JobState`
        keeps the sharded ones). SIGTERM (torchrun stopping the host's other workers) is
        ignored from now on: the process leaves through :meth:`exit`.
        """
        self.dumped = True
        from ..storage.arrays import as_raw
        from ..store.client import StoreClient, load_token
        from ..training.nontensor import capture, rank_snapshot
        from .recovery import dump_owner

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log = self.log or RankLog(self.run_dir, self.generation, job.rank, host=self.host)
        log.mark("dump_start", error=f"{type(error).__name__}: {error}" if error else None)
        try:
            client = StoreClient(self.stores[self.host], load_token(), retries=1)
            total = 0
            for name, tensor in job.local_tensors().items():
                dtype = job.ptc.spec(name).dtype
                total += client.put(self.job_name, self.dump_version, job.rank, name,
                                    as_raw(tensor, dtype, name), dtype, owner=dump_owner(self.dump_version))["bytes"]
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
        Otherwise (the run ended, or this generation stopped for a change) it frees the
        model's collective work objects while the interpreter is whole (freed during
        shutdown, gloo may abort the process), tears the group down and exits. Either way
        the interpreter does not shut down: flush what the script wrote to its own files.
        """
        import gc
        import sys

        if not self.dumped:
            import torch.distributed as dist

            gc.collect()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        if self.log is not None:
            self.log.mark("exit", exit_code=code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
