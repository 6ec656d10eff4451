"""Did an elastic run follow the unchanged run? Exactly-once data and loss, checked (pure).

The data half counts what the ranks *read*: each metrics row's ``samples`` are the ids of
the rows the data-parallel ranks fed their models in that step, gathered from every rank
(:func:`scalai.training.gather_fed`), not ids computed from the data position. Over the
steps the run kept (:func:`~.progress.effective_rows`), the check fails when

- a sample was read more than once,
- a step read other samples than the unchanged run read at that step (a sample skipped,
  added, or taken from another step), or none were reported,
- the ranks of one replica fed different rows (``fed_mismatch``),
- a step of ``1..steps`` is missing from the run or from the unchanged run.

The loss half compares every step's loss with the unchanged run's, relative, against
:data:`TOLERANCE`. Nothing passes on an empty comparison: every step of the run must have
been compared, or the check fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .progress import effective_rows, sample_counts

__all__ = ["TOLERANCE", "RunCheck", "check_run"]

TOLERANCE = 1e-4  # the training issue's: relative loss difference to the unchanged run


@dataclass(frozen=True)
class RunCheck:
    """What :func:`check_run` found (steps are 1-based step numbers).

    Attributes:
        steps: the steps the run should have kept (``1..steps``).
        kept: the steps it kept (rows not marked lost).
        samples: distinct sample ids the kept rows read.
        repeated: sample ids read more than once.
        differing: steps whose ids differ from the unchanged run's, or that reported none.
        mismatched: steps where the ranks of a replica fed different rows.
        missing_steps: steps of ``1..steps`` the run did not keep.
        not_compared: steps of ``1..steps`` without a loss on both sides.
        max_difference / at_step: the largest relative loss difference and its step.
        compared: steps whose losses were compared.
    """

    steps: int
    kept: int
    samples: int
    repeated: int
    differing: list[int] = field(default_factory=list)
    mismatched: list[int] = field(default_factory=list)
    missing_steps: list[int] = field(default_factory=list)
    not_compared: list[int] = field(default_factory=list)
    max_difference: float = 0.0
    at_step: int | None = None
    compared: int = 0

    @property
    def data_ok(self) -> bool:
        return (self.steps > 0 and self.kept == self.steps and not self.repeated and not self.differing
                and not self.mismatched and not self.missing_steps and not self.not_compared)

    @property
    def loss_ok(self) -> bool:
        return self.steps > 0 and self.compared == self.steps and not self.not_compared \
            and self.max_difference <= TOLERANCE

    @property
    def ok(self) -> bool:
        return self.data_ok and self.loss_ok

    def lines(self) -> list[str]:
        """Two lines, ``ok  `` or ``FAIL`` first: the data check and the loss check."""
        mark = {True: "ok  ", False: "FAIL"}
        problems = [f"{self.repeated} read more than once" if self.repeated else "",
                    f"steps reading other samples than the unchanged run: {_few(self.differing)}"
                    if self.differing else "",
                    f"steps where a replica's ranks fed different rows: {_few(self.mismatched)}"
                    if self.mismatched else "",
                    f"steps missing: {_few(self.missing_steps)}" if self.missing_steps else "",
                    f"steps not compared with the unchanged run: {_few(self.not_compared)}"
                    if self.not_compared else ""]
        data = f"{mark[self.data_ok]} data: {self.samples} samples over {self.kept} steps"
        if self.data_ok:
            data += ", each read exactly once (ids the data-parallel ranks fed their models)"
        else:
            data += " (ids the data-parallel ranks fed their models): " + "; ".join(p for p in problems if p)
        loss = (f"{mark[self.loss_ok]} loss: largest relative difference to the unchanged run "
                f"{self.max_difference:.1e}" + (f" (step {self.at_step})" if self.at_step else "")
                + f" over {self.compared} of {self.steps} steps; tolerance {TOLERANCE:g}")
        if self.not_compared:
            loss += f" - not compared: {_few(self.not_compared)}"
        return [data, loss]


def _few(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps[:10])) + (f" (+{len(steps) - 10} more)" if len(steps) > 10 else "")


def check_run(rows: Sequence[dict], reference: Sequence[dict], steps: int) -> RunCheck:
    """Check an elastic run's metrics rows against the unchanged run's (both as written in
    ``metrics.jsonl``: ``step``, ``loss``, ``samples``, optionally ``lost`` and
    ``fed_mismatch``) over steps ``1..steps``."""
    kept = effective_rows(rows)
    ref = {r["step"]: r for r in effective_rows(reference)}
    wanted = set(range(1, steps + 1))
    counts = sample_counts(rows)
    differing = sorted(r["step"] for r in kept if r["step"] in ref
                       and (not r["samples"] or r["samples"] != ref[r["step"]]["samples"]))
    mismatched = sorted(r["step"] for r in kept if r.get("fed_mismatch"))
    diffs = {r["step"]: abs(r["loss"] - ref[r["step"]]["loss"]) / abs(ref[r["step"]]["loss"])
             for r in kept if r["step"] in ref and r["step"] in wanted}
    worst = max(diffs, key=diffs.get) if diffs else None
    return RunCheck(steps=steps, kept=len([r for r in kept if r["step"] in wanted]), samples=len(counts),
                    repeated=sum(1 for c in counts.values() if c > 1), differing=differing,
                    mismatched=mismatched, missing_steps=sorted(wanted - {r["step"] for r in kept}),
                    not_compared=sorted(wanted - set(diffs)), max_difference=diffs[worst] if diffs else 0.0,
                    at_step=worst, compared=len(diffs))
