"""An elastic worker's periodic commits (``scalai run --commit-every K``): in the background
(the default) or blocking (``--commit-mode blocking``, the old behaviour, kept measurable).

**Background.** At every K-th step every rank calls ``save(job, stores, background=True)``
(:mod:`scalai.training.background`): the call returns once the rank's shards are copied
into host memory and the ranks agreed on the non-tensor state, and a thread per rank uploads
the copy into its own host's store. Where the rank sees its store's upload directory (the
same machine, :mod:`scalai.store.local`) the staging copy is the store's own files: written
while the step waits, then sealed (CRC-32) and adopted by the thread, one copy in all.
After every later step, :meth:`PeriodicCommits.poll` asks every rank whether its upload ended (one small collective, only while a save is in
flight); once all did, rank 0 commits the version on every store, and only then is it
reported: ``commits`` in rank 0's report, which the coordinator turns into
``record_commit``. So the coordinator never records a version that a store does not hold
committed. At most one save is in flight: a K-th step that finds the previous one still
uploading waits for it (one staging copy of memory; no commit is skipped).

**A failed commit** (an upload or the commit raised on some rank) is removed from the
stores by rank 0, appended to rank 0's report (``commit_errors``, printed by the
coordinator) and logged; training goes on, and the last commit stays where a failure
without replicas restarts. If the next commit fails too, the error is raised as a blocking
commit's is: the loop's ``except`` dumps and the generation ends, so stores that keep
refusing are not hidden behind a training run that can no longer be recovered.

**The ends of a generation.**

- The stop save (a planned change, the end of the run) first waits for the save in flight
  and commits it (reported before the stop save, so the coordinator records it while the
  generation is current and drops it once the stop save supersedes it); a failure there is
  reported and the stop save goes on. When the save in flight is of the very step the loop
  stopped after, it *is* the stop save: nothing is written twice. Only then does the
  coordinator fence the old generation off.
- A dump (a peer died, or the runner aborted a frozen generation) never waits for the save
  in flight: its uploads go to this host's store only, and the dump writes its own version.
  The process then exits, rank 0's lease on the periodic version stops, and each store
  deletes the uncommitted version when the lease runs out (``SCALAI_STORE_LEASE``); it was
  never reported, so the coordinator recovers from the dumps or from the last commit it
  recorded.
- A worker killed mid-upload: the same (no report, the lease runs out).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

__all__ = ["PeriodicCommits", "COMMIT_MODES", "REPORTED_COMMITS"]

log = logging.getLogger("scalai.elastic")

#: Commits rank 0's report lists (the newest; ``commit_count`` counts them all): the
#: coordinator records each as the report arrives, at least every heartbeat, so a run
#: that commits thousands of times does not send ever larger reports.
REPORTED_COMMITS = 64

#: How ``--commit-every`` commits: in the background (default) or blocking the step.
COMMIT_MODES = ("background", "blocking")


class PeriodicCommits:
    """One worker's periodic commits into the stores (see the module docstring).

    Args:
        every: commit every ``every`` steps (0: never).
        mode: one of :data:`COMMIT_MODES`.
        writer: a callable returning the stores' ``StateWriter`` (made once, lazily).
        report: a callable ``report(**fields)`` that updates this rank's report (rank 0's
            ``commits`` and ``commit_errors`` lists are kept here and written whole).
        rank: this worker's rank (only rank 0 reports commits).
    """

    def __init__(self, every: int, mode: str, writer: Callable[[], Any], report: Callable[..., None], rank: int):
        if mode not in COMMIT_MODES:
            raise ValueError(f"SCALAI_COMMIT_MODE={mode!r}; use one of {', '.join(COMMIT_MODES)}")
        self.every, self.mode, self.rank = every, mode, rank
        self._writer, self._report = writer, report
        self.commits: list[dict] = []  # the newest REPORTED_COMMITS
        self.count = 0
        self.errors: list[dict] = []
        self.failed_in_a_row = 0
        self.pending: int | None = None  # the step of the save in flight
        self._blocked = 0.0  # seconds the loop spent in the save in flight's calls so far

    def due(self, step: int, last_step: int) -> bool:
        """Whether the state after ``step`` is committed (not the generation's last step:
        the stop save commits that one)."""
        return bool(self.every) and step % self.every == 0 and step < last_step

    def after_step(self, job: Any, last_step: int) -> None:
        """After every optimizer step (collective): commit the save in flight if its writes
        ended, and start (or, blocking, make) the next commit when it is due.

        Raises:
            CollectiveError: a commit failed, and so did the one before (background), or
                any commit failed (blocking).
        """
        from ..training import save

        if self.mode == "blocking":
            if self.due(job.step, last_step):
                t0 = time.time()
                writer = self._writer()
                save(job, writer)
                self._record(writer.last_version, job.step, t0, blocked=time.time() - t0)
            return
        from ..training.background import in_flight

        t0 = time.time()
        self.settle(job, wait=False, strict=True)
        if in_flight(job):  # still writing: this poll counts against it
            self._blocked += time.time() - t0
        if self.due(job.step, last_step):
            self.settle(job, wait=True, strict=True)  # at most one in flight: wait for the previous
            t1 = time.time()
            save(job, self._writer(), background=True)
            self.pending = job.step
            self._blocked = time.time() - t1  # the staging copy

    def settle(self, job: Any, wait: bool, strict: bool = False):
        """Commit the save in flight: at once if every rank's write ended, or after waiting
        for them (``wait``). Collective. Returns what was committed (or ``None``).

        A failure is reported; it is raised only when ``strict`` and the previous commit
        failed too."""
        from ..training import CollectiveError
        from ..training.background import finish, in_flight

        if not in_flight(job):
            return None
        t0 = time.time()
        try:
            done = finish(job, wait=wait)
        except CollectiveError as exc:
            self.pending, self._blocked = None, 0.0
            self.failed_in_a_row += 1
            self.errors.append({"time": time.time(), "error": str(exc)[:2000]})
            log.warning("rank %d: a background commit failed (%d in a row): %s", self.rank, self.failed_in_a_row, exc)
            if self.rank == 0:
                self._report(commit_errors=list(self.errors))
            if strict and self.failed_in_a_row > 1:
                raise
            return None
        if done is not None:
            self.pending = None
            version = done.token.split("@")[0]
            self._record(version, done.step, done.started, blocked=self._blocked + time.time() - t0)
            self._blocked = 0.0
        return done

    def _record(self, version: str | None, step: int, started: float, blocked: float) -> None:
        self.failed_in_a_row = 0
        if self.rank == 0:
            now = time.time()
            self.commits.append({"version": version, "step": step, "time": now, "seconds": now - started,
                                 "blocked": blocked, "mode": self.mode})
            self.count += 1
            del self.commits[:-REPORTED_COMMITS]  # a long run's report stays small
            self._report(commits=list(self.commits), commit_count=self.count)
