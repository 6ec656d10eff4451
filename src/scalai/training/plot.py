"""Loss curves from ``metrics.jsonl`` files, written as a PNG (matplotlib, a runtime dependency).

Each line of a metrics file is one step: ``{"step", "loss", "layout", ...}``. Runs that
stop and resume append to the same file; when a step appears twice (a run resumed from
an earlier checkpoint), the later line wins. The plot colours the curve by layout and
marks every change of layout; with a reference run (an unchanged job) it overlays that
curve and shows the relative difference per step in a second panel.
"""

from __future__ import annotations

import os
from typing import Iterable

from ..bounded import loads, open_regular

__all__ = ["read_metrics", "relative_differences", "plot_losses", "save_figure"]


def read_metrics(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Step records of one or more metrics files, one per step (later lines win), by step.

    Raises:
        ValueError: a line is not a JSON object with integer ``step`` and numeric ``loss``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    by_step: dict[int, dict] = {}
    for path in paths:
        with os.fdopen(open_regular(path, "metrics file"), "rb") as f:  # a FIFO would hang
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:  # a diverged run logs NaN losses: Python's JSON dialect
                    record = loads(line, f"{path}:{number}", allow_nan=True)
                    step, loss = record["step"], record["loss"]
                    ok = isinstance(step, int) and isinstance(loss, (int, float))
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    raise ValueError(f"{path}:{number} is not a metrics line "
                                     f"({{\"step\": int, \"loss\": float, ...}})")
                by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def relative_differences(run: list[dict], reference: list[dict]) -> dict[int, float]:
    """``|loss - reference loss| / |reference loss|`` for every step both runs have."""
    ref = {r["step"]: r["loss"] for r in reference}
    return {r["step"]: abs(r["loss"] - ref[r["step"]]) / max(abs(ref[r["step"]]), 1e-30)
            for r in run if r["step"] in ref}


def plot_losses(records: list[dict], out: str | os.PathLike, reference: list[dict] | None = None,
                title: str | None = None) -> None:
    """Write a PNG of loss vs step, coloured by layout, changes marked; see the module doc."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib, which scalai depends on: reinstall scalai "
                         "(pip install -e .) or pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no steps to plot; the metrics file is empty")
    rows = 2 if reference else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 4.2 + 2.3 * (rows - 1)), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.4][:rows]}, squeeze=False)
    ax = axes[0][0]
    if reference:
        ax.plot([r["step"] for r in reference], [r["loss"] for r in reference], color="0.6", lw=4,
                alpha=0.5, label=f"unchanged run ({reference[0].get('layout', '?')})")
    segments: list[tuple[str, list[dict]]] = []
    for r in records:
        layout = r.get("layout", "?")
        if not segments or segments[-1][0] != layout:
            segments.append((layout, []))
        segments[-1][1].append(r)
    colors = plt.get_cmap("tab10")
    palette: dict[str, object] = {}
    previous_last = None
    for layout, seg in segments:
        color = palette.setdefault(layout, colors(len(palette) % 10))
        steps, losses = [r["step"] for r in seg], [r["loss"] for r in seg]
        if previous_last is not None:  # join the curve across the change
            steps, losses = [previous_last["step"]] + steps, [previous_last["loss"]] + losses
            for a in (row[0] for row in axes):
                a.axvline(seg[0]["step"] - 0.5, color="0.3", ls="--", lw=0.8)
            ax.annotate(f" {layout}\n from step {seg[0]['step']}", (seg[0]["step"] - 0.5, 0.03),
                        xycoords=("data", "axes fraction"), va="bottom", ha="left", fontsize=8,
                        color="0.25")
        label = layout if layout not in {s[0] for s in segments[: segments.index((layout, seg))]} else None
        ax.plot(steps, losses, color=color, lw=1.6, marker="o", ms=2.5, label=label)
        previous_last = seg[-1]
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title or "training loss across changes of parallel layout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if reference:
        diff = relative_differences(records, reference)
        low = axes[1][0]
        nonzero = {s: v for s, v in diff.items() if v > 0}
        floor = min(nonzero.values(), default=1e-8) / 10
        low.semilogy(list(nonzero), list(nonzero.values()), color="tab:red", marker=".", lw=0,
                     label="|loss - unchanged| / unchanged")
        zeros = [s for s, v in diff.items() if v == 0]
        if zeros:
            low.semilogy(zeros, [floor] * len(zeros), ls="", marker="o", mfc="none", color="tab:green",
                         ms=4, label="identical (0)")
        low.axhline(1e-4, color="0.3", ls=":", lw=1, label="1e-4")
        low.set_ylim(floor / 3, max(2e-4, max(nonzero.values(), default=0) * 3))
        low.set_ylabel("relative difference")
        low.legend(fontsize=7, loc="center left", ncol=3)
        low.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, out, dpi=120)


def save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """Save the matplotlib figure ``fig`` as the PNG ``path`` atomically and close it
    (:func:`~scalai.checkpoint.manifest.replacing`: a failed draw leaves the old PNG and no
    temporary file)."""
    import matplotlib.pyplot as plt

    from ..checkpoint.manifest import replacing

    try:
        with replacing(path, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
