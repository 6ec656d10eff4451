"""The downtime benchmark's report: tables, what each side does, notes, a plot.

``results[(case, scenario_key)][side_name]`` is the list of that side's
:class:`~.harness.Outcome` over the rounds; every figure printed is a median over them.
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

from .harness import Case, Outcome, Scenario

__all__ = ["median", "summary_rows", "phase_order", "phase_rows", "case_notes", "plot"]

Results = dict  # {(Case, str): {side: [Outcome, ...]}}


def median(outcomes: Sequence[Outcome], key: Callable[[Outcome], float | None]) -> float | None:
    values = [v for v in map(key, outcomes) if v is not None]
    return statistics.median(values) if values else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _ratio(ours: float, theirs: float) -> str:
    """``2.13x shorter`` (scalai's downtime shorter) or ``1.20x longer``."""
    return f"{theirs / ours:.2f}x shorter" if ours <= theirs else f"{ours / theirs:.2f}x longer"


def summary_rows(cases: Sequence[Case], scenarios: Sequence[Scenario], results: Results, ours: str,
                 theirs: str) -> list[list[str]]:
    """The README's table: one row per case, one cell per scenario, ``scalai s vs baseline s:
    ratio`` (medians over the rounds)."""
    rows = []
    for case in cases:
        row = [case.describe()]
        for s in scenarios:
            a = median(results[(case, s.key)][ours], lambda o: o.downtime)
            b = median(results[(case, s.key)][theirs], lambda o: o.downtime)
            row.append(f"{a:.1f} s vs {b:.1f} s: {_ratio(a, b)}")
        rows.append(row)
    return rows


def phase_order(known: Sequence[Sequence[str]], results: Results) -> list[str]:
    """Every phase measured, the sides' own orders first (``known``), others after."""
    order: list[str] = []
    for phases in known:
        order += [p for p in phases if p not in order]
    measured = {p for runs in results.values() for outcomes in runs.values() for o in outcomes for p in o.phases}
    return [p for p in order if p in measured] + sorted(measured - set(order))


def _exposed(o: Outcome) -> float | None:
    """Seconds of scalai's transform outside its relaunch span (what it adds to the critical path)."""
    p, s = o.phases, o.starts
    if "transform" not in p or "relaunch" not in p:
        return None
    t0, t1 = s["transform"], s["transform"] + p["transform"]
    r0, r1 = s["relaunch"], s["relaunch"] + p["relaunch"]
    return p["transform"] - max(0.0, min(t1, r1) - max(t0, r0))


def phase_rows(cases: Sequence[Case], scenario: Scenario, results: Results, sides: Sequence[str],
               phases: Sequence[str]) -> tuple[list[str], list[list[str]], list[int]]:
    """The phases of one scenario: (headers, rows, section starts), one row per case and side."""
    headers = ["case", "system", "downtime", "min–max", *(p.replace("_", " ") for p in phases),
               "exposed", "share", "ratio"]
    rows, sections = [], []
    for case in cases:
        runs = results[(case, scenario.key)]
        base = median(runs[sides[-1]], lambda o: o.downtime)
        sections.append(len(rows))
        for i, side in enumerate(sides):
            outs = runs[side]
            down = [o.downtime for o in outs]
            mid = median(outs, lambda o: o.downtime)
            row = [(case.old + " ->") if i == 0 else case.new, side, f"{mid:.2f}", f"{min(down):.2f}–{max(down):.2f}",
                   *(_fmt(median(outs, lambda o, p=p: o.phases.get(p))) for p in phases)]
            share = median(outs, lambda o: o.phases["transform"] / o.downtime if "transform" in o.phases else None)
            row += [_fmt(median(outs, _exposed)), "" if share is None else f"{100 * share:.0f}%",
                    "" if side == sides[-1] else f"{base / mid:.2f}x"]
            rows.append(row)
    return headers, rows, sections


#: What the marks of :attr:`Outcome.marks` stand for, in the notes.
_MARKS = {"launched": "new torchrun launched", "start": "new workers started", "joined": "joined their group",
          "announced": "announced the new layout",
          "waiting": "waiting for the devices", "devices": "got them", "model": "model built",
          "built": "built (with the optimizer state)",
          "freed": "old workers gone", "old_exit": "old torchrun exited"}


def case_notes(case: Case, scenario: Scenario, runs: dict[str, list[Outcome]]) -> list[str]:
    """Bytes, periodic saves, when the new processes got going, anything else measured."""
    def mib(outs: list[Outcome], key: str) -> str:
        value = median(outs, lambda o: o.counted.get(key))
        return "?" if value is None else f"{value / 2**20:.0f} MiB"

    lines = [f"{case.label} ({case.describe()}), {scenario.title}:"]
    for side, outs in runs.items():
        counted = ", ".join(f"{k} {mib(outs, k)}" for k in outs[0].counted)
        blocked = median(outs, lambda o: sum(p["blocked"] or 0.0 for p in o.periodic) / len(o.periodic)
                         if o.periodic else None)
        steps = sorted({p["step"] for o in outs for p in o.periodic})
        periodic = (f"periodic saves at steps {', '.join(map(str, steps))}, the step waited {blocked:.2f} s each"
                    if steps else "periodic saves not recorded (the killed job's marks died with it)"
                    if scenario.trigger == "kill" else "no periodic save before the change")
        marks = ", ".join(f"{_MARKS.get(k, k)} {median(outs, lambda o, k=k: o.marks.get(k)):+.2f}"
                          for k in outs[0].marks if median(outs, lambda o, k=k: o.marks.get(k)) is not None)
        stops = sorted({o.stop_step for o in outs})
        lost = sorted({o.steps_lost for o in outs})
        lines.append(f"  {side}: {counted}; {periodic}; "
                     + (f"continued after step {'/'.join(map(str, stops))}, steps lost {'/'.join(map(str, lost))}"
                        if scenario.trigger == "kill" else f"stopped after step {'/'.join(map(str, stops))}"))
        lines.append(f"    s after the request: {marks}")
        for note in sorted({n for o in outs for n in o.notes}):
            lines.append(f"    {note}")
    return lines


_COLORS = {"stop": "#8c8c8c", "save": "#4c72b0", "allocate": "#937860", "announce": "#da8bc3", "plan": "#c9b037",
           "transform": "#dd8452", "relaunch": "#55a868", "load": "#8172b3", "first_step": "#64b5cd"}
#: scalai's phases that the runner times while its new workers start (drawn above relaunch).
_BESIDE_RELAUNCH = ("allocate", "announce", "plan", "transform")


def plot(path: str, cases: Sequence[Case], scenarios: Sequence[Scenario], results: Results,
         sides: Sequence[str], phases: Sequence[str]) -> None:
    """One panel per scenario; per case and side a bar of phases (medians) at their median
    starts; scalai's relaunch in the lower half of its row, the phases the runner times
    meanwhile (plan, transform, ...) above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = iter(("#8c613c", "#dc7ec0", "#797979", "#d5bb67"))
    colors = {p: _COLORS.get(p) or next(extra, "#cccccc") for p in phases}
    height = 1.0 + (1.3 + 0.9 * len(sides)) * len(cases) * len(scenarios)
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(11, height), squeeze=False)
    for ax, scenario in zip(axes[:, 0], scenarios):
        ticks, y, longest = [], 0.0, 0.0
        for case in reversed(cases):
            for side in reversed(sides):
                outs = results[(case, scenario.key)][side]
                for p in phases:
                    width = median(outs, lambda o, p=p: o.phases.get(p))
                    start = median(outs, lambda o, p=p: o.starts.get(p))
                    if width is None or start is None:
                        continue
                    beside = any(q in outs[0].phases for q in _BESIDE_RELAUNCH)
                    low, high = (y - 0.35, 0.35) if p == "relaunch" and beside else \
                        (y, 0.35) if p in _BESIDE_RELAUNCH else (y - 0.35, 0.7)
                    ax.broken_barh([(start, width)], (low, high), color=colors[p], label=p.replace("_", " "))
                down = median(outs, lambda o: o.downtime)
                longest = max(longest, down)
                ax.text(down, y, f" {down:.1f} s", va="center", fontsize=8)
                ticks.append((y, side))
                y += 1.0
            ax.text(0, y - 0.4, case.label, fontsize=8, va="center")
            y += 0.6
        ax.set_yticks([t for t, _ in ticks], [name for _, name in ticks], fontsize=8)
        ax.set_xlim(0, longest * 1.15)
        ax.set_ylim(-0.7, y - 0.3)
        ax.set_title(f"{scenario.title}: downtime by phase (medians)", loc="left", fontsize=10)
    handles, names = axes[0, 0].get_legend_handles_labels()
    seen = {}
    for h, n in zip(handles, names):
        seen.setdefault(n, h)
    order = [p.replace("_", " ") for p in phases if p.replace("_", " ") in seen]
    axes[0, 0].legend([seen[n] for n in order], order, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    axes[-1, 0].set_xlabel("seconds after the request")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
