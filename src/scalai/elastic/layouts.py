"""Which (tp, pp, dp, zero) layouts fit N devices, and which is fastest. Pure.

Memory per device (bytes), for the device holding the most (the first pipeline stage,
or the last when the output head is bigger), with ``P`` its parameter count:

- weights ``2 P`` (bf16), gradients ``4 P`` (fp32 accumulation, as Megatron does), Adam
  state ``12 P`` (fp32 master + two moments), divided by ``dp`` under ``zero``;
- activations per layer and micro-batch (Korthikanti et al. 2022, no sequence
  parallelism, no recomputation): ``s b h (10 + 24/t + 5 a s / (h t))`` bytes, times the
  micro-batches in flight on the first stage under 1F1B, ``min(pp, m)``; with full
  recomputation only each layer's input ``2 s b h`` is kept, plus one layer's activations;
- fp32 logits ``4 s b V / t`` on the last stage.

A layout fits when that total is at most 90 % of device memory (the rest is workspace and
fragmentation).

Step time (seconds), no overlap of communication with compute (conservative):

- compute ``6 N_params T / (devices * peak * efficiency)`` for ``T`` tokens per step,
  ``x 4/3`` with recomputation, stretched by the pipeline bubble ``(1 + (pp - 1) / m)``;
- tensor parallelism: 4 all-reduces of ``2 s b h`` bytes per layer and micro-batch
  (2 forward, 2 backward), ring cost ``2 (t - 1) / t * bytes / bandwidth``, over the
  host's links when the tp group fits in a host, else the network;
- pipeline: activations and their gradients between stages, ``2 m * 2 s b h`` bytes;
- data parallelism: gradient all-reduce (reduce-scatter + all-gather under zero, the same
  volume) ``2 (d - 1) / d * 2 P`` bytes over the network when the dp group spans hosts.

Layouts are ranked by step time; ties go to fewer bytes crossing hosts, then less memory,
then smaller tp and pp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ParallelConfig
from ..limits import RANKS
from ..models.shapes import ModelShape

__all__ = ["Hardware", "Workload", "LayoutEstimate", "rank_layouts", "candidates"]

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """Devices and links. Defaults: A100-80GB-class hosts of 8 with NVLink and 200 Gb/s."""

    device_memory_gib: float = 80.0
    gpus_per_host: int = 8
    peak_tflops: float = 312.0
    efficiency: float = 0.45
    intra_host_gbps: float = 250.0  # GB/s per device within a host
    inter_host_gbps: float = 25.0   # GB/s per device across hosts

    def __post_init__(self) -> None:
        for name in ("device_memory_gib", "peak_tflops", "efficiency", "intra_host_gbps", "inter_host_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.gpus_per_host < 1:
            raise ValueError(f"gpus_per_host={self.gpus_per_host} must be at least 1")


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes: ``global_batch`` sequences of ``seq_len`` tokens."""

    global_batch: int = 512
    seq_len: int = 2048
    micro_batch: int = 1
    recompute: bool = False

    def __post_init__(self) -> None:
        if min(self.global_batch, self.seq_len, self.micro_batch) < 1:
            raise ValueError("global_batch, seq_len and micro_batch must be positive")


@dataclass(frozen=True)
class LayoutEstimate:
    """One candidate layout: peak memory per device, whether it fits, estimated step time."""

    config: ParallelConfig
    memory_gib: float
    fits: bool
    step_seconds: float
    breakdown: dict[str, float] = field(default_factory=dict)
    cross_host_gib_per_step: float = 0.0

    def to_json(self) -> dict:
        return {"layout": str(self.config), "fits": self.fits, "memory_gib": round(self.memory_gib, 2),
                "step_seconds": round(self.step_seconds, 4),
                "breakdown": {k: round(v, 4) for k, v in self.breakdown.items()},
                "cross_host_gib_per_step": round(self.cross_host_gib_per_step, 3)}


