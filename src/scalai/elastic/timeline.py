"""The record of a run's reconfigurations, and the plots people look at.

A :class:`Reconfiguration` is one change of allocation broken into phases (seconds):
``stop`` (workers agree to stop), ``save`` (shards into the hosts' stores), ``plan``,
``transform`` (bytes moved between stores), ``relaunch`` (new workers up),
``load`` (workers read their shards) and ``first_step`` (the first step in the new
layout). ``timeline.json`` is a list of them; :func:`plot_timeline` and
:func:`plot_loss` draw PNGs with matplotlib (imported only when plotting).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

__all__ = ["PHASES", "Reconfiguration", "write_timeline", "read_timeline", "plot_timeline",
           "plot_loss", "read_metrics"]

PHASES = ("stop", "save", "plan", "transform", "relaunch", "load", "first_step")
_COLORS = dict(zip(PHASES, ("#8c8c8c", "#4c72b0", "#c9b037", "#dd8452", "#55a868", "#8172b3", "#64b5cd")))


@dataclass
class Reconfiguration:
    """One change: from/to layouts, why, how long each phase took, bytes moved, steps lost."""

    at_step: int
    from_layout: str
    to_layout: str
    reason: str
    phases: dict[str, float] = field(default_factory=dict)
    bytes_moved: int = 0
    cross_host_bytes: int = 0
    steps_lost: int = 0
    recovered_from: str = ""  # "", "replicas" or "checkpoint"

    @property
    def downtime(self) -> float:
        """Seconds from the stop request to the end of the first step in the new layout."""
        return sum(self.phases.values())

    def to_json(self) -> dict:
        out = asdict(self)
        out["downtime"] = self.downtime
        return out


def write_timeline(path: str | os.PathLike, changes: Sequence[Reconfiguration]) -> None:
    """Write ``timeline.json`` atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump([c.to_json() for c in changes], f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def plot_timeline(changes: Sequence[Reconfiguration], path: str | os.PathLike, title: str = "") -> None:
    """A horizontal bar per reconfiguration, split into its phases (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * max(1, len(changes))))
    labels = []
    for i, c in enumerate(changes):
        left = 0.0
        for phase in PHASES:
            width = c.phases.get(phase, 0.0)
            if width > 0:
                ax.barh(i, width, left=left, color=_COLORS[phase], edgecolor="white",
                        label=phase if phase not in ax.get_legend_handles_labels()[1] else None)
                left += width
        ax.text(left, i, f" {left:.1f} s, {c.bytes_moved / 2**20:.1f} MiB"
                         + (f", {c.steps_lost} steps lost" if c.steps_lost else ""), va="center", fontsize=8)
        labels.append(f"step {c.at_step}: {c.reason}\n{c.from_layout} -> {c.to_layout}")
    ax.set_yticks(range(len(changes)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (stop request to first step in the new layout)")
    ax.set_title(title or "reconfigurations", pad=22)
    if changes:
        ax.legend(ncol=len(PHASES), fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
        ax.set_xlim(0, max(c.downtime for c in changes) * 1.3 or 1)
    fig.tight_layout()
    _save(fig, path)


def plot_loss(runs: dict[str, Sequence[dict]], path: str | os.PathLike,
              changes: Sequence[Reconfiguration] = (), title: str = "") -> None:
    """Loss against step for each named run (metrics rows), reconfigurations marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    styles = ["-", "--", ":", "-."]
    for i, (name, rows) in enumerate(runs.items()):
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], styles[i % len(styles)], label=name, linewidth=1.5)
    ymax = ax.get_ylim()[1]
    for c in changes:
        ax.axvline(c.at_step, color="#999999", linewidth=0.8)
        ax.text(c.at_step, ymax, f" {c.reason}\n {c.to_layout}", fontsize=7, va="top", rotation=90)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "loss")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    os.replace(tmp, path)
