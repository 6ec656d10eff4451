"""A training script of the user's own for ``scalai run --module paced_trainer -- ARGS``: the
reference trainer's loop at a chosen pace (``--pace SECONDS`` after every step), so that a
test can act on a run between its steps. It takes its layout, last step and metrics file
from the worker protocol's environment (``SCALAI_LAYOUT``, ``SCALAI_STEPS``,
``SCALAI_METRICS``) and every other option from its own arguments."""

import argparse
import os
import sys
import time

from scalai.elastic.worker import ElasticWorker
from scalai.examples.gpt.options import parse_args
from scalai.examples.gpt.train import main

if __name__ == "__main__":
    own = argparse.ArgumentParser()
    own.add_argument("--pace", type=float, default=0.0)
    pace, rest = own.parse_known_args()
    opts = parse_args(["--layout", os.environ["SCALAI_LAYOUT"], "--steps", os.environ["SCALAI_STEPS"],
                       "--metrics", os.environ["SCALAI_METRICS"], "--log-every", "1000000", *rest])
    original = ElasticWorker.step_done

    def paced(self, job, last_step):
        original(self, job, last_step)
        time.sleep(pace.pace)

    ElasticWorker.step_done = paced
    code = main(opts)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
