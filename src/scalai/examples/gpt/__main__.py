"""``python -m scalai.examples.gpt --layout L --steps K ...``: one worker of the reference trainer.

Launch one process per rank with torchrun (``scalai train`` does it for you)::

    torchrun --standalone --nproc-per-node 4 -m scalai.examples.gpt --layout tp=2,pp=2,dp=1 --steps 20
"""

import os
import sys

from .options import parse_args
from .train import main

if __name__ == "__main__":
    code = main(parse_args())
    # The process group is destroyed and every file is closed by now. Leave without the
    # interpreter's teardown: C++ destructors of gloo's threads run there and, now and
    # then under load, abort a finished worker ("terminate called without an active
    # exception"), turning a successful run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
