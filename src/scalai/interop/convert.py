"""Conversions in and out: a foreign checkpoint planned into a scalai layout, and back.

Every conversion is one plan run by :func:`~scalai.storage.run_plan`, the runner of every
reshard: the foreign checkpoint is a source (or sink) in the layout it was saved in, the
other side a scalai checkpoint, and the planner copies region by region, never a whole
model:

- :func:`import_hf`: a Hugging Face directory (:class:`~scalai.interop.hf_storage.HFSource`,
  one rank holding every tensor whole) into any layout;
- :func:`export_hf`: a scalai checkpoint (any layout) into a Hugging Face directory that
  ``from_pretrained`` loads (:class:`~scalai.interop.hf_storage.HFSink`); the optimizer
  state stays behind;
- :func:`import_megatron`: a legacy Megatron-LM tree (its own ``tp x pp`` layout, see
  :mod:`scalai.interop.megatron`) with its optimizer state into any layout;
- :func:`import_dcp`: a PyTorch DCP directory (its stored chunks as the layout, see
  :mod:`scalai.interop.dcp`) with its optimizer state into any layout;
- :func:`export_dcp`: a scalai checkpoint (any layout) into a DCP directory, one chunk
  per stored box, that ``dcp.load`` reads into any DTensor layout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..config import ParallelConfig, Placement
from ..layout.ptc import PTC
from ..models.synth import stored_nbytes
from ..planner import Deployment, make_plan
from ..storage.run import run_plan
from .mapping import foreign_tensors, resolve
from .rules import Rules

__all__ = ["Conversion", "import_hf", "export_hf", "import_megatron", "import_dcp", "export_dcp",
           "hf_export_config"]


@dataclass(frozen=True)
class Conversion:
    """What a conversion did: the output, its layout (``"hf"`` for an export), the scalai
    tensors copied (``tensors``: one per name, a fused Q/K/V counting once; ``local_tensors``:
    per rank, as the layout holds them), the bytes copied, and the seconds it took (``plan``,
    ``copy``, ``commit``, ``total``)."""

    output: str
    layout: str
    tensors: int
    local_tensors: int
    bytes: int
    seconds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "layout": self.layout, "tensors": self.tensors,
                "local_tensors": self.local_tensors, "bytes": self.bytes,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _check_output(out, need: int, what: str, source) -> None:
    """Refuse an output that exists, lies inside the input, or does not fit (the checks of
    every command that writes; a ``memory://`` or object-store output only needs to be new)."""
    from ..checkpoint.staging import check_output
    from ..locations import exists, is_directory

    out = os.fspath(out)
    if not is_directory(out):
        if exists(out):
            raise FileExistsError(f"output {out} already exists; choose another name")
        return
    check_output(out, need, what, inputs=[os.fspath(source)])


def _one_host(*ptcs: PTC) -> Placement:
    """Every rank on one host: a conversion on this machine moves bytes locally."""
    return Placement(gpus_per_host=max(p.config.world_size for p in ptcs))


def _run(source, new_ptc: PTC, sink_factory: Callable, subset: bool, workers: int | None,
         progress: Callable[[int], None] | None, output: str, layout: str) -> Conversion:
    t0 = time.perf_counter()
    place = _one_host(source.ptc, new_ptc)
    plan = make_plan(Deployment(source.ptc, place), Deployment(new_ptc, place), fanout=False, subset=subset)
    t1 = time.perf_counter()
    with sink_factory() as sink:
        report = run_plan(plan, source, sink, workers=workers, progress=progress)
        t2 = time.perf_counter()
        sink.commit()
    t3 = time.perf_counter()
    return Conversion(output, layout, len({c.tensor for c in plan.copies}), report.tensors, report.bytes,
                      {"plan": t1 - t0, "copy": t2 - t1, "commit": t3 - t2, "total": t3 - t0})


def import_hf(model_dir: str | os.PathLike, out_dir: str, layout: ParallelConfig | str, *,
              rules: Rules | None = None, workers: int | None = None,
              progress: Callable[[int], None] | None = None, sync: bool = True) -> Conversion:
    """Write the Hugging Face model in ``model_dir`` as a scalai checkpoint in ``layout``.

    Args:
        rules: how its tensors map onto scalai's (default: the built-in rules of its
            ``model_type``, see :mod:`scalai.interop.hf_models`).

    Raises:
        ValueError: an unknown model type without rules, tensors the rules do not
            explain, or a layout the model cannot be split into (the message says which).
        FileExistsError: ``out_dir`` exists.
        CheckpointError: a damaged file.

    Like every command that writes, an output inside the input or one its filesystem cannot
    take is refused before anything is written (:func:`~scalai.checkpoint.staging.check_output`).
    """
    from ..locations import create_sink
    from .hf_files import HFDirectory
    from .hf_models import hf_rules
    from .hf_storage import HFSource

    layout = ParallelConfig.parse(layout)
    with HFDirectory(model_dir) as directory:
        rules = rules or hf_rules(directory.config, os.path.join(directory.path, "config.json"))
        mapping = resolve(rules, directory.tensors, states=())
        new_ptc = PTC(layout, mapping.specs, mapping.num_layers)
        _check_output(out_dir, stored_nbytes(new_ptc), f"the import into {layout}", model_dir)
        state = {"step": 0, "imported": {"from": "huggingface", "directory": os.path.abspath(directory.path),
                                         "config": directory.config}}
        source = HFSource(directory, mapping, state)
        return _run(source, new_ptc.stored_replicas(), lambda: create_sink(out_dir, new_ptc, state, sync),
                    False, workers, progress, os.fspath(out_dir), str(layout))


def hf_export_config(state: dict, params: list, num_layers: int) -> dict[str, Any]:
    """The ``config.json`` of an export: the imported model's own, or the Hugging Face
    counterpart of the scalai model the checkpoint holds (its dtype the checkpoint's)."""
    from ..models import MODELS, model_specs
    from .hf_models import hf_config, shape_from_specs

    imported = state.get("imported") or {}
    if imported.get("from") == "huggingface" and isinstance(imported.get("config"), dict):
        return dict(imported["config"])
    name = state.get("model")
    shape = shape_from_specs(params, num_layers, name or "custom")
    known = MODELS.get(name) if isinstance(name, str) else None
    if known is not None and [(s.name, s.shape) for s in model_specs(known, optimizer=False)] == \
            [(s.name, s.shape) for s in params]:
        shape = known  # its sequence length too, which no tensor of a llama tells
    config = hf_config(shape)
    dtypes = {s.dtype for s in params}
    if len(dtypes) == 1:
        config["dtype"] = dtypes.pop()
    return config


def export_hf(ckpt: str | os.PathLike, out_dir: str, *, rules: Rules | None = None,
              config: dict | None = None, max_shard_bytes: int = 5 << 30, workers: int | None = None,
              progress: Callable[[int], None] | None = None, sync: bool = True) -> Conversion:
    """Write the weights of checkpoint ``ckpt`` (any layout) as a Hugging Face directory.

    Args:
        rules, config: the names and ``config.json`` to write (default: those of the
            model it was imported from, or of its scalai model's Hugging Face counterpart).
        max_shard_bytes: the largest safetensors file.

    Raises:
        ValueError: a checkpoint that is not of a family scalai knows and no rules or
            config were given; tensors the rules do not cover.
        FileExistsError: ``out_dir`` exists.
    """
    from ..locations import open_source
    from .hf_models import hf_rules
    from .hf_storage import HFSink, whole_layout

    if os.path.lexists(os.fspath(out_dir)):  # before reading anything
        raise FileExistsError(f"output {out_dir} already exists; choose another directory or remove it first")
    src = os.fspath(ckpt)
    if os.path.isfile(os.path.join(src, "config.json")) and not os.path.lexists(os.path.join(src, "manifest.json")):
        raise ValueError(f"{src} is a Hugging Face model directory, not a scalai checkpoint; export takes a "
                         f"scalai checkpoint (bring this one in with: scalai import hf {src} OUT --layout L)")
    with open_source(src) as source:
        params = [s for s in source.ptc.specs if not s.is_optimizer_state]
        if config is None:
            config = hf_export_config(source.state, params, source.ptc.num_layers)
        rules = rules or hf_rules(config, "the export's config")
        mapping = resolve(rules, foreign_tensors(rules, params, source.ptc.num_layers), states=())
        ours = {s.name: s for s in params}
        missing = sorted(set(ours) - {s.name for s in mapping.specs})
        if missing:
            raise ValueError(f"the rules export no {missing[0]} (and {len(missing) - 1} more); a checkpoint of "
                             f"another model needs its own rules (--rules FILE)")
        for s in mapping.specs:
            if (ours[s.name].shape, ours[s.name].dtype) != (s.shape, s.dtype):
                raise ValueError(f"{s.name} is {ours[s.name].dtype}{list(ours[s.name].shape)} in the checkpoint, "
                                 f"{s.dtype}{list(s.shape)} for the rules")
        _check_output(out_dir, sum(s.nbytes for s in mapping.specs), "the export", ckpt)
        return _run(source, whole_layout(mapping), lambda: HFSink(out_dir, mapping, config, max_shard_bytes, sync),
                    True, workers, progress, os.fspath(out_dir), "hf")


def import_megatron(path: str | os.PathLike, out_dir: str, layout: ParallelConfig | str, *,
                    vocab_size: int | None = None, weights_only: bool = False, rules: Rules | None = None,
                    workers: int | None = None, progress: Callable[[int], None] | None = None,
                    sync: bool = True) -> Conversion:
    """Write the legacy Megatron-LM checkpoint under ``path`` as a scalai checkpoint in ``layout``
    (weights, and unless ``weights_only`` fp32 masters and Adam state; the step is the
    iteration). See :func:`~scalai.interop.megatron.open_megatron` for the arguments.
    """
    from ..locations import create_sink
    from ..storage.live import ArraysSource
    from .megatron import open_megatron

    layout = ParallelConfig.parse(layout)
    if os.path.lexists(os.fspath(out_dir)):  # before reading anything
        raise FileExistsError(f"output {out_dir} already exists; choose another directory or remove it first")
    m = open_megatron(path, vocab_size=vocab_size, weights_only=weights_only, rules=rules)
    new_ptc = m.ptc.relayout(layout)
    _check_output(out_dir, stored_nbytes(new_ptc), f"the import into {layout}", path)
    with ArraysSource(m.ptc, m.arrays, m.state) as source:
        return _run(source, new_ptc.stored_replicas(), lambda: create_sink(out_dir, new_ptc, m.state, sync),
                    False, workers, progress, os.fspath(out_dir), str(layout))


def import_dcp(path: str | os.PathLike, out_dir: str, layout: ParallelConfig | str, *, model: str | None = None,
               rules: Rules | None = None, workers: int | None = None,
               progress: Callable[[int], None] | None = None, sync: bool = True,
               verify: bool = False) -> Conversion:
    """Write the PyTorch DCP checkpoint in directory ``path`` as a scalai checkpoint in ``layout``:
    its parameters and the optimizer state that follows them (Adam's ``exp_avg`` and
    ``exp_avg_sq``), each destination window read from the stored chunks that overlap it.

    Args:
        model: a scalai model the checkpoint holds under scalai's own names (one that
            ``scalai export dcp`` wrote); or
        rules: how its keys map onto scalai's tensors and how they split (one of the two
            is needed: DCP records boxes, not how a model splits).
        verify: first check every chunk against the CRC-32 its archive records.

    Raises:
        ValueError: neither ``model`` nor ``rules``, keys the rules do not explain, or a
            layout the tensors cannot be split into.
        FileExistsError: ``out_dir`` exists.
        CheckpointError: a missing, damaged or hostile ``.metadata`` or data file.
    """
    from ..locations import create_sink
    from .dcp.open import open_dcp

    layout = ParallelConfig.parse(layout)
    if os.path.lexists(os.fspath(out_dir)):  # before reading anything
        raise FileExistsError(f"output {out_dir} already exists; choose another directory or remove it first")
    if (model is None) == (rules is None):
        raise ValueError("say how the DCP checkpoint's tensors map onto scalai's: give --model M (a scalai model "
                         "under its own names) or --rules FILE (see docs/interop.md), not both")
    with open_dcp(path, rules=rules, model=model) as source:
        new_ptc = source.ptc.relayout(layout)
        _check_output(out_dir, stored_nbytes(new_ptc), f"the import into {layout}", path)
        if verify:
            from ..storage.verify import verify_source

            verify_source(source, workers=workers)
        state = source.state
        return _run(source, new_ptc.stored_replicas(), lambda: create_sink(out_dir, new_ptc, state, sync),
                    False, workers, progress, os.fspath(out_dir), str(layout))


def _dcp_keys(rules: Rules | None, params: list, num_layers: int) -> dict[str, str]:
    """scalai parameter name -> the key it is exported under (its own name without rules)."""
    if rules is None:
        return {s.name: s.name for s in params}
    mapping = resolve(rules, foreign_tensors(rules, params, num_layers), states=())
    keys = {}
    for m in mapping.tensors:
        (part, *more) = m.parts
        if more or part.transpose or (m.spec.shape and (part.start, part.rows) != (0, m.spec.shape[0])):
            raise ValueError(f"the rules write {m.spec.name} as {[p.key for p in m.parts]} (fused, transposed or "
                             f"cut); scalai export dcp writes each tensor under one key for now: give rules "
                             f"that only rename, or none")
        keys[m.spec.name] = part.key
    missing = sorted({s.name for s in params} - set(keys))
    if missing:
        raise ValueError(f"the rules export no {missing[0]} (and {len(missing) - 1} more); a checkpoint of "
                         f"another model needs its own rules (--rules FILE)")
    return keys


def export_dcp(ckpt: str | os.PathLike, out_dir: str, *, rules: Rules | None = None, weights_only: bool = False,
               workers: int | None = None, progress: Callable[[int], None] | None = None,
               sync: bool = True) -> Conversion:
    """Write checkpoint ``ckpt`` (any layout) as a PyTorch DCP directory: parameters as
    ``model.<key>``, Adam's state as ``optim.state.<key>.exp_avg|exp_avg_sq|step`` (the
    shape of ``get_state_dict``), each tensor in the boxes the checkpoint stores it in.

    Args:
        rules: the keys to write (rules that rename only); default: scalai's names.
        weights_only: leave the optimizer state out.

    Raises:
        ValueError: rules that fuse, transpose or cut a tensor; tensors they do not cover.
        FileExistsError: ``out_dir`` exists.
    """
    from ..locations import open_source
    from .dcp import is_dcp_directory
    from .dcp.sink import DcpSink, ExportTensor, sink_layout, stored_boxes

    if os.path.lexists(os.fspath(out_dir)):  # before reading anything
        raise FileExistsError(f"output {out_dir} already exists; choose another directory or remove it first")
    src = os.fspath(ckpt)
    if is_dcp_directory(src) and not os.path.lexists(os.path.join(src, "manifest.json")):
        raise ValueError(f"{src} is a PyTorch DCP checkpoint, not a scalai checkpoint; export takes a scalai "
                         f"checkpoint (bring this one in with: scalai import dcp {src} OUT --layout L --rules FILE)")
    with open_source(src) as source:
        ptc = source.ptc
        params = [s for s in ptc.specs if not s.is_optimizer_state]
        keys = _dcp_keys(rules, params, ptc.num_layers)
        boxes = stored_boxes(ptc)
        tensors = [ExportTensor(s, f"model.{keys[s.name]}", ("model", keys[s.name]), boxes[s.name])
                   for s in params]
        with_state = []
        for s in ptc.specs:
            if s.is_optimizer_state and s.state in ("exp_avg", "exp_avg_sq") and not weights_only:
                k = keys[s.param]
                tensors.append(ExportTensor(s, f"optim.state.{k}.{s.state}", ("optim", "state", k, s.state),
                                            boxes[s.name]))
                with_state.append(k)
        steps = [(f"optim.state.{k}.step", ("optim", "state", k, "step")) for k in dict.fromkeys(with_state)]
        step = int(source.state.get("step", 0) or 0)
        _check_output(out_dir, sum(t.spec.nbytes for t in tensors), "the export", ckpt)
        return _run(source, sink_layout(tensors, ptc.num_layers),
                    lambda: DcpSink(out_dir, tensors, ptc.num_layers, steps, step, sync), True, workers, progress,
                    os.fspath(out_dir), "dcp")
