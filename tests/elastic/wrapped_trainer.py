"""A training script of the user's own for ``scalai run --module wrapped_trainer``: it takes
the reference trainer's arguments, leaves a mark of every rank it ran, and trains with the
reference trainer's loop (which follows the elastic worker protocol)."""

import os
import sys
from pathlib import Path

from scalai.examples.gpt.options import parse_args
from scalai.examples.gpt.train import main

if __name__ == "__main__":
    opts = parse_args()
    marks = Path(os.environ["SCALAI_RUN_DIR"]) / "wrapped"
    marks.mkdir(exist_ok=True)
    (marks / f"g{os.environ['SCALAI_GENERATION']}-rank{os.environ['RANK']}-{opts.config}").touch()
    code = main(opts)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
