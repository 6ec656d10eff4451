"""``python -m scalai.cli ARGS``: the ``scalai`` command, without the console script."""

import sys

from .main import main

sys.exit(main())