def candidates(devices: int, zero_options=(False, True)) -> list[ParallelConfig]:
    """Every (tp, pp, dp, zero) of ``devices`` devices, whatever the model (pure)."""
    out = []
    for tp in range(1, devices + 1):
        if devices % tp:
            continue
        for pp in range(1, devices // tp + 1):
            if (devices // tp) % pp:
                continue
            dp = devices // (tp * pp)
            out += [ParallelConfig(tp=tp, pp=pp, dp=dp, zero=zero) for zero in zero_options if not (zero and dp == 1)]
    return out


def _candidates(shape: ModelShape, devices: int):
    """The candidates the model's shape allows (heads, layers, vocabulary split)."""
    for config in candidates(devices):
        try:
            shape.check(config)
        except ValueError:
            continue
        yield config


def _stage_params(shape: ModelShape, config: ParallelConfig) -> tuple[float, int]:
    """(parameters on the fullest device, layers of the fullest stage)."""
    h, f, kv = shape.hidden, shape.ffn_hidden, shape.num_kv_heads * shape.head_dim
    gated = 3 if shape.family == "llama" else 2
    per_layer = h * (h + 2 * kv) + h * h + gated * h * f + 4 * h
    layers = max(len(r) for r in config.stage_layers(shape.num_layers))
    vocab = shape.padded_vocab(config.tp) * h
    first = layers * per_layer + vocab + (shape.max_seq_len * h if shape.family == "gpt" else 0)
    last = layers * per_layer + (vocab if (not shape.tied_embeddings or config.pp > 1) else 0)
    if config.pp == 1:
        first = layers * per_layer + vocab * (1 if shape.tied_embeddings else 2)
        last = first
    return max(first, last) / config.tp, layers


def estimate(shape: ModelShape, config: ParallelConfig, hw: Hardware, work: Workload) -> LayoutEstimate:
    """Memory and step time of ``config`` (see the module docstring for the model)."""
    t, p, d = config.tp, config.pp, config.dp
    s, b, h, a = work.seq_len, work.micro_batch, shape.hidden, shape.num_heads
    params, layers = _stage_params(shape, config)
    if work.global_batch % (d * b):
        micro = work.global_batch / (d * b)  # uneven: the largest replica's count
        micro = int(micro) + 1
    else:
        micro = work.global_batch // (d * b)
    states = 2 * params + 4 * params + 12 * params / (d if config.zero else 1)
    per_layer_act = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    in_flight = min(p, micro)
    if work.recompute:
        acts = (2 * s * b * h * layers) * in_flight + per_layer_act
    else:
        acts = per_layer_act * layers * in_flight
    logits = 4 * s * b * shape.padded_vocab(t) / t
    memory = states + acts + logits
    fits = memory <= 0.9 * hw.device_memory_gib * GIB

    devices = config.world_size
    tokens = work.global_batch * s
    flops = 6 * shape.num_params * tokens * (4 / 3 if work.recompute else 1)
    bubble = 1 + (p - 1) / micro
    compute = flops / (devices * hw.peak_tflops * 1e12 * hw.efficiency) * bubble
    tp_bw = hw.intra_host_gbps if t <= hw.gpus_per_host else hw.inter_host_gbps
    tp_comm = layers * micro * 4 * (2 * (t - 1) / t) * (2 * s * b * h) / (tp_bw * 1e9) if t > 1 else 0.0
    pp_bytes = 2 * micro * 2 * s * b * h if p > 1 else 0.0
    pp_cross = t * d >= hw.gpus_per_host
    pp_comm = pp_bytes / ((hw.inter_host_gbps if pp_cross else hw.intra_host_gbps) * 1e9)
    dp_bytes = 2 * (d - 1) / d * 2 * params if d > 1 else 0.0
    dp_cross = t * d > hw.gpus_per_host
    dp_comm = dp_bytes / ((hw.inter_host_gbps if dp_cross else hw.intra_host_gbps) * 1e9)
    cross = (pp_bytes if pp_cross else 0) + (dp_bytes if dp_cross else 0)
    cross += tp_comm * tp_bw * 1e9 if t > hw.gpus_per_host else 0
    breakdown = {"compute": compute, "tp_comm": tp_comm, "pp_comm": pp_comm, "dp_comm": dp_comm}
    return LayoutEstimate(config, memory / GIB, fits, sum(breakdown.values()), breakdown, cross / GIB)


def rank_layouts(shape: ModelShape, devices: int, hw: Hardware | None = None,
                 work: Workload | None = None) -> list[LayoutEstimate]:
    """Every layout of ``devices`` devices the model allows, fitting ones first, fastest first.

    Raises:
        ValueError: ``devices`` < 1; LimitError: more than :data:`scalai.limits.RANKS`.
    """
    if devices < 1:
        raise ValueError(f"devices={devices} must be at least 1")
    RANKS.check(devices, f"a job of {devices:,} devices")
    hw, work = hw or Hardware(), work or Workload(seq_len=min(2048, shape.max_seq_len))
    estimates = [estimate(shape, c, hw, work) for c in _candidates(shape, devices)]
    return sorted(estimates, key=lambda e: (not e.fits, round(e.step_seconds, 6), e.cross_host_gib_per_step,
                                            round(e.memory_gib, 3), e.config.tp, e.config.pp))
