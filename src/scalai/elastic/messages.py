"""The controller's vocabulary: the events it is fed and the actions it hands back. Pure data.

The elastic runner is a pure function ``step(policy, state, event) -> (state, actions)``
(:mod:`.controller`) and a shell (:mod:`.runner`) that turns what happens (an agent
joined, a worker reported, a transformation finished, time passed) into these events and
carries out the actions (start workers through the agents, signal them, transform the
state in the stores, write the timeline). Every event that depends on time carries the
shell's clock (``now``, seconds since the epoch); the controller never reads a clock.

Events::

    Start, Resume                 the run begins (a fresh job, or a coordinator started again)
    Tick                          time passed (time-triggered events, grace periods, timeouts)
    AgentJoined / AgentDead       a machine's agent registered / stopped answering
    AgentLeaving / AgentGone      an agent got SIGTERM and asks to leave / it has left
    StepDone                      rank 0 of a generation finished a step (its metrics row)
    RankReport                    a worker's report changed (marks, saved, dump, commits)
    Announced                     a generation's workers described the job in its layout
    WorkerExited                  a worker process ended (its exit status)
    ScaleRequested                scalai scale, a time event or a policy asks for a change
    TransformDone / Failed        the stores finished (or failed) a transformation
    PersistStatus                 which versions the persistent copy uses, the newest copy

Actions::

    Launch, Signal, Kill          workers of a generation: start, stop/free/go/abort, kill
    CrashHost, Release            a machine dies (the schedule's failure) / a leaver may go
    Transform, RecoverDump, Restore   move the job state in the stores into a new layout
    HoldDump                      keep the survivors' dump alive until it is used
    Drop, Persist, HoldPersist, Fence  versions: delete, copy to disk, pause copies, fence
    Record, Say, Finish, Fail     the timeline, a line for the user, the end of the run
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ParallelConfig
from ..layout.ptc import PTC
from .allocation import Allocation
from .timeline import Reconfiguration

__all__ = ["AgentInfo", "StoredInfo", "PersistedInfo",
           "Start", "Resume", "Tick", "AgentJoined", "AgentDead", "AgentLeaving", "AgentGone", "StepDone",
           "RankReport", "Announced", "WorkerExited", "ScaleRequested", "TransformDone", "TransformFailed",
           "PersistStatus", "Event",
           "Launch", "Signal", "Kill", "CrashHost", "Release", "Transform", "RecoverDump", "Restore", "HoldDump", "Drop",
           "Persist", "HoldPersist", "Fence", "Record", "Say", "Finish", "Fail", "Action", "SIGNALS"]

#: What a running generation can be told (see :class:`Signal`).
SIGNALS = ("stop", "free", "go", "abort")


# -- what the controller knows about machines and versions ---------------------------------
@dataclass(frozen=True)
class AgentInfo:
    """A machine's agent as it registered: its name (the host's name in placements) and
    devices (``kind``: ``cpu`` or ``cuda``; ``memory_gib`` per device, 0 when unknown)."""

    host: str
    devices: int
    kind: str = "cpu"
    memory_gib: float = 0.0


@dataclass(frozen=True)
class StoredInfo:
    """A committed version found in the stores (a coordinator started again reads them);
    ``ptc``: the job's description it was saved with."""

    version: str
    step: int
    layout: ParallelConfig
    hosts: tuple[str, ...]
    sequence: int
    ptc: PTC | None = None


@dataclass(frozen=True)
class PersistedInfo:
    """A persistent copy on the coordinator's disk (``path``: a checkpoint directory)."""

    version: str
    step: int
    path: str


# -- events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """The run begins with these agents (the quorum has joined)."""

    now: float
    agents: tuple[AgentInfo, ...]


@dataclass(frozen=True)
class Resume:
    """A coordinator started again for a running job: the agents that re-registered, the
    committed versions their stores hold, the last step any worker reported before, and
    the highest generation number any agent or store has seen (new ones go above it)."""

    now: float
    agents: tuple[AgentInfo, ...]
    stored: tuple[StoredInfo, ...]
    last_step: int
    last_generation: int


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class AgentJoined:
    now: float
    agent: AgentInfo


@dataclass(frozen=True)
class AgentDead:
    """``host`` stopped answering (no heartbeat for the detection time), or its agent's
    connection was refused: everything on it is gone, its store too."""

    now: float
    host: str
    why: str = "no heartbeat"


@dataclass(frozen=True)
class AgentLeaving:
    """``host``'s agent got SIGTERM: it asks to leave once what only it holds is elsewhere."""

    now: float
    host: str


@dataclass(frozen=True)
class AgentGone:
    """``host``'s agent left after it was released (nothing of the job was on it)."""

    now: float
    host: str


@dataclass(frozen=True)
class StepDone:
    """Rank 0 of ``generation`` finished optimizer step ``step`` (``time``: its row's time)."""

    now: float
    generation: int
    step: int
    time: float


@dataclass(frozen=True)
class RankReport:
    """The latest report of one worker (see :mod:`.events`: times, saved, dump, commits)."""

    now: float
    generation: int
    rank: int
    report: dict


@dataclass(frozen=True)
class Announced:
    """Rank 0 of ``generation`` described the job under its layout (``ptc``); ``ready``:
    it is the PTC of the live job (reported when ready), not an early announcement."""

    now: float
    generation: int
    ptc: PTC
    ready: bool = False


@dataclass(frozen=True)
class WorkerExited:
    now: float
    generation: int
    rank: int
    code: int


