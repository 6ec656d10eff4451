"""The reference trainer as a plug-in of ``scalai run`` (see :mod:`scalai.elastic.trainer`).

It builds the trainer's command line for a generation (:mod:`.options`), tells the runner
which layouts the model allows and what they cost (the cost model of
:mod:`scalai.elastic.layouts` on the preset's shape), and makes every machine's copy of
the data: the stdlib corpus index, built by each agent from its own Python's standard
library (or the index a user gave with ``--data``, present on every machine), checked
against the coordinator's digest. An agent uses only :meth:`ReferenceTrainer.prepare_data`
and :func:`warm`; neither it nor this module's import loads torch (the rest does, on the
coordinator).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ...elastic.trainer import REFERENCE_MODULE, REFERENCE_PLUGIN, Trainer

__all__ = ["ReferenceTrainer", "trainer", "index_digest", "warm", "trainer_shape"]


def index_digest(index) -> str:
    """A digest of a sample index's content (pure): its geometry and every source's size and
    fingerprint, not where the files are, so machines with the same data agree."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{index.seq_len}|{index.dtype}|{index.packing}|{index.num_samples}".encode())
    for s in index.sources:
        h.update(f"|{s.kind}|{s.dtype}|{s.size}|{s.fingerprint}".encode())
    return h.hexdigest()


def trainer_shape(name: str):
    """The reference trainer's model (``gpt-tiny``...) as a
    :class:`~scalai.models.shapes.ModelShape` for the cost model of :mod:`scalai.elastic.layouts`."""
    from ...models.shapes import ModelShape
    from .model import preset

    cfg = preset(name)
    return ModelShape("gpt", cfg.layers, cfg.dim, cfg.heads, cfg.heads, cfg.hidden, cfg.vocab, cfg.seq_len,
                      False, vocab_multiple=1, dtype="float32", name=name)


def warm() -> None:
    """What a standby worker imports ahead: the trainer and every parallelism module."""
    from ...config import ParallelConfig
    from . import train  # noqa: F401
    from .parallel import preload

    preload(ParallelConfig(tp=2, pp=2, dp=2))


@dataclass(frozen=True)
class ReferenceTrainer(Trainer):
    """``python -m scalai.examples.gpt`` with :class:`~.options.TrainOptions` (``options``:
    every option but the layout, the step count, the metrics file and the data)."""

    options: dict = field(default_factory=dict)

    def _opts(self, layout, steps: int, **kw):
        from .options import TrainOptions

        try:
            return TrainOptions(layout=str(layout), steps=steps, **{**self.options, **kw})
        except TypeError as exc:  # an option the trainer does not have
            raise ValueError(f"the reference trainer has no such option: {exc}") from None

    def argv(self, layout, until, metrics, data):
        from .options import to_argv

        argv = to_argv(self._opts(layout, until, metrics=metrics, data=data, log_every=10**9))
        at = argv.index("--device")  # the machine's agent says which (SCALAI_DEVICE), not the coordinator
        return argv[:at] + argv[at + 2:]

    def why_not(self, layout) -> str | None:
        try:
            self._opts(layout, 1)
        except ValueError as exc:
            return str(exc)
        return None

    def cost_shape(self):
        return trainer_shape(self.options.get("model", "gpt-tiny"))

    def data_spec(self) -> dict | None:
        """The index every machine needs: the given one, or the stdlib corpus for the
        model's sequence length (built here in a temporary directory for its digest)."""
        import tempfile

        from .corpus import ensure_index
        from .model import preset

        given = self.options.get("data")
        if given:
            from ...data import SampleIndex

            return {"path": given, "digest": index_digest(SampleIndex.open(given))}
        seq_len = preset(self.options.get("model", "gpt-tiny")).seq_len
        with tempfile.TemporaryDirectory(prefix="scalai-corpus-") as tmp:
            return {"seq_len": seq_len, "digest": index_digest(ensure_index(seq_len, Path(tmp) / "index"))}

    def prepare_data(self, root: str, spec: dict):
        """This machine's copy: the given index (it must be on every machine), else the
        stdlib corpus built under ``root``. Returns ``(path, digest)``."""
        if spec.get("path"):
            from ...data import SampleIndex

            return spec["path"], index_digest(SampleIndex.open(spec["path"]))
        from .corpus import ensure_index

        path = Path(root) / f"stdlib-seq{spec['seq_len']}"
        return str(path), index_digest(ensure_index(int(spec["seq_len"]), path))

    def warm(self) -> None:
        warm()

    def validate(self) -> None:
        self._opts("tp=1,pp=1,dp=1", 1)

    def to_json(self) -> dict:
        return {"module": self.module, "plugin": self.plugin, "options": dict(self.options)}


def trainer(spec: dict) -> ReferenceTrainer:
    """The plug-in's entry point (:func:`scalai.elastic.trainer.load_trainer`); options are
    checked by :meth:`ReferenceTrainer.validate` (the coordinator calls it)."""
    return ReferenceTrainer(spec.get("module") or REFERENCE_MODULE, REFERENCE_PLUGIN, dict(spec.get("options") or {}))
