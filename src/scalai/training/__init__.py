"""Training-side API: describe the live job, save it, load it into any layout, stop together.

::

    job = describe(stage_module, optimizer, "tp=2,pp=2,dp=1", num_layers=4,
                   scheduler=scheduler, data=data_state, seed=0)
    if resume:
        load(job, "ckpt")          # any saved layout; fills model and optimizer in place
    stop = StopFlag("STOP")
    while job.step < steps and not stop.should_stop():
        train_one_step(); job.step += 1; job.data = data_state_after_step
    save(job, "ckpt2")             # every rank writes its own shards; rank 0 commits
    save(job, "s3://bucket/run/step-100", background=True)   # returns once staged in memory
    close(job)                     # commits (or reports the failure of) a background save

All four are collective: every rank of the job calls them at the same point. Failures
raise :class:`CollectiveError` on every rank alike. :func:`gather_fed` (once per step)
brings every rank's fed sample ids to rank 0, for exactly-once checks on what was read.
"""

from .checkpoints import find_checkpoint, list_checkpoints, step_dir
from .collective import CollectiveError, RankFailure, agree
from .fed import FedSamples, gather_fed
from .job import ADAM_STATES, JobState, describe
from .load import FillError, LoadReport, load, plan_load
from .background import close
from .save import SaveReport, save
from .stop import StopFlag
from .storage import DirectoryWriter, ObjectWriter, StateWriter

__all__ = [
    "JobState", "describe", "save", "load", "StopFlag", "SaveReport", "LoadReport",
    "StateWriter", "DirectoryWriter", "ObjectWriter", "plan_load", "close",
    "CollectiveError", "RankFailure", "FillError", "agree", "ADAM_STATES",
    "step_dir", "find_checkpoint", "list_checkpoints", "FedSamples", "gather_fed",
]
