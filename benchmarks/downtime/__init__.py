"""The downtime benchmark's parts (``benchmarks/reconfigure.py`` is its command line).

- :mod:`.harness`: what a case (a change of layout), a scenario (what triggers the change,
  when the new processes may start) and one side's measured run are; the plumbing both
  sides' drivers share (launching, polling, the mid-step request, the start-ahead rule);
- :mod:`.scalai_side`: ``scalai run`` (one function per trigger);
- :mod:`.dcp_side` and :mod:`.dcp_worker`: the PyTorch recipe (DCP save, a new torchrun,
  DCP load with resharding), its driver and its workers;
- :mod:`.report`: the tables (the README's form and the phases per side), each side's
  tricks, the notes and the plot;
- :mod:`.cluster`: simulated machines for ``--machines`` (the tests' ``netns_machines``
  plus a storage machine with an S3 server), fresh for every measured run.

A side is a module with ``NAME``, ``phases()`` (its phases in order), ``run(settings, case,
scenario, work)`` returning a :class:`~.harness.Outcome`, and ``tricks(settings, scenario)``
(what it does, for the report); ``reconfigure.py`` lists the sides in ``SIDES``. A trigger
(``schedule``, ``request``, ``kill``) is a :class:`~.harness.Scenario` and one function per
side, dispatched from the side's ``run``; ``Settings.machines`` moves both sides onto
simulated machines.
"""
