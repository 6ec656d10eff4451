"""The controller's state: the job's generations, the change in progress, versions, machines.

A *generation* (:class:`Gen`) is one launch of the job's workers in one layout on one set
of hosts; it ends when its workers stop for a change, finish, or fail. At most three are
alive at once: the *current* one (training), its *successor* (started ahead of a change,
waiting for the devices) and an *old* one still exiting after its save. A :class:`Change`
is the reconfiguration in progress, from the old generation's end to the new one's first
step. :class:`JobState` holds all of it; :class:`Policy` holds what does not change
during a run (the schedule, the step count, how layouts are chosen, time limits).

The controller (:mod:`.controller`) never mutates a state it was given: it works on
:meth:`JobState.copy` and returns the copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..config import ParallelConfig
from ..layout.ptc import PTC
from .allocation import Allocation, Pool, apply_event, pick_hosts
from .messages import PersistedInfo
from .schedule import Event as ScheduleEvent

__all__ = ["Policy", "Gen", "Change", "Commit", "JobState", "axes_in_use", "known_ptc"]


@dataclass(frozen=True)
class Policy:
    """What a run keeps constant (validated by :class:`~.spec.RunSpec`).

    Attributes:
        job: the job's name in the stores.
        steps: the job's total optimizer steps.
        schedule: the events, sorted by trigger.
        gpus_per_host: devices per host (every agent reports as many).
        chooser: the best layout for a device count (raises ValueError if none fits).
        accepts: whether the trainer can run a layout.
        layout / devices: the starting layout, or a device count to choose one for
            (neither: one host's devices).
        grow: grow into the devices of agents that join during the run (up to
            ``max_devices``).
        persist: copy every committed version to disk in the background.
        start_ahead: start the next generation before a change (a scheduled one: a few
            steps ahead; a request: at once); off, only once the old workers have saved.
        grace_s: how long workers get to dump and exit after a failure, or to exit after
            their save, before they are killed.
        announce_timeout_s: longest wait for new workers to describe the job in their layout.
        startup_s: start-up time (launch to workers waiting) assumed before one is measured.
        model: for a user's script, its layouts from the PTCs it describes
            (:class:`~.ptc_layouts.PtcLayouts`); then ``chooser`` is used only before
            the run starts.
    """

    job: str
    steps: int
    schedule: tuple[ScheduleEvent, ...]
    gpus_per_host: int
    chooser: Callable[[int], ParallelConfig]
    accepts: Callable[[ParallelConfig], bool] = lambda config: True
    layout: ParallelConfig | None = None
    devices: int | None = None
    grow: bool = False
    max_devices: int | None = None
    persist: bool = True
    start_ahead: bool = True
    grace_s: float = 60.0
    announce_timeout_s: float = 120.0
    startup_s: float = 10.0
    model: Any = None  # a PtcLayouts: a script's model, known from the PTCs it describes

    def apply(self, s: "JobState", alloc: Allocation, action: str, value) -> Allocation:
        """The allocation after an event on ``s``'s pool, with what the run knows of the
        model (raises ValueError when it cannot be met)."""
        return apply_event(alloc, s.pool, action, value, self.choose_in(s.ptcs), self.accepts_in(s.ptcs))

    def choose_in(self, ptcs) -> Callable[[int], ParallelConfig]:
        """The layout chooser, given the PTCs the run has seen (a script's model)."""
        if self.model is None:
            return self.chooser
        return lambda n: self.model.choose(n, ptcs)

    def accepts_in(self, ptcs) -> Callable[[ParallelConfig], bool]:
        if self.model is None:
            return self.accepts
        return lambda layout: self.accepts(layout) and self.model.why_not(layout, ptcs) is None

    def initial(self, pool: Pool) -> Allocation:
        """The starting allocation on ``pool`` (step-0 events not applied yet).

        Raises:
            ValueError: the layout does not fit the machines, or no layout fits.
        """
        if self.layout is not None:
            layout = self.layout
            if self.devices is not None and self.devices != layout.world_size:
                raise ValueError(f"--layout {layout} uses {layout.world_size} devices, not --devices "
                                 f"{self.devices}; give one of them")
        else:
            n = self.devices or self.gpus_per_host
            if n > pool.total:
                raise ValueError(f"--devices {n}: the machines have {pool.total} ({len(pool.hosts)} hosts x "
                                 f"{pool.gpus_per_host}); start more agents or ask for fewer devices")
            layout = self.chooser(n)
        if not self.accepts(layout):
            raise ValueError(f"the trainer cannot run layout {layout}")
        return Allocation(layout, pick_hosts(pool, layout.world_size), self.gpus_per_host)

    def dump_version(self, generation: int) -> str:
        """The version a failed generation's survivors dump into."""
        return f"rescue-g{generation:03d}"


@dataclass
class Gen:
    """One generation (see the module docstring). ``reports``: every rank's latest report;
    ``exits``: exit status per rank (ranks of a dead host count as exited, -9);
    ``killed``: ``(kind, target, time)`` of failures the run caused or saw."""

    number: int
    alloc: Allocation
    until: int
    start_step: int
    resume: bool
    announce: bool
    launched: float
    reports: dict[int, dict] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)
    first_step: float | None = None
    last_step: int | None = None
    stop_at: float | None = None
    failed_at: float | None = None
    killed: tuple[tuple[str, Any, float], ...] = ()
    announced: PTC | None = None
    ptc: PTC | None = None
    freed: bool = False
    exited_at: float | None = None
    exit_deadline: float | None = None
    dropped: bool = False  # killed before it ran (a successor not needed after all)
    kill_sent: bool = False  # the run killed (some of) its workers: their SIGKILL is not a fault

    def failed_ranks(self, dead_hosts) -> list[int]:
        """Ranks whose device failed (not on a dead host): killed by the schedule, or exited
        with an error of their own (not 0, not dumped or aborted, not killed by the run)."""
        from .abort import EXIT_ABORTED
        from .events import EXIT_DUMPED

        killed = {t for kind, t, _ in self.killed if kind == "rank"}
        ours = (-9, -15) if self.kill_sent else ()
        crashed = {r for r, code in self.exits.items() if code not in (0, EXIT_DUMPED, EXIT_ABORTED, *ours)}
        return sorted(r for r in killed | crashed if self.alloc.host(r) not in dead_hosts)

    @property
    def world(self) -> int:
        return self.alloc.devices

    def times(self, rank: int) -> dict:
        return self.reports.get(rank, {}).get("times", {})

    def marked(self, name: str) -> list[int]:
        """Ranks whose report has the mark ``name``."""
        return [r for r in range(self.world) if name in self.times(r)]

    @property
    def all_exited(self) -> bool:
        return len(self.exits) >= self.world

    @property
    def saved(self) -> dict | None:
        """Rank 0's save (version, step, bytes) once every rank has finished saving."""
        saved = self.reports.get(0, {}).get("saved")
        if saved and len(self.marked("save_end")) == self.world:
            return saved
        return None

    @property
    def failed(self) -> bool:
        return self.failed_at is not None


@dataclass
class Change:
    """The reconfiguration in progress.

    ``kind``: ``planned`` (the old workers saved ``source``), ``recovery`` (a failure) or
    ``restart`` (a coordinator started again). ``phase``: ``target`` (waiting for the new
    workers to describe the job in their layout), ``transform`` (the stores are moving the
    state), ``go`` (the new version is ready), ``load`` (the new workers load ``version``
    and take their first step). Times: ``t_allocate`` when it began (the new allocation
    decided and launched at once), ``t_target`` when the target PTC was known (the end
    of ``announce``), ``plan`` and ``transform`` as the stores' operation measured them.
    """

    token: int
    kind: str
    old: int | None
    new: int
    alloc: Allocation
    request: float
    reason: str
    at_step: int
    t_allocate: float
    deadline: float
    phase: str = "target"
    source: str | None = None
    version: str | None = None
    plan: tuple[float, float] | None = None
    transform: tuple[float, float] | None = None
    go: float | None = None
    t_target: float | None = None
    bytes_moved: int = 0
    cross_host_bytes: int = 0
    bytes_linked: int = 0
    saved_bytes: int = 0
    # failures
    died: tuple[int, ...] = ()
    dead_hosts: tuple[str, ...] = ()
    last_logged: int | None = None
    recovered_from: str = ""
    source_text: str = ""
    steps_lost: int = 0


@dataclass
class Commit:
    """A version committed in the stores (``hosts``: where its shards are)."""

    version: str
    step: int
    hosts: tuple[str, ...]
    dropped: bool = False


@dataclass
class JobState:
    """Everything the controller decides from (see the module docstring)."""

    pool: Pool
    alloc: Allocation
    gens: dict[int, Gen] = field(default_factory=dict)
    current: int | None = None
    successor: int | None = None
    next_number: int = 0
    next_token: int = 0
    change: Change | None = None
    fired: frozenset[int] = frozenset()
    noted: frozenset = frozenset()
    requests: tuple[tuple[str, Any, str, float], ...] = ()  # (action, value, reason, time)
    commits: list[Commit] = field(default_factory=list)
    dropped: frozenset[str] = frozenset()  # versions dropped (and forgotten): never recorded again
    last_logged: int = 0
    row_times: dict[int, float] = field(default_factory=dict)  # step -> time of its latest row
    recent: tuple[float, ...] = ()  # times of the last rows (step time estimate)
    phase: str = "starting"
    stuck: int = 0
    t0: float = 0.0
    persist_in_use: frozenset[str] = frozenset()
    persisted: PersistedInfo | None = None
    ptcs: tuple[PTC, ...] = ()
    releasing: frozenset[str] = frozenset()  # leaving hosts to release once the job holds nothing there
    startups: tuple[float, ...] = ()  # measured start-ups: launch to every worker waiting for devices
    abandoned: dict[int, tuple[Allocation, int]] = field(default_factory=dict)  # token -> (alloc, step)

    def copy(self) -> JobState:
        """A copy the controller may change (generations and changes copied too; reports,
        PTCs and allocations are shared: they are replaced, never changed in place)."""
        out = replace(self)
        out.gens = {n: replace(g, reports=dict(g.reports), exits=dict(g.exits)) for n, g in self.gens.items()}
        out.change = replace(self.change) if self.change is not None else None
        out.commits = [replace(c) for c in self.commits]
        out.row_times = dict(self.row_times)
        out.abandoned = dict(self.abandoned)
        return out

    @property
    def gen(self) -> Gen | None:
        """The current generation."""
        return self.gens.get(self.current) if self.current is not None else None

    def live_commits(self) -> list[Commit]:
        """Committed versions not dropped whose hosts are all alive, oldest first."""
        return [c for c in self.commits if not c.dropped and not set(c.hosts) & self.pool.dead]


def axes_in_use(layout: ParallelConfig) -> tuple[bool, bool, bool]:
    """Which parallel axes ``layout`` uses (pure): tensor parallel, data parallel, and
    sharding over the data-parallel ranks."""
    return layout.tp > 1, layout.dp > 1, layout.dp > 1 and bool(layout.zero)


def known_ptc(ptcs, layout: ParallelConfig) -> PTC | None:
    """The job's PTC under ``layout`` if one of ``ptcs`` (seen by this run) uses the same
    parallel axes, relaid out to ``layout``'s degrees; else None (pure).

    Described from DTensor placements, a job's split rules depend on which axes are in use
    (tp > 1, dp > 1, sharding over dp), not on their degrees, so the relayout is exact;
    should a script differ, a load still fills every element exactly once."""
    for ptc in ptcs:
        if axes_in_use(ptc.config) == axes_in_use(layout):
            return ptc if ptc.config == layout else ptc.relayout(layout)
    return None

