"""Taking a worker out of a blocked collective: the runner's abort, carried out on a thread.

When a machine freezes (its processes stopped, its link cut) its peers do not see an
error: their collectives wait for it, in C++, with the GIL released, until the process
group's timeout. The runner notices the machine's silence within seconds and tells the
survivors to abort (an ``abort`` file in their generation's control directory, written by
their agent). :class:`AbortWatch` is a thread in every worker that waits for that file and
then runs the worker's dump-and-exit from the thread, while the main thread still waits
in its collective.

The dump must be of a whole step. The training loop therefore holds :meth:`AbortWatch.updating`
while it changes the job's state (the optimizer's update, the step counter, the data
position); the watch takes the same lock before it dumps, so it sees the state before or
after an update, never half of one. A script that never enters ``updating`` is not
dumped on an abort (the watch cannot know that its state is whole): it exits at once with
:data:`EXIT_ABORTED` and the runner recovers from the last committed version.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["AbortWatch", "abort_file", "EXIT_ABORTED"]

#: A worker's exit status after an abort it could not dump for (EX_SOFTWARE).
EXIT_ABORTED = 70


def abort_file(run_dir: str | os.PathLike, generation: int) -> Path:
    """Written by the agent when the runner aborts ``generation`` (see the module docstring)."""
    return Path(run_dir) / "control" / f"abort-g{generation:03d}"


class AbortWatch:
    """Waits for ``path`` on a daemon thread, then calls ``on_abort`` (which should not
    return: it dumps and leaves the process) under the update lock.

    Args:
        path: the abort file.
        on_abort: the dump and exit; called once, from the watch's thread.
        poll: seconds between looks at the file.
        exit: how to leave when the loop never took the update lock (tests replace it).
    """

    def __init__(self, path: str | os.PathLike, on_abort: Callable[[], None], poll: float = 0.05,
                 exit: Callable[[int], None] = os._exit):
        self.path, self.on_abort, self.poll, self._exit = Path(path), on_abort, poll, exit
        self._lock = threading.RLock()
        self._cooperates = False
        self._stop = threading.Event()
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="scalai-abort", daemon=True)

    def start(self) -> AbortWatch:
        self._thread.start()
        return self

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Hold while the job's state changes (an abort's dump waits for it)."""
        self._cooperates = True
        with self._lock:
            yield

    def stop(self) -> None:
        """The worker leaves on its own: stop watching."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.path.exists():
                self.fired.set()
                if not self._cooperates:
                    self._exit(EXIT_ABORTED)
                    return
                with self._lock:
                    if not self._stop.is_set():
                        self.on_abort()
                return
            time.sleep(self.poll)
