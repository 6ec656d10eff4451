"""Which devices a job runs on and in which layout: the runner's decisions, as pure functions.

A :class:`Pool` is the machine room: hosts with ``gpus_per_host`` device slots each, minus
failed devices and dead hosts. An :class:`Allocation` is what a job holds: a layout and the
hosts of its placement, in slot order (rank ``r`` on ``hosts[r // G]``, Megatron's order).
Every placement but its last host uses whole hosts; the last may be partly used (or partly
failed).

Decisions:

- :func:`pick_hosts`: hosts for ``n`` devices, preferring the hosts the job already holds
  (their stores hold its state), then the others in order; ``exclude`` gives a disjoint set
  (a redeployment).
- :func:`choose_layout`: the best layout for ``n`` devices by the cost model of
  :mod:`scalai.elastic.layouts`, among those the trainer accepts; data-parallel replicas
  (``zero=0``) are kept whenever a replicated layout fits and is as fast as the sharded
  one, since replicas let a failure be recovered without losing steps.
- :func:`apply_event`: the allocation after a ``devices``, ``layout`` or ``redeploy`` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from ..config import ParallelConfig, Placement
from ..models.shapes import ModelShape
from .layouts import Hardware, LayoutEstimate, Workload, rank_layouts

__all__ = ["Pool", "Allocation", "pick_hosts", "choose_layout", "apply_event", "LayoutChooser"]


@dataclass(frozen=True)
class Pool:
    """Hosts and their healthy device count.

    Attributes:
        hosts: every host, in order.
        gpus_per_host: device slots per host.
        failed: ``{host: failed devices}``.
        dead: hosts that are gone (their store too).
        leaving: hosts whose agent asked to leave: no new work goes there, but their store
            still answers until the job's state is elsewhere.
    """

    hosts: tuple[str, ...]
    gpus_per_host: int
    failed: dict[str, int] = field(default_factory=dict)
    dead: frozenset[str] = frozenset()
    leaving: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.hosts or len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"hosts {list(self.hosts)} must be distinct and at least one")
        if self.gpus_per_host < 1:
            raise ValueError(f"gpus_per_host={self.gpus_per_host} must be at least 1")

    def capacity(self, host: str) -> int:
        """Healthy devices of ``host``."""
        if host in self.dead or host in self.leaving:
            return 0
        return max(0, self.gpus_per_host - self.failed.get(host, 0))

    @property
    def total(self) -> int:
        return sum(self.capacity(h) for h in self.hosts)

    def fail_devices(self, host: str, count: int = 1) -> Pool:
        failed = dict(self.failed)
        failed[host] = min(self.gpus_per_host, failed.get(host, 0) + count)
        return replace(self, failed=failed)

    def fail_host(self, host: str) -> Pool:
        return replace(self, dead=self.dead | {host}, leaving=self.leaving - {host})

    def leave(self, host: str) -> Pool:
        """``host`` takes no new work (its agent asked to leave)."""
        return replace(self, leaving=self.leaving | {host})

    def join(self, host: str) -> Pool:
        """``host`` (re)joined: a new machine, or one declared dead that registered again
        (its store was emptied: it starts afresh, every device healthy)."""
        failed = {h: n for h, n in self.failed.items() if h != host}
        hosts = self.hosts if host in self.hosts else self.hosts + (host,)
        return replace(self, hosts=hosts, failed=failed, dead=self.dead - {host}, leaving=self.leaving - {host})

    @property
    def alive(self) -> tuple[str, ...]:
        """Hosts whose store answers (not dead; leaving ones included)."""
        return tuple(h for h in self.hosts if h not in self.dead)


@dataclass(frozen=True)
class Allocation:
    """A layout placed on hosts (slot order)."""

    layout: ParallelConfig
    hosts: tuple[str, ...]
    gpus_per_host: int

    @property
    def devices(self) -> int:
        return self.layout.world_size

    @property
    def placement(self) -> Placement:
        return Placement(self.gpus_per_host, self.hosts)

    def host(self, rank: int) -> str:
        return self.hosts[rank // self.gpus_per_host]

    def ranks_on(self, host: str) -> list[int]:
        return [r for r in range(self.devices) if self.host(r) == host]

    def local_size(self, host: str) -> int:
        return len(self.ranks_on(host))

    def describe(self) -> str:
        return f"{self.layout} on {', '.join(self.hosts)}"


def pick_hosts(pool: Pool, devices: int, prefer: Sequence[str] = (), exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """Hosts for ``devices`` devices: whole hosts, then one host for the rest (slot order).

    Raises:
        ValueError: not enough healthy devices (the message says how many there are).
    """
    if devices < 1:
        raise ValueError(f"devices={devices} must be at least 1")
    g, excluded = pool.gpus_per_host, set(exclude)
    order = [h for h in prefer if h in pool.hosts] + [h for h in pool.hosts if h not in prefer]
    cands = [h for h in order if h not in excluded and pool.capacity(h) > 0]
    k, rest = -(-devices // g), devices - g * (-(-devices // g) - 1)
    full = [h for h in cands if pool.capacity(h) == g]
    # The last slot takes the rest: a partly failed host if one is big enough, else a whole one.
    last = next((h for h in cands if rest <= pool.capacity(h) < g), None) if rest < g else None
    if last is None and len(full) >= k:
        return tuple(full[:k])
    if last is not None and len(full) >= k - 1:
        return tuple(full[:k - 1]) + (last,)
    available = sum(pool.capacity(h) for h in cands)
    where = " outside the job's current hosts" if excluded else ""
    raise ValueError(f"{devices} devices need {k - 1 if last else k} whole hosts of {g}"
                     f"{' plus one with ' + str(rest) if rest < g else ''}, but only {available} healthy "
                     f"devices are left{where} ({len(full)} whole hosts); ask for fewer devices")


@dataclass(frozen=True)
class LayoutChooser:
    """Chooses layouts for a model: the cost model's ranking, filtered by ``accepts``."""

    shape: ModelShape
    hardware: Hardware
    workload: Workload
    accepts: Callable[[ParallelConfig], bool] = lambda config: True

    def ranking(self, devices: int) -> list[LayoutEstimate]:
        return [e for e in rank_layouts(self.shape, devices, self.hardware, self.workload)
                if self.accepts(e.config)]

    def __call__(self, devices: int) -> ParallelConfig:
        return choose_layout(self.ranking(devices), devices)


