"""``python -m scalai.store ARGS`` = ``scalai store ARGS`` (e.g. to start a store in a
network namespace with the current interpreter)."""

import sys

from ..cli.main import main

sys.exit(main(["store", *sys.argv[1:]]))
