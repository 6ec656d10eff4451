"""What ``scalai run`` runs: the job, the machines, the schedule. Validated before anything starts.

:class:`RunSpec` checks itself on construction, including a dry run of every step-triggered
event of the schedule against the machines (:func:`dry_run`): an event that asks for more
devices than there are, a layout the trainer cannot run, a redeployment without enough
free hosts or a failure of a rank that will not exist is refused up front, with the
event's index, before any process starts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

from ..config import ParallelConfig
from .allocation import Allocation, LayoutChooser, Pool, apply_event, pick_hosts, trainer_shape
from .layouts import Hardware, Workload
from .schedule import Event

__all__ = ["RunSpec", "dry_run", "after_failure"]


@dataclass(frozen=True)
class RunSpec:
    """One elastic run of the reference trainer.

    Attributes:
        schedule: the events (see :mod:`scalai.elastic.schedule`).
        steps: the job's total optimizer steps.
        out: the run directory (created; must not hold an earlier run).
        model: the trainer's model preset.
        hosts / gpus_per_host: the simulated machines (host0, host1, ...).
        layout / devices: the starting layout, or a device count to choose one for
            (default: one host's devices).
        commit_every: commit the state to the stores every N steps (0: only at changes);
            the last commit is where a failure without replicas restarts from.
        persist: copy every commit to ``out/checkpoints`` in the background.
        start_ahead: start the next generation's workers before a change (a scheduled one:
            a few steps ahead; a request: at once), so that their start-up overlaps
            training and the save (see :mod:`scalai.elastic.ahead`); off, they start once
            the old workers have saved (two generations' processes never coexist before it).
        link: the simulated link between hosts' stores (e.g. ``"1gbit"``), or None.
        module: the workers' module (``python -m MODULE``), the reference trainer by
            default; it takes the reference trainer's arguments
            (:func:`scalai.examples.gpt.options.parse_args`) and follows the worker
            protocol of :mod:`scalai.elastic.worker`.
        args: a script's own arguments (``scalai run --module M -- ARGS``).
        listen / agents: the coordinator's address (``HOST:PORT``) and how many agents
            started elsewhere to wait for; without them the run starts ``hosts`` agents
            on this machine.
        token: the run's token (agents, stores, ``scalai scale``); required off loopback.
        resume: a coordinator started again: continue the job from its agents' stores.
        grow / max_devices: grow into agents that join during the run (up to that many devices).
        dead_after: seconds without a heartbeat after which a machine counts as dead.
        standby: started workers each agent keeps (default: one per device).
    """

    schedule: tuple[Event, ...]
    steps: int
    out: str
    model: str = "gpt-tiny"
    hosts: int = 2
    gpus_per_host: int = 2
    layout: str | None = None
    devices: int | None = None
    job: str = "job"
    commit_every: int = 10
    persist: bool = True
    start_ahead: bool = True
    link: str | None = None
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    data: str | None = None
    device_memory: float = 80.0
    pipeline_schedule: str = "1f1b"
    control_host: str = "127.0.0.1"
    control_port: int = 0
    control_token: str | None = None
    worker_timeout: int = 120
    extra_hosts: Sequence[str] = field(default=())
    module: str = "scalai.examples.gpt"
    args: tuple[str, ...] = ()
    listen: str | None = None
    agents: int | None = None
    token: str | None = None
    resume: bool = False
    grow: bool = True
    max_devices: int | None = None
    dead_after: float = 5.0
    standby: int | None = None
    quorum_timeout: float = 300.0

    def __post_init__(self) -> None:
        from ..store.names import check_name

        object.__setattr__(self, "schedule", tuple(self.schedule))
        for name in ("steps", "hosts", "gpus_per_host"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
        if self.commit_every < 0:
            raise ValueError(f"--commit-every={self.commit_every} must be >= 0")
        if self.hosts > 80:
            raise ValueError(f"--hosts={self.hosts}: one machine simulates at most 80 hosts")
        check_name(self.job, "job")
        _check_module(self.module)
        from .control import check_listen

        check_listen(self.control_host, self.control_token)
        if (self.listen is None) != (self.agents is None):
            raise ValueError("--listen ADDR:PORT and --agents N go together (agents started elsewhere join there)")
        if self.listen is not None:
            from .wire import check_listen as check_coordinator, split_address

            host, _ = split_address(self.listen, "--listen")
            check_coordinator(host, self.token)
            if self.agents < 1:
                raise ValueError(f"--agents {self.agents} must be at least 1")
        if not 1.0 <= self.dead_after <= 600:
            raise ValueError(f"--dead-after {self.dead_after:g}: give 1 to 600 seconds")
        if self.max_devices is not None and self.max_devices < 1:
            raise ValueError(f"--max-devices {self.max_devices} must be at least 1")
        if self.standby is not None and self.standby < 0:
            raise ValueError(f"--standby {self.standby} must be 0 or more")
        for e in self.schedule:
            if e.step is not None and e.step >= self.steps:
                raise ValueError(f"schedule event {e.index} ({e.describe()}) never fires: the run ends at "
                                 f"step {self.steps}; use a step below {self.steps}")
        if self.agents is None:  # the machines are known: check the schedule against them now
            self.trainer_options(self.initial().layout)  # the starting layout must be trainable
            dry_run(self)
        elif self.layout is not None:
            why = self.trainer.why_not(ParallelConfig.parse(self.layout))
            if why:
                raise ValueError(f"--layout {self.layout}: {why}")

    # -- derived ----------------------------------------------------------------------
    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(f"host{i}" for i in range(self.hosts))

    def pool(self) -> Pool:
        return Pool(self.host_names, self.gpus_per_host)

    def trainer_options(self, layout: ParallelConfig | str, steps: int | None = None, **kw):
        """The trainer's options for ``layout`` (raises ValueError if it cannot run it)."""
        from ..examples.gpt.options import TrainOptions

        return TrainOptions(layout=str(layout), steps=steps or self.steps, model=self.model, seed=self.seed,
                            global_batch=self.global_batch, micro_batch=self.micro_batch, lr=self.lr,
                            schedule=self.pipeline_schedule, data=self.data, **kw)

    def accepts(self, layout: ParallelConfig) -> bool:
        try:
            self.trainer_options(layout)
        except ValueError:
            return False
        return True

    @cached_property
    def chooser(self) -> LayoutChooser:
        shape = trainer_shape(self.model)
        hw = Hardware(device_memory_gib=self.device_memory, gpus_per_host=self.gpus_per_host)
        work = Workload(global_batch=self.global_batch, seq_len=shape.max_seq_len,
                        micro_batch=min(self.micro_batch, self.global_batch))
        return LayoutChooser(shape, hw, work, self.accepts)

    def initial(self) -> Allocation:
        """The starting allocation."""
        pool = self.pool()
        if self.layout is not None:
            layout = ParallelConfig.parse(self.layout)
            if self.devices is not None and self.devices != layout.world_size:
                raise ValueError(f"--layout {layout} uses {layout.world_size} devices, not --devices "
                                 f"{self.devices}; give one of them")
        else:
            n = self.devices or self.gpus_per_host
            if n > pool.total:
                raise ValueError(f"--devices {n}: the machines have {pool.total} ({self.hosts} hosts x "
                                 f"{self.gpus_per_host}); use --hosts or --gpus-per-host")
            layout = self.chooser(n)
        if not self.accepts(layout):
            self.trainer_options(layout)  # raises with the trainer's reason
        return Allocation(layout, pick_hosts(pool, layout.world_size), self.gpus_per_host)


    # -- the agent-based run --------------------------------------------------------------
    @cached_property
    def trainer(self):
        """What the workers run (:mod:`.trainer`): the reference trainer's plug-in (with
        this run's options), or the user's script with its own arguments."""
        from .trainer import REFERENCE_MODULE, REFERENCE_PLUGIN, ScriptTrainer, load_trainer

        if self.module == REFERENCE_MODULE:
            options = {"model": self.model, "seed": self.seed, "global_batch": self.global_batch,
                       "micro_batch": self.micro_batch, "lr": self.lr, "schedule": self.pipeline_schedule}
            if self.data:
                options["data"] = self.data
            made = load_trainer({"module": self.module, "plugin": REFERENCE_PLUGIN, "options": options})
            made.validate()
            return made
        return ScriptTrainer(self.module, None, tuple(self.args))

    def policy(self, gpus_per_host: int):
        """The controller's :class:`~.jobstate.Policy` for machines of ``gpus_per_host`` devices."""
        from .jobstate import Policy

        trainer = self.trainer
        shape = trainer.cost_shape()
        if shape is not None:
            hw = Hardware(device_memory_gib=self.device_memory, gpus_per_host=gpus_per_host)
            work = Workload(global_batch=self.global_batch, seq_len=shape.max_seq_len,
                            micro_batch=min(self.micro_batch, self.global_batch))
            chooser = LayoutChooser(shape, hw, work, trainer.accepts)
            model = None
        else:  # a script's model: its layouts from the PTC it describes
            from .ptc_layouts import PtcLayouts

            chooser, model = _data_parallel, PtcLayouts(self.device_memory * 2**30)
        return Policy(self.job, self.steps, self.schedule, gpus_per_host, chooser, trainer.accepts,
                      layout=ParallelConfig.parse(self.layout) if self.layout else None, devices=self.devices,
                      grow=self.grow, max_devices=self.max_devices, persist=self.persist, model=model)

    def machines(self):
        """The agents: started here (``hosts`` of ``gpus_per_host`` devices) or joining."""
        from .machines import LocalMachines, RemoteMachines

        if self.agents is not None:
            return RemoteMachines(self.agents, self.token)
        return LocalMachines(self.hosts, self.gpus_per_host, self.link, standby=self.standby)

    def welcome(self) -> dict:
        """What a joining agent is told: the job, the trainer, the data every machine needs."""
        return {"job": self.job, "trainer": self.trainer.to_json(), "data": self.trainer.data_spec()}

    def worker_env(self) -> dict[str, str]:
        return {"SCALAI_COMMIT_EVERY": str(self.commit_every), "SCALAI_TIMEOUT": str(self.worker_timeout)}


def _data_parallel(devices: int) -> ParallelConfig:
    """A script's layout for ``devices`` before it described its model: data parallel."""
    return ParallelConfig(tp=1, pp=1, dp=devices)


def _check_module(name: str) -> None:
    """The workers' module must exist here (the runner's Python is the workers' Python)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ValueError(f"--module {name}: no such module in {sys.executable}; install it or set PYTHONPATH")


def dry_run(spec: RunSpec) -> list[tuple[Event, Allocation]]:
    """The allocations the step-triggered events lead to, assuming nothing else happens.

    A failure of a host or rank that the job will not be using then (by this prediction;
    a ``scalai scale`` request may change it) is kept, and skipped at run time if it is
    still absent.

    Raises:
        ValueError: naming the first event that cannot be carried out, and why.
    """
    alloc, pool = spec.initial(), spec.pool()
    out = []
    for e in spec.schedule:
        if e.action == "fail" and isinstance(e.value, str) and e.value not in spec.host_names:
            raise ValueError(f"schedule event {e.index} ({e.describe()}): there is no host {e.value}; the "
                             f"hosts are {', '.join(spec.host_names)}")
        if e.action == "fail" and not isinstance(e.value, str) and e.value >= spec.hosts * spec.gpus_per_host:
            raise ValueError(f"schedule event {e.index} ({e.describe()}): rank {e.value} can never exist on "
                             f"{spec.hosts} hosts x {spec.gpus_per_host} devices")
    for e in (e for e in spec.schedule if e.step is not None):
        try:
            if e.action == "fail":
                present = e.value in alloc.hosts if isinstance(e.value, str) else e.value < alloc.devices
                if present:
                    alloc, pool = _after_fail(spec, alloc, pool, e.value)
            else:
                alloc = apply_event(alloc, pool, e.action, e.value, spec.chooser, spec.accepts)
        except ValueError as exc:
            raise ValueError(f"schedule event {e.index} ({e.describe()}): {exc}") from None
        out.append((e, alloc))
    return out


def _after_fail(spec: RunSpec, alloc: Allocation, pool: Pool, target) -> tuple[Allocation, Pool]:
    if isinstance(target, str):
        if target not in alloc.hosts:
            raise ValueError(f"{target} holds no worker of the job then ({alloc.describe()})")
        return after_failure(spec, alloc, pool, alloc.ranks_on(target), [target])
    if target >= alloc.devices:
        raise ValueError(f"rank {target} does not exist then ({alloc.layout} has {alloc.devices} ranks)")
    return after_failure(spec, alloc, pool, [target], [])


def after_failure(spec: RunSpec, alloc: Allocation, pool: Pool, dead_ranks, dead_hosts) -> tuple[Allocation, Pool]:
    """The allocation after ranks (and hosts) died, and the pool without their devices.

    The job goes on with its surviving devices; if none survive, with as many devices as
    it had, from healthy hosts (a restart elsewhere). Pure.

    Raises:
        ValueError: no healthy device is left.
    """
    for host in dead_hosts:
        pool = pool.fail_host(host)
    for rank in dead_ranks:
        if alloc.host(rank) not in dead_hosts:
            pool = pool.fail_devices(alloc.host(rank))
    survivors = alloc.devices - len(set(dead_ranks))
    n = min(survivors or alloc.devices, pool.total)
    if n < 1:
        raise ValueError("no healthy device is left to continue on")
    prefer = [h for h in alloc.hosts if h not in pool.dead]
    return Allocation(spec.chooser(n), pick_hosts(pool, n, prefer=prefer), spec.gpus_per_host), pool