@dataclass(frozen=True)
class ScaleRequested:
    """A change asked for now: ``action`` is ``devices``, ``layout`` or ``redeploy``."""

    now: float
    action: str
    value: Any
    reason: str


@dataclass(frozen=True)
class TransformDone:
    """The stores hold ``version`` in the new layout (``token`` names the request).
    ``plan`` and ``transform`` are (start, end) times; ``bytes_moved`` were copied,
    ``bytes_linked`` more were links to unchanged files of the same store."""

    now: float
    token: int
    version: str
    bytes_moved: int = 0
    cross_host_bytes: int = 0
    plan: tuple[float, float] = (0.0, 0.0)
    transform: tuple[float, float] = (0.0, 0.0)
    bytes_linked: int = 0


@dataclass(frozen=True)
class TransformFailed:
    now: float
    token: int
    error: str


@dataclass(frozen=True)
class PersistStatus:
    """The versions the persistent copy still reads (the stores must keep them) and the
    newest copy made."""

    now: float
    in_use: frozenset[str] = frozenset()
    latest: PersistedInfo | None = None


Event = (Start | Resume | Tick | AgentJoined | AgentDead | AgentLeaving | AgentGone | StepDone | RankReport
         | Announced | WorkerExited | ScaleRequested | TransformDone | TransformFailed | PersistStatus)


# -- actions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """Start generation ``generation``: ``alloc``'s ranks on its hosts, to stop after step
    ``until``. ``resume``: the workers wait for a go and load what it names. ``announce``:
    they describe the job in their layout first (the run does not know that PTC yet).
    ``free``: the devices are free now (else a ``Signal(free)`` follows)."""

    generation: int
    alloc: Allocation
    until: int
    start_step: int
    resume: bool
    announce: bool
    free: bool


@dataclass(frozen=True)
class Signal:
    """Tell ``generation``'s workers ``what`` (:data:`SIGNALS`): ``stop`` after the same
    step everywhere, ``free`` (the devices are free: build), ``go`` (load ``version``;
    ``None``: start from scratch), ``abort`` (dump this rank's state and exit, even from
    inside a blocked collective). ``hosts``: only these (default: all of the generation's
    hosts that are alive)."""

    generation: int
    what: str
    version: str | None = None
    hosts: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``generation``'s workers (``ranks``: only these)."""

    generation: int
    ranks: tuple[int, ...] | None = None
    reason: str = ""


@dataclass(frozen=True)
class CrashHost:
    """The schedule's ``fail: HOST``: the machine dies (agent, workers, store and its memory)."""

    host: str
    reason: str = ""


@dataclass(frozen=True)
class Release:
    """``host``'s agent, which asked to leave, may go: the job holds nothing on it."""

    host: str


@dataclass(frozen=True)
class Transform:
    """Transform committed ``source`` into ``target`` (a PTC, or a layout: the source's
    split rules at the new degrees) on ``alloc``'s hosts; ``lost``: hosts whose stores are
    gone. Answered by ``TransformDone``/``TransformFailed`` with ``token``."""

    token: int
    source: str
    alloc: Allocation
    target: PTC | ParallelConfig
    lost: tuple[str, ...] = ()
    generation: int = 0  # the new generation (its owner id names it: fenced stores refuse older ones)


@dataclass(frozen=True)
class RecoverDump:
    """Commit the survivors' dump ``dump_version`` (written in ``ptc`` on ``placement``'s
    hosts, ``lost_ranks`` missing, non-tensor ``state``) on ``alive_hosts``, then transform it
    like :class:`Transform` (reading the lost ranks' bytes from their replicas)."""

    token: int
    dump_version: str
    ptc: PTC
    old_alloc: Allocation
    state: dict
    lost_ranks: tuple[int, ...]
    alive_hosts: tuple[str, ...]
    alloc: Allocation
    target: PTC | ParallelConfig
    lost: tuple[str, ...] = ()
    generation: int = 0
    dump_generation: int = 0  # whose survivors dumped (the dump's owner names it)


@dataclass(frozen=True)
class Restore:
    """Put the persistent copy at ``path`` back into ``alloc``'s stores in its layout."""

    token: int
    path: str
    alloc: Allocation
    generation: int = 0


@dataclass(frozen=True)
class HoldDump:
    """Keep the dump ``generation``'s survivors write alive in the stores (renew its lease)
    until it is committed or dropped: recovering from it may take longer than a lease."""

    generation: int


@dataclass(frozen=True)
class Drop:
    version: str


@dataclass(frozen=True)
class Persist:
    version: str
    step: int


@dataclass(frozen=True)
class HoldPersist:
    """Pause (``True``) or resume persistent copies (they would lengthen a downtime)."""

    held: bool


@dataclass(frozen=True)
class Fence:
    """From now on the stores refuse writes and commits of generations below ``generation``
    (``hosts``: the stores to tell; default every live one): the generations the run gave up
    on, whose workers may still be running on a machine cut off or frozen."""

    generation: int
    hosts: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Record:
    """A reconfiguration is complete: add it to the timeline."""

    change: Reconfiguration


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Finish:
    """The job reached its last step; ``version`` holds the final state."""

    step: int
    version: str | None


@dataclass(frozen=True)
class Fail:
    """The run cannot go on (``message`` says why; ``generation``: whose logs to show)."""

    message: str
    generation: int | None = None


Action = (Launch | Signal | Kill | CrashHost | Release | Transform | RecoverDump | Restore | HoldDump | Drop
          | Persist | HoldPersist | Fence | Record | Say | Finish | Fail)

