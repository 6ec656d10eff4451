"""What the workers run: a trainer plug-in (module + arguments + data + metrics contract).

``scalai run`` knows nothing of a model. It launches ``python -m MODULE`` on every device
of a generation with the worker protocol's environment (:mod:`.worker`) and expects:

- **arguments**: :meth:`Trainer.argv` for a generation's layout and last step; the script
  also finds them in its environment: ``SCALAI_LAYOUT`` (e.g. ``tp=2,pp=1,dp=2``),
  ``SCALAI_STEPS`` (the step this generation stops after; the job's total is the last
  generation's) and ``SCALAI_METRICS`` (a file on its own machine);
- **metrics**: rank 0 appends one JSON object per optimizer step to ``SCALAI_METRICS``
  (``step``, ``loss``, ``layout``, ``sample_ids``, ``time``); the machine's agent sends
  the rows to the coordinator;
- **data**: each machine makes its own copy (:meth:`Trainer.prepare_data`), checked
  against the coordinator's digest; nothing is read from the coordinator's disk.

Two kinds:

- :class:`ScriptTrainer`: a user's own script, ``scalai run --module M -- ARGS``: it gets
  ARGS unchanged (and the environment above); its model's constraints and cost come from
  the PTC it describes (see :meth:`ScriptTrainer.accepts`), no data is prepared for it.
- a plug-in module (``plugin``): ``scalai.examples.gpt.plugin`` for the reference trainer,
  which builds the reference trainer's arguments, the stdlib corpus on every machine, and
  its cost model. A plug-in module defines ``trainer(spec: dict) -> Trainer``.

A :class:`Trainer` travels to the agents as JSON (:meth:`Trainer.to_json`;
:func:`load_trainer` rebuilds it there).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..config import ParallelConfig

__all__ = ["Trainer", "ScriptTrainer", "load_trainer", "REFERENCE_MODULE", "REFERENCE_PLUGIN", "check_module"]

REFERENCE_MODULE = "scalai.examples.gpt"
REFERENCE_PLUGIN = "scalai.examples.gpt.plugin"


@dataclass(frozen=True)
class Trainer:
    """The base of every trainer (see the module docstring); subclasses override what differs."""

    module: str
    plugin: str | None = None

    def argv(self, layout: ParallelConfig, until: int, metrics: str, data: str | None) -> list[str]:
        """The workers' command-line arguments for one generation (after ``-m MODULE``)."""
        return []

    def env(self, layout: ParallelConfig, until: int, metrics: str) -> dict[str, str]:
        return {"SCALAI_LAYOUT": str(layout), "SCALAI_STEPS": str(until), "SCALAI_METRICS": metrics}

    def why_not(self, layout: ParallelConfig) -> str | None:
        """Why the trainer cannot run ``layout`` (None: it can)."""
        return None

    def accepts(self, layout: ParallelConfig) -> bool:
        return self.why_not(layout) is None

    def cost_shape(self):
        """The model as a :class:`~scalai.models.shapes.ModelShape` for the cost model of
        :mod:`.layouts`, or None (layouts are then ranked from the described PTC)."""
        return None

    def data_spec(self) -> dict | None:
        """What every machine must hold (sent at join), or None."""
        return None

    def prepare_data(self, root: str, spec: dict) -> tuple[str | None, str | None]:
        """Make this machine's copy of the data :meth:`data_spec` describes, under ``root``
        (on an agent): ``(path, digest)``."""
        return None, None

    def validate(self) -> None:
        """Check the trainer's options (on the coordinator; raises ValueError)."""

    def warm(self) -> None:
        """Imports a standby worker does before it is assigned (beyond ``MODULE`` itself)."""

    def to_json(self) -> dict:
        return {"module": self.module, "plugin": self.plugin}


@dataclass(frozen=True)
class ScriptTrainer(Trainer):
    """A user's own script: ``python -m MODULE ARGS``, configured by the environment."""

    args: tuple[str, ...] = field(default=())

    def argv(self, layout: ParallelConfig, until: int, metrics: str, data: str | None) -> list[str]:
        return list(self.args)

    def to_json(self) -> dict:
        return {"module": self.module, "plugin": None, "args": list(self.args)}


def load_trainer(spec: dict) -> Trainer:
    """Rebuild a trainer from :meth:`Trainer.to_json` (on an agent, or the coordinator).

    Raises:
        ValueError: the plug-in cannot be imported or refuses the spec.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("module"), str):
        raise ValueError("a trainer spec is a JSON object with a module")
    plugin = spec.get("plugin")
    if not plugin:
        return ScriptTrainer(spec["module"], None, tuple(str(a) for a in spec.get("args") or ()))
    try:
        made = importlib.import_module(plugin).trainer(spec)
    except ImportError as exc:
        raise ValueError(f"trainer plug-in {plugin} cannot be imported here ({exc}); install the same scalai "
                         f"on every machine") from None
    if not isinstance(made, Trainer):
        raise ValueError(f"{plugin}.trainer() returned {type(made).__name__}, not a scalai.elastic.trainer.Trainer")
    return made


def check_module(name: str) -> None:
    """The workers' module must exist here (every machine runs the same Python).

    Raises:
        ValueError: it does not.
    """
    import importlib.util
    import sys

    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ValueError(f"--module {name}: no such module in {sys.executable}; install it or set PYTHONPATH")

