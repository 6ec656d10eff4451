"""What ``scalai run`` runs: the job, its machines, the schedule. Validated before anything starts.

:class:`RunSpec` checks itself on construction. With agents started here (``--hosts``) the
machines are known, so every step-triggered event of the schedule is dry-run against them
(:func:`dry_run`): an event that asks for more devices than there are, a layout the
trainer cannot run, a redeployment without enough free hosts or a failure of a rank that
will not exist is refused up front, with the event's index, before any process starts.
With agents joining from elsewhere (``--listen``, ``--agents``) the same dry run happens
once they have joined, before the job starts.

The spec derives what the rest of the runner uses: the trainer plug-in
(:attr:`RunSpec.trainer`, :mod:`.trainer`), the controller's policy (:meth:`RunSpec.policy`),
the machines (:meth:`RunSpec.machines`) and what a joining agent is told
(:meth:`RunSpec.welcome`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..config import ParallelConfig
from .allocation import Allocation, LayoutChooser, Pool
from .layouts import Hardware, Workload
from .schedule import Event
from ..tls import Tls
from .trainer import REFERENCE_MODULE, check_module

__all__ = ["RunSpec", "dry_run"]


@dataclass(frozen=True)
class RunSpec:
    """One elastic run.

    Attributes:
        schedule: the events (see :mod:`scalai.elastic.schedule`).
        steps: the job's total optimizer steps (a resumed job stops there too).
        out: the run directory (created; must not hold an earlier run).
        module: the workers' module (``python -m MODULE``): the reference trainer, or a
            user's script following the worker protocol (:mod:`scalai.elastic.worker`),
            which gets ``args``.
        args: a script's own arguments (``scalai run --module M -- ARGS``).
        model, global_batch, micro_batch, lr, seed, data, pipeline_schedule: the reference
            trainer's options (``data``: an index present on every machine; default: each
            machine builds the stdlib corpus).
        hosts / gpus_per_host: without ``agents``: agents started on this machine
            (``host0``, ``host1``...) and their devices.
        listen / agents: the coordinator's address (``HOST:PORT``) and how many agents
            started elsewhere to wait for (the devices are theirs).
        token: the run's token (agents, stores, ``scalai scale``); required off loopback.
        tls: transport security (:class:`~scalai.tls.Tls`): with a certificate and key the
            coordinator serves HTTPS (and agents started here serve their stores with the
            same); its CA bundle verifies the agents' stores.
        layout / devices: the starting layout, or a device count to choose one for
            (default: one machine's devices).
        commit_every: commit the state to the stores every N steps (0: only at changes);
            the last commit is where a failure without replicas restarts from.
        commit_mode: ``"background"`` (a commit's step returns once the shards are staged
            in host memory; see :mod:`.commits`) or ``"blocking"`` (the step waits).
        persist: copy every commit to ``out/checkpoints`` in the background.
        persist_to: where the copies go instead (a directory or a URL such as
            ``s3://BUCKET/run``; credentials from the backend's environment).
        link: agents started here: the simulated link between their stores (``"1gbit"``).
        resume: a coordinator started again: continue the job from its agents' stores.
        grow / max_devices: grow into agents that join during the run (up to that many devices).
        dead_after: seconds without a heartbeat after which a machine counts as dead.
        standby: started workers each agent keeps (default: one per device).
        start_ahead: start the next generation's workers before a change (a scheduled one:
            a few steps ahead; a request: at once), so that their start-up overlaps
            training and the save; off, they start once the old workers have saved (two
            generations' processes never coexist before it).
        worker_timeout: seconds a collective may wait before it fails (``SCALAI_TIMEOUT``;
            a frozen machine is noticed sooner, by its silence).
    """

    schedule: tuple[Event, ...]
    steps: int
    out: str
    module: str = REFERENCE_MODULE
    args: tuple[str, ...] = ()
    model: str = "gpt-tiny"
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    data: str | None = None
    pipeline_schedule: str = "1f1b"
    hosts: int = 2
    gpus_per_host: int = 2
    listen: str | None = None
    agents: int | None = None
    token: str | None = None
    tls: Tls | None = None
    layout: str | None = None
    devices: int | None = None
    job: str = "job"
    commit_every: int = 10
    commit_mode: str = "background"
    persist: bool = True
    persist_to: str | None = None
    link: str | None = None
    device_memory: float = 80.0
    resume: bool = False
    grow: bool = True
    max_devices: int | None = None
    dead_after: float = 5.0
    standby: int | None = None
    start_ahead: bool = True
    worker_timeout: int = 120
    quorum_timeout: float = 300.0

    def __post_init__(self) -> None:
        from ..store.names import check_name
        from .wire import check_listen, split_address

        object.__setattr__(self, "schedule", tuple(self.schedule))
        object.__setattr__(self, "args", tuple(self.args))
        for name in ("steps", "hosts", "gpus_per_host"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
        if self.commit_every < 0:
            raise ValueError(f"--commit-every={self.commit_every} must be >= 0")
        from .commits import COMMIT_MODES

        if self.commit_mode not in COMMIT_MODES:
            raise ValueError(f"--commit-mode={self.commit_mode!r}: use one of {', '.join(COMMIT_MODES)}")
        if self.hosts > 80:
            raise ValueError(f"--hosts={self.hosts}: one machine runs at most 80 agents")
        check_name(self.job, "job")
        check_module(self.module)
        if (self.listen is None) != (self.agents is None):
            raise ValueError("--listen ADDR:PORT and --agents N go together (agents started elsewhere join there)")
        if self.tls is not None and not isinstance(self.tls, Tls):
            raise TypeError("tls must be a scalai.tls.Tls")
        if self.listen is not None:
            host, _ = split_address(self.listen, "--listen")
            check_listen(host, self.token)
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
        self.trainer  # noqa: B018 - the trainer's options are checked here
        if self.layout is not None:
            why = self.trainer.why_not(ParallelConfig.parse(self.layout))
            if why:
                raise ValueError(f"--layout {self.layout}: {why}")
        if self.agents is None and not self.resume:  # the machines are known: check the schedule now
            dry_run(self.policy(self.gpus_per_host), self.local_pool())

    # -- what the runner uses -------------------------------------------------------------
    @cached_property
    def trainer(self):
        """What the workers run (:mod:`.trainer`): the reference trainer's plug-in (with
        this run's options), or the user's script with its own arguments."""
        from .trainer import REFERENCE_PLUGIN, ScriptTrainer, load_trainer

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
            chooser, model = LayoutChooser(shape, hw, work, trainer.accepts), None
        else:  # a script's model: its layouts from the PTC it describes
            from .ptc_layouts import PtcLayouts

            chooser, model = _data_parallel, PtcLayouts(self.device_memory * 2**30)
        return Policy(self.job, self.steps, self.schedule, gpus_per_host, chooser, trainer.accepts,
                      layout=ParallelConfig.parse(self.layout) if self.layout else None, devices=self.devices,
                      grow=self.grow, max_devices=self.max_devices, persist=self.persist, model=model,
                      start_ahead=self.start_ahead)

    def local_pool(self) -> Pool:
        """The agents this run starts on this machine (without ``agents``)."""
        return Pool(tuple(f"host{i}" for i in range(self.hosts)), self.gpus_per_host)

    def initial(self) -> Allocation:
        """The starting allocation on the local agents (step-0 events not applied)."""
        return self.policy(self.gpus_per_host).initial(self.local_pool())

    def machines(self):
        """The agents: started here (``hosts`` of ``gpus_per_host`` devices) or joining."""
        from .machines import LocalMachines, RemoteMachines

        if self.agents is not None:
            return RemoteMachines(self.agents, self.token)
        return LocalMachines(self.hosts, self.gpus_per_host, self.link, standby=self.standby, tls=self.tls)

    def welcome(self) -> dict:
        """What a joining agent is told: the job, the trainer, the data every machine needs."""
        return {"job": self.job, "trainer": self.trainer.to_json(), "data": self.trainer.data_spec()}

    def worker_env(self) -> dict[str, str]:
        return {"SCALAI_COMMIT_EVERY": str(self.commit_every), "SCALAI_COMMIT_MODE": self.commit_mode,
                "SCALAI_TIMEOUT": str(self.worker_timeout)}


def _data_parallel(devices: int) -> ParallelConfig:
    """A script's layout for ``devices`` before it described its model: data parallel."""
    return ParallelConfig(tp=1, pp=1, dp=devices)


def dry_run(policy, pool: Pool) -> list[tuple[Event, Allocation]]:
    """The allocations the step-triggered events lead to on ``pool``, assuming nothing else
    happens (pure).

    A failure of a host or rank that the job will not be using then (by this prediction;
    a ``scalai scale`` request may change it) is kept, and skipped at run time if it is
    still absent.

    Raises:
        ValueError: naming the first event that cannot be carried out, and why.
    """
    from .changes import after_failure

    alloc = policy.initial(pool)
    for e in policy.schedule:
        if e.action == "fail" and isinstance(e.value, str) and e.value not in pool.hosts:
            raise ValueError(f"schedule event {e.index} ({e.describe()}): there is no host {e.value}; the "
                             f"hosts are {', '.join(pool.hosts)}")
        if e.action == "fail" and not isinstance(e.value, str) and e.value >= pool.total:
            raise ValueError(f"schedule event {e.index} ({e.describe()}): rank {e.value} can never exist on "
                             f"{len(pool.hosts)} hosts x {pool.gpus_per_host} devices")
    out = []
    choose, accepts = policy.choose_in(()), policy.accepts_in(())
    from .allocation import apply_event

    for e in (e for e in policy.schedule if e.step is not None):
        try:
            if e.action == "fail":
                target = e.value
                if isinstance(target, str) and target in alloc.hosts:
                    alloc, pool = after_failure(policy, alloc, pool, [], [target])
                elif not isinstance(target, str) and target < alloc.devices:
                    alloc, pool = after_failure(policy, alloc, pool, [target], [])
            else:
                alloc = apply_event(alloc, pool, e.action, e.value, choose, accepts)
        except ValueError as exc:
            raise ValueError(f"schedule event {e.index} ({e.describe()}): {exc}") from None
        out.append((e, alloc))
    return out
