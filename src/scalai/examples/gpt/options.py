"""Options of the reference trainer, shared by ``python -m scalai.examples.gpt`` and ``scalai train``."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Sequence

from ...config import ParallelConfig
from .model import PRESETS, preset
from .parallel import SCHEDULES

__all__ = ["TrainOptions", "parse_args", "to_argv"]


@dataclass(frozen=True)
class TrainOptions:
    """One training run; validated on construction.

    ``steps`` is the total step count of the job: a run resumed at step 20 with
    ``steps=40`` trains 20 more. The LR schedule depends on ``warmup`` and
    ``decay_steps`` only, never on ``steps``, so stopping and resuming does not change it.
    The global batch (samples per step, over all replicas) is the same under every
    layout; each replica cuts its share into near-equal micro-batches of at most
    ``micro_batch`` samples, weighted so that the gradient is the one of the mean loss
    over the global batch even when shares differ (``dp`` not dividing the batch).
    """

    layout: str
    steps: int
    model: str = "gpt-tiny"
    save: str | None = None
    save_every: int = 0
    resume: str | None = None
    metrics: str | None = None
    data: str | None = None
    seed: int = 0
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 1e-3
    warmup: int = 10
    decay_steps: int = 2000
    weight_decay: float = 0.1
    schedule: str = "1f1b"
    stop_file: str | None = None
    device: str = "cpu"
    log_every: int = 1
    verify: bool = True

    def __post_init__(self) -> None:
        config = self.config  # validates the layout text
        cfg = preset(self.model)
        cfg.check_tp(config.tp)
        config.stage_layers(cfg.layers)
        for name in ("steps", "global_batch", "micro_batch", "decay_steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
        if self.save_every < 0 or (self.save_every and not self.save):
            raise ValueError("--save-every N needs --save ROOT and N >= 0")
        if self.warmup < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("--lr must be positive, --warmup and --weight-decay not negative")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        try:
            division = self.division
        except ValueError as exc:
            raise ValueError(f"--global-batch {self.global_batch} with dp={config.dp}: {exc}") from None
        if config.pp > 1 and self.schedule == "1f1b" and len(division.micro_batch_sizes(0)) < config.pp:
            raise ValueError(
                f"1F1B over pp={config.pp} stages needs at least {config.pp} micro-batches per replica, "
                f"but a replica gets only {self.global_batch // config.dp} samples (global batch "
                f"{self.global_batch}, dp={config.dp}); use --schedule gpipe or a global batch of at "
                f"least {config.pp * config.dp}")
        if config.pp > 1:
            for r in range(config.dp):  # the pipeline schedule cuts a replica's part evenly
                sizes = division.micro_batch_sizes(r).tolist()
                if len(set(sizes)) > 1:
                    raise ValueError(
                        f"with pp={config.pp}, replica {r} would run micro-batches of {sizes} samples "
                        f"(global batch {self.global_batch}, dp={config.dp}, --micro-batch "
                        f"{self.micro_batch}); pipeline micro-batches must be equal: make the global "
                        f"batch a multiple of dp * {len(sizes)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r} must be cpu or cuda")

    @property
    def config(self) -> ParallelConfig:
        return ParallelConfig.parse(self.layout)

    @property
    def division(self):
        """How each global batch is divided among replicas and micro-batches.

        Without a pipeline, a replica cuts its share into near-equal micro-batches of at
        most ``micro_batch`` samples. With one, every replica runs the same number of
        micro-batches, at least ``pp`` for 1F1B (which needs one in flight per stage).
        """
        from ...data import Division

        config = self.config
        if config.pp == 1:
            return Division(self.global_batch, config.dp, micro_batch_size=self.micro_batch)
        largest = -(-self.global_batch // config.dp)
        count = -(-largest // self.micro_batch)
        if self.schedule == "1f1b":
            count = max(count, config.pp)
        return Division(self.global_batch, config.dp, num_micro_batches=min(count, self.global_batch // config.dp))


_HELP = {
    "layout": "parallel layout, e.g. tp=2,pp=2,dp=1[,zero=1]",
    "steps": "total optimizer steps of the job (a resumed run stops at the same step)",
    "model": f"model size: {', '.join(PRESETS)}",
    "save": "checkpoint root: the state goes to SAVE/step-NNNNNN at the end (or when stopped)",
    "save_every": "also save every N steps, in the background (0: only at the end)",
    "resume": "load the job state first from this checkpoint, or the latest under this root (any layout)",
    "metrics": "append one JSON line per step to this file",
    "data": "sample index directory (default: the stdlib corpus in the cache)",
    "seed": "seed of initialization and data order",
    "global_batch": "samples per optimizer step over all replicas (same for every layout)",
    "micro_batch": "largest micro-batch (samples); a replica's share is cut into near-equal ones",
    "lr": "peak learning rate (AdamW)",
    "warmup": "linear warm-up steps",
    "decay_steps": "cosine decay to 10%% of --lr over this many steps (independent of --steps)",
    "weight_decay": "AdamW weight decay",
    "schedule": "pipeline schedule",
    "stop_file": "stop (and save) after the step at which this file exists",
    "device": "cpu (gloo) or cuda (nccl)",
    "log_every": "print progress every N steps",
    "verify": "check every saved byte's checksum on --resume",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scalai.examples.gpt",
                                     description="Reference GPT trainer (TP x PP x DP) with elastic state.")
    for f in fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        required = f.name in ("layout", "steps")
        if f.type in ("bool",) or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, required=required,
                            default=None if required else f.default, help=_HELP[f.name])
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainOptions:
    """The options from ``argv`` (default ``sys.argv[1:]``). Under ``scalai run`` (a user's
    module that runs this trainer), the worker protocol's environment gives the layout, the
    step to stop after, the metrics file and the device kind of the machine's agent when the
    arguments do not (``SCALAI_LAYOUT``, ``SCALAI_STEPS``, ``SCALAI_METRICS``,
    ``SCALAI_DEVICE``)."""
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, var in (("--layout", "SCALAI_LAYOUT"), ("--steps", "SCALAI_STEPS"), ("--metrics", "SCALAI_METRICS"),
                      ("--device", "SCALAI_DEVICE")):
        if os.environ.get(var) and not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv = [flag, os.environ[var], *argv]
    args = _parser().parse_args(argv)
    return TrainOptions(**vars(args))


def to_argv(options: TrainOptions) -> list[str]:
    """Command-line arguments that :func:`parse_args` turns back into ``options``."""
    out: list[str] = []
    for key, value in asdict(options).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out
