"""``python -m scalai.examples.gpt --layout L --steps K ...``: one worker of the reference trainer.

Launch one process per rank with torchrun (``scalai train`` does it for you)::

    torchrun --standalone --nproc-per-node 4 -m scalai.examples.gpt --layout tp=2,pp=2,dp=1 --steps 20
"""

import sys

from .options import parse_args
from .train import main

if __name__ == "__main__":
    sys.exit(main(parse_args()))
