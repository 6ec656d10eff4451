"""Feeding the controller events by hand (helpers of ``test_controller.py``; a uniquely
named module, see ``elastic_helpers.py``).

:class:`Sim` keeps a policy and a state, feeds events with a clock that advances by 0.1 s
per event, and returns the actions of each. Its helpers make the events the shell would
send: steps done, every rank saved, exits, dumps, announcements, transformations done.
The expected values in the tests are written out by hand from the rules of
:mod:`scalai.elastic.changes`, never computed by the controller's own functions.
"""

from __future__ import annotations

from scalai.config import ParallelConfig
from scalai.elastic import controller
from scalai.elastic.jobstate import Policy
from scalai.elastic.messages import (AgentInfo, Announced, RankReport, Start, StepDone, Tick, TransformDone,
                                     WorkerExited)
from scalai.elastic.schedule import parse_schedule
from scalai.models import model_ptc


def dp_chooser(n: int) -> ParallelConfig:
    """Data parallelism only: what the tests' policy picks for n devices."""
    return ParallelConfig(tp=1, pp=1, dp=n)


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def only(actions, kind):
    return [a for a in actions if type(a).__name__ == kind]


def said(actions) -> str:
    return "\n".join(a.text for a in only(actions, "Say"))


class Sim:
    def __init__(self, schedule=(), steps=12, hosts=4, gpus=2, devices=2, layout=None, chooser=dp_chooser, **kw):
        self.policy = Policy("job", steps, tuple(parse_schedule(list(schedule))), gpus, chooser,
                             layout=ParallelConfig.parse(layout) if layout else None,
                             devices=None if layout else devices, **kw)
        self.agents = tuple(AgentInfo(f"host{i}", gpus) for i in range(hosts))
        self.state = controller.initial_state(self.policy, self.agents)
        self.now = 1000.0
        self.history: list[tuple[object, list]] = []

    def feed(self, event_type, *args, **kw) -> list:
        self.now += 0.1
        event = event_type(self.now, *args, **kw)
        before = self.state
        self.state, actions = controller.step(self.policy, self.state, event)
        assert before is not self.state
        self.history.append((event, actions))
        return actions

    def start(self) -> list:
        return self.feed(Start, self.agents)

    def tick(self, seconds: float = 0.0) -> list:
        self.now += seconds
        return self.feed(Tick)

    @property
    def gen(self):
        return self.state.gen

    def world(self, g: int) -> int:
        return self.state.gens[g].world

    def steps(self, g: int, first: int, last: int, loaded: bool = True) -> list:
        """Rows of steps ``first``..``last`` from ``g``; before them its ranks' reports say
        they loaded (what workers do), unless ``loaded`` is False (the reports come late)."""
        out = []
        if loaded:
            out += self.marks(g, "load_end", ranks=[r for r in range(self.world(g))
                                                    if "load_end" not in self.state.gens[g].times(r)])
        for step in range(first, last + 1):
            out += self.feed(StepDone, g, step, self.now)
        return out

    def report(self, g: int, rank: int, **fields) -> list:
        report = dict(self.state.gens[g].reports.get(rank, {"times": {}, "commits": []}))
        times = dict(report.get("times", {}))
        for mark in fields.pop("marks", ()):
            times[mark] = self.now
        report.update(fields, times=times)
        return self.feed(RankReport, g, rank, report)

    def marks(self, g: int, *names, ranks=None) -> list:
        out = []
        for r in ranks if ranks is not None else range(self.world(g)):
            out += self.report(g, r, marks=names)
        return out

    def save(self, g: int, step: int, version: str, nbytes: int = 1000) -> list:
        """Every rank of ``g`` saved step ``step``; rank 0 committed ``version``."""
        out = []
        for r in reversed(range(self.world(g))):  # rank 0 last: the save is complete with it
            extra = {"saved": {"version": version, "step": step, "bytes": nbytes}} if r == 0 else {}
            out += self.report(g, r, marks=("save_start", "save_end"), **extra)
        return out

    def exit(self, g: int, ranks=None, code: int = 0) -> list:
        out = []
        for r in ranks if ranks is not None else range(self.world(g)):
            out += self.feed(WorkerExited, g, r, code)
        return out

    def dump(self, g: int, ranks, step: int) -> list:
        """``ranks`` dumped step ``step`` (each with its own RNG state) and exited 75."""
        out = []
        for r in ranks:
            state = {"step": step, "rng": {"ranks": {str(r): [r]}}, "data": {"consumed": 8 * step}}
            out += self.report(g, r, marks=("dump_start", "dump_end"),
                               dump={"version": f"rescue-g{g:03d}", "step": step, "bytes": 10, "state": state})
        for r in ranks:
            out += self.feed(WorkerExited, g, r, 75)
        return out

    def ptc(self, g: int, layout=None):
        return model_ptc("gpt-tiny", layout or self.state.gens[g].alloc.layout)

    def ready(self, g: int) -> list:
        """``g``'s workers described the live job (rank 0 reports its PTC) and are ready."""
        return self.feed(Announced, g, self.ptc(g), ready=True) + self.marks(g, "ready")

    def announce(self, g: int) -> list:
        return self.feed(Announced, g, self.ptc(g)) + self.marks(g, "announced", "waiting")

    def transformed(self, action, version: str) -> list:
        return self.feed(TransformDone, action.token, version, 100, 50, (self.now, self.now), (self.now, self.now))
