"""A training script of one's own for ``scalai run --module kill_mid_step``: it runs another
training module as ``__main__`` (``SCALAI_TEST_TARGET``; default the reference trainer,
``scalai.examples.gpt``) with the same arguments, with faults injected (``tests/faults.py``):

- ``SCALAI_TEST_KILL``: comma-separated ``GEN:RANK:NTH:PHASE``: in generation ``GEN``, rank
  ``RANK`` kills itself (``SIGKILL``) during the ``NTH`` step that generation runs (1 is its
  first), in the middle of the ``forward`` or ``backward`` pass. Its peers then find a
  collective failing wherever they are in that step.
- ``SCALAI_TEST_READ_FAULT``: comma-separated ``JOB:GEN:RANK:NTH:KIND``: in job ``JOB``
  (``SCALAI_JOB``: the unchanged run of ``--compare`` is another job), generation ``GEN``,
  rank ``RANK`` silently reads the wrong rows in its ``NTH`` step (``twice``, ``skip``).
"""

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: faults


def _arm() -> None:
    from faults import faulty_reads, kill_mid_step, step_counter

    here = [os.environ.get("SCALAI_GENERATION"), os.environ.get("RANK")]
    kills = [item.split(":") for item in os.environ.get("SCALAI_TEST_KILL", "").split(",") if item]
    reads = [item.split(":") for item in os.environ.get("SCALAI_TEST_READ_FAULT", "").split(",") if item]
    phases = {int(nth): phase for gen, rank, nth, phase in kills if [gen, rank] == here}
    wrong = {int(nth): kind for job, gen, rank, nth, kind in reads
             if [job, gen, rank] == [os.environ.get("SCALAI_JOB"), *here]}
    if phases or wrong:
        state = step_counter()
        kill_mid_step(phases, state)
        faulty_reads(wrong, state)


if __name__ == "__main__":
    _arm()
    runpy.run_module(os.environ.get("SCALAI_TEST_TARGET", "scalai.examples.gpt"), run_name="__main__",
                     alter_sys=True)