def choose_layout(ranking: Sequence[LayoutEstimate], devices: int) -> ParallelConfig:
    """The first fitting layout of ``ranking``, a replicated one (``zero=0``) when it ties.

    Raises:
        ValueError: no layout fits.
    """
    fitting = [e for e in ranking if e.fits]
    if not fitting:
        raise ValueError(f"no layout of the model fits {devices} devices; use another device count "
                         f"(see 'scalai layouts')")
    best = fitting[0]
    if best.config.zero:
        twin = best.config.with_(zero=False)
        for e in fitting:
            if e.config == twin and round(e.step_seconds, 6) <= round(best.step_seconds, 6):
                return twin
    return best.config


def apply_event(alloc: Allocation, pool: Pool, action: str, value, choose: Callable[[int], ParallelConfig],
                accepts: Callable[[ParallelConfig], bool] = lambda c: True) -> Allocation:
    """The allocation after a ``devices``, ``layout`` or ``redeploy`` event (pure).

    Raises:
        ValueError: the event cannot be met (too few devices, a layout the trainer
            refuses); the message says why.
    """
    g = pool.gpus_per_host
    if action == "devices":
        hosts = pick_hosts(pool, value, prefer=alloc.hosts)  # first: are there that many devices?
        return Allocation(choose(value), hosts, g)
    if action == "layout":
        layout = ParallelConfig.parse(value) if isinstance(value, str) else value
        if not accepts(layout):
            raise ValueError(f"the trainer cannot run layout {layout}")
        return Allocation(layout, pick_hosts(pool, layout.world_size, prefer=alloc.hosts), g)
    if action == "redeploy":
        return Allocation(alloc.layout, pick_hosts(pool, alloc.devices, exclude=alloc.hosts), g)
    raise ValueError(f"action {action!r} does not change an allocation; use devices, layout or redeploy")
