"""The ``scalai`` command line."""
