"""The record of a run's reconfigurations, and the plots people look at.

A :class:`Reconfiguration` is one change of allocation broken into phases (seconds):
``stop`` (workers agree to stop), ``save`` (shards into the hosts' stores; after a failure:
the survivors' dump), ``allocate`` (the runner picks the new layout and hosts and starts
their agents), ``announce`` (waiting for the new workers to describe the job under the new
layout: their start-up, when the run does not know that PTC yet), ``plan`` (the
transformation's plan), ``transform`` (bytes moved between stores, the new version
committed), ``relaunch`` (old workers gone, new workers started and ready; it overlaps
allocate to transform), ``load`` (workers read their shards) and ``first_step`` (the first
step in the new layout); :func:`~.events.reconfiguration_phases` gives the two timestamps
of each. ``starts`` gives each phase's start, in seconds after the request; ``downtime``
is measured from the request to the end of the first step in the new layout (phases may
overlap, so it is not their sum). ``timeline.json`` is a list of them;
:func:`format_table` prints them, :func:`plot_timeline` and :func:`plot_loss` draw PNGs
with matplotlib (imported only when plotting).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

__all__ = ["PHASES", "Reconfiguration", "write_timeline", "read_timeline", "plot_timeline",
           "plot_loss", "read_metrics", "format_table"]

PHASES = ("stop", "save", "allocate", "announce", "plan", "transform", "relaunch", "load", "first_step")
_COLORS = dict(zip(PHASES, ("#8c8c8c", "#4c72b0", "#937860", "#da8bc3", "#c9b037", "#dd8452", "#55a868",
                            "#8172b3", "#64b5cd")))


@dataclass
class Reconfiguration:
    """One change: from/to layouts, why, how long each phase took, bytes moved, steps lost.

    Attributes:
        at_step: the last step done before the change (the new layout runs ``at_step + 1``).
        recovered_from: ``""`` (a planned change), ``"replicas"`` (a failure, the lost
            ranks' bytes read from surviving data-parallel replicas) or ``"checkpoint"`` (a
            failure, restarted from the last committed version: ``source`` says which).
        bytes_moved: bytes the transformation copied into the new layout's shards.
        cross_host_bytes: of those, bytes that crossed from one host to another.
        bytes_linked: bytes of new shards that are an old shard unchanged on the same host:
            the store linked its file instead of copying (not in ``bytes_moved``).
        saved_bytes: bytes the workers wrote into their stores when they stopped.
    """

    at_step: int
    from_layout: str
    to_layout: str
    reason: str
    phases: dict[str, float] = field(default_factory=dict)
    bytes_moved: int = 0
    cross_host_bytes: int = 0
    steps_lost: int = 0
    recovered_from: str = ""
    starts: dict[str, float] = field(default_factory=dict)
    measured_downtime: float | None = None
    from_hosts: list[str] = field(default_factory=list)
    to_hosts: list[str] = field(default_factory=list)
    saved_bytes: int = 0
    source: str = ""
    last_step: int | None = None  # the last step done before the change (> at_step if steps were lost)
    bytes_linked: int = 0

    @property
    def downtime(self) -> float:
        """Seconds from the request to the end of the first step in the new layout."""
        if self.measured_downtime is not None:
            return self.measured_downtime
        return sum(self.phases.values())

    def to_json(self) -> dict:
        out = asdict(self)
        out["downtime"] = self.downtime
        return out


def write_timeline(path: str | os.PathLike, changes: Sequence[Reconfiguration]) -> None:
    """Write ``timeline.json`` atomically."""
    from ..checkpoint.manifest import atomic_write

    atomic_write(os.fspath(path), json.dumps([c.to_json() for c in changes], indent=2).encode())


def read_timeline(path: str | os.PathLike) -> list[Reconfiguration]:
    with open(path) as f:
        raw = json.load(f)
    fields = set(Reconfiguration.__dataclass_fields__)
    return [Reconfiguration(**{k: v for k, v in r.items() if k in fields}) for r in raw]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` file (a torn last line is ignored)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_table(changes: Sequence[Reconfiguration]) -> str:
    """The timeline as a fixed-width text table, one row per reconfiguration (pure)."""
    head = ["step", "change", "from -> to", *PHASES, "downtime", "MiB moved", "MiB x-host", "MiB linked", "lost"]
    rows = []
    for c in changes:
        what = c.reason + (f" [{c.recovered_from}]" if c.recovered_from else "")
        rows.append([str(c.at_step), what, f"{c.from_layout} -> {c.to_layout}",
                     *(f"{c.phases[p]:.2f}" if p in c.phases else "-" for p in PHASES),
                     f"{c.downtime:.2f}", _mib(c.bytes_moved), _mib(c.cross_host_bytes), _mib(c.bytes_linked),
                     str(c.steps_lost)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {1, 2}

    def line(r: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    out = [line(head), "  ".join("-" * w for w in widths), *map(line, rows)]
    if changes:
        out.append(f"(seconds; phases overlap: relaunch runs beside allocate, announce (waiting for the new "
                   f"workers' PTC), plan and transform; downtime = request to the end of the first step in "
                   f"the new layout; total {sum(c.downtime for c in changes):.1f} s over {len(changes)} changes)")
    return "\n".join(out)


def plot_timeline(changes: Sequence[Reconfiguration], path: str | os.PathLike, title: str = "") -> None:
    """A Gantt row per reconfiguration: each phase from its start, relaunch on its own lane (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.plot import save_figure  # with matplotlib: only when drawing

    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.75 * max(1, len(changes))))
    labels, seen = [], set()
    for i, c in enumerate(changes):
        cursor = 0.0
        for phase in PHASES:
            width = c.phases.get(phase, 0.0)
            if width <= 0:
                continue
            start = c.starts.get(phase, cursor)
            lane = 0.22 if phase == "relaunch" else -0.12
            height = 0.22 if phase == "relaunch" else 0.42
            ax.barh(i + lane, width, left=start, height=height, color=_COLORS[phase], edgecolor="white")
            seen.add(phase)
            cursor = max(cursor, start + width) if phase != "relaunch" else cursor
        end = max([c.downtime] + [c.starts.get(p, 0) + c.phases.get(p, 0) for p in c.phases])
        note = f" {c.downtime:.1f} s, {c.bytes_moved / 2**20:.1f} MiB"
        if c.bytes_linked:
            note += f" (+{c.bytes_linked / 2**20:.1f} linked)"
        if c.recovered_from:
            note += f", from {c.recovered_from}"
        if c.steps_lost:
            note += f", {c.steps_lost} steps lost"
        ax.text(end, i, note, va="center", fontsize=8)
        labels.append(f"step {c.at_step}: {c.reason}\n{c.from_layout} -> {c.to_layout}")
    ax.set_yticks(range(len(changes)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds after the request (to the end of the first step in the new layout)")
    ax.set_title(title or "reconfigurations", pad=22)
    if changes:
        from matplotlib.patches import Patch

        handles = [Patch(color=_COLORS[p], label=p) for p in PHASES if p in seen]
        ax.legend(handles=handles, ncol=len(PHASES), fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0),
                  frameon=False)
        ax.set_xlim(0, max(c.downtime for c in changes) * 1.45 or 1)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_loss(runs: dict[str, Sequence[dict]], path: str | os.PathLike,
              changes: Sequence[Reconfiguration] = (), title: str = "", reference: str | None = None) -> None:
    """Loss against step for each named run (metrics rows), reconfigurations marked (PNG).

    Rows marked ``lost`` (steps that ran again after a restart from an older version) are
    drawn as grey crosses. With ``reference`` (the name of an unchanged run among ``runs``),
    a second panel shows every other run's relative difference to it, with the 1e-4 line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..training.plot import save_figure  # with matplotlib: only when drawing

    panels = 2 if reference else 1
    fig, axes = plt.subplots(panels, 1, figsize=(11, 5 + 2.2 * (panels - 1)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3][:panels]})
    ax = axes[0][0]
    styles = ["-", "--", ":", "-."]
    for i, (name, rows) in enumerate(runs.items()):
        kept = sorted((r for r in rows if not r.get("lost")), key=lambda r: r["step"])
        lost = [r for r in rows if r.get("lost")]
        wide = name == reference
        ax.plot([r["step"] for r in kept], [r["loss"] for r in kept], styles[i % len(styles)], label=name,
                linewidth=4 if wide else 1.5, alpha=0.45 if wide else 1.0, color="0.55" if wide else None)
        if lost:
            ax.plot([r["step"] for r in lost], [r["loss"] for r in lost], "x", color="0.4", ms=5,
                    label=f"{name}: steps lost to a failure (run again)")
    ymin, ymax = ax.get_ylim()
    for c in changes:
        x = (c.last_step if c.last_step is not None else c.at_step) + 0.5
        for a in (row[0] for row in axes):
            a.axvline(x, color="#c44e52" if c.recovered_from else "#999999", linewidth=0.8, linestyle="--")
        lost = f" ({c.steps_lost} steps lost)" if c.steps_lost else ""
        target = "" if c.to_layout in c.reason else f"\n -> {c.to_layout}"
        ax.text(x, ymax, f" {c.reason}{lost}{target}", fontsize=6.5, va="top", rotation=90, color="0.25",
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
    from matplotlib.ticker import MaxNLocator

    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss")
    ax.set_title(title or "loss")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    if reference:
        ref = {r["step"]: r["loss"] for r in runs[reference] if not r.get("lost")}
        low = axes[1][0]
        worst = 0.0
        for name, rows in runs.items():
            if name == reference:
                continue
            diff = [(r["step"], abs(r["loss"] - ref[r["step"]]) / abs(ref[r["step"]]))
                    for r in rows if not r.get("lost") and r["step"] in ref]
            worst = max([worst] + [d for _, d in diff])
            low.semilogy([s for s, _ in diff], [max(d, 1e-9) for _, d in diff], ".", label=f"{name} vs {reference}")
        low.axhline(1e-4, color="0.3", ls=":", lw=1, label="1e-4 (tolerance)")
        low.set_ylim(5e-10, max(3e-4, worst * 3))
        low.set_ylabel("relative difference\n(exact 0 drawn at 1e-9)", fontsize=8)
        low.legend(fontsize=7, loc="upper left")
        low.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
