"""Parallel configuration: degrees, rank coordinates and placement of ranks on hosts.

Rank order follows Megatron-LM's default: the tensor-parallel index varies fastest, then
the data-parallel index, then the pipeline stage::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ``tp`` ranks of one model shard are neighbours (and share a host whenever
``tp <= gpus_per_host``), and a pipeline stage is a contiguous block of ``tp * dp`` ranks.

Ranks fill hosts in order: rank ``r`` runs on host ``r // gpus_per_host``, device
``r % gpus_per_host``.

The text form, accepted everywhere in the CLI, is ``tp=2,pp=4,dp=2`` with optional
``zero=1`` (optimizer state sharded across data-parallel ranks, ZeRO-1 / Megatron's
distributed optimizer) and optional ``stages=3+5`` (explicit layers per pipeline stage for
an uneven pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .limits import LAYERS, RANKS

__all__ = ["ParallelConfig", "RankCoords", "Placement", "Device"]


@dataclass(frozen=True, slots=True)
class RankCoords:
    """Position of one rank in the (tp, dp, pp) grid."""

    tp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of tensor, pipeline and data parallelism, validated on construction.

    Args:
        tp: tensor-parallel degree (ranks that split one layer's weights).
        pp: pipeline-parallel degree (stages of consecutive layers).
        dp: data-parallel degree (model replicas).
        zero: shard optimizer state across the ``dp`` replicas (ZeRO-1).
        layers_per_stage: explicit layer count of each stage for an uneven pipeline;
            ``None`` splits the layers evenly.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: bool = False
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not a positive integer degree; use {name}=1 or more")
        if not isinstance(self.zero, bool):
            raise ValueError(f"zero={self.zero!r} must be True or False (zero=1 or zero=0 in text)")
        if self.layers_per_stage is not None:
            stages = tuple(self.layers_per_stage)
            object.__setattr__(self, "layers_per_stage", stages)
            if len(stages) != self.pp:
                raise ValueError(
                    f"stages={_plus(stages)} lists {len(stages)} stages but pp={self.pp}; "
                    f"give exactly pp layer counts joined by '+'"
                )
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in stages):
                raise ValueError(f"stages={_plus(stages)} has a negative or non-integer layer count")
            LAYERS.check(sum(stages), f"stages={_plus(stages)}")
        RANKS.check(self.tp * self.pp * self.dp, f"layout {self}")

    # -- text form -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """Parse ``"tp=2,pp=4,dp=2[,zero=1][,stages=3+5]"`` (any order, spaces allowed)."""
        if isinstance(text, ParallelConfig):
            return text
        if not str(text).replace(" ", "").replace(",", ""):
            raise ValueError(f"layout {text!r} is empty; write the degrees, e.g. 'tp=2,pp=1,dp=4' "
                             f"(tp=1,pp=1,dp=1 for a single device)")
        values: dict[str, object] = {}
        for item in str(text).replace(" ", "").split(","):
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = key.lower()
            if not sep or not raw:
                raise ValueError(f"layout item {item!r} is not key=value; write e.g. 'tp=2,pp=1,dp=4'")
            if key in values:
                raise ValueError(f"layout {text!r} gives {key} twice")
            try:
                if key in ("tp", "pp", "dp"):
                    values[key] = int(raw)
                elif key == "zero":
                    if raw not in ("0", "1", "true", "false"):
                        raise ValueError
                    values[key] = raw in ("1", "true")
                elif key == "stages":
                    values["layers_per_stage"] = tuple(int(x) for x in raw.split("+"))
                else:
                    raise KeyError(key)
            except KeyError:
                raise ValueError(
                    f"unknown layout key {key!r} in {text!r}; known keys are tp, pp, dp, zero, stages"
                ) from None
            except ValueError:
                raise ValueError(f"layout item {item!r} has a bad value; e.g. tp=2, zero=1, stages=3+5") from None
        if "layers_per_stage" in values and "pp" not in values:
            values["pp"] = len(values["layers_per_stage"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        text = f"tp={self.tp},pp={self.pp},dp={self.dp}"
        if self.zero:
            text += ",zero=1"
        if self.layers_per_stage is not None:
            text += f",stages={_plus(self.layers_per_stage)}"
        return text

    # -- ranks -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> RankCoords:
        """(tp, dp, pp) coordinates of ``rank``; tp fastest, then dp, then pp."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size} ranks ({self})")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return RankCoords(tp_rank, dp_rank, pp_rank)

    def rank(self, tp: int, dp: int, pp: int) -> int:
        """Inverse of :meth:`coords`."""
        if not (0 <= tp < self.tp and 0 <= dp < self.dp and 0 <= pp < self.pp):
            raise ValueError(f"coordinates tp={tp},dp={dp},pp={pp} lie outside {self}")
        return tp + self.tp * (dp + self.dp * pp)

    def ranks(self) -> range:
        return range(self.world_size)

    def stage_ranks(self, pp: int) -> range:
        """Ranks of pipeline stage ``pp`` (a contiguous block)."""
        block = self.tp * self.dp
        return range(pp * block, (pp + 1) * block)

    def stage_layers(self, num_layers: int) -> list[range]:
        """Global layer indices held by each stage.

        Raises:
            ValueError: the layers do not split as asked.
            LimitError: more layers than :data:`scalai.limits.LAYERS`.
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers={num_layers!r} must be a non-negative integer")
        LAYERS.check(num_layers, "the model")
        if self.layers_per_stage is not None:
            if sum(self.layers_per_stage) != num_layers:
                raise ValueError(
                    f"stages={_plus(self.layers_per_stage)} holds {sum(self.layers_per_stage)} "
                    f"layers but the model has {num_layers}; make the counts sum to {num_layers}"
                )
            counts = list(self.layers_per_stage)
        else:
            if num_layers % self.pp:
                options = [d for d in range(1, min(num_layers, 4096) + 1) if num_layers % d == 0]
                raise ValueError(
                    f"pp={self.pp} does not divide {num_layers} layers; use pp in "
                    f"{{{', '.join(map(str, options))}}} or give uneven stages, "
                    f"e.g. stages={_plus(_uneven_example(num_layers, self.pp))}"
                )
            counts = [num_layers // self.pp] * self.pp
        out, start = [], 0
        for n in counts:
            out.append(range(start, start + n))
            start += n
        return out

    def with_(self, **changes: object) -> ParallelConfig:
        """A copy with some fields changed (validated again)."""
        fields = {"tp": self.tp, "pp": self.pp, "dp": self.dp, "zero": self.zero,
                  "layers_per_stage": self.layers_per_stage}
        fields.update(changes)
        return ParallelConfig(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Device:
    """One accelerator: a host name and the device index on it."""

    host: str
    index: int

    def __str__(self) -> str:
        return f"{self.host}:{self.index}"


@dataclass(frozen=True)
class Placement:
    """Where ranks run: ranks fill ``hosts`` in order, ``gpus_per_host`` ranks each.

    Args:
        gpus_per_host: devices per host.
        hosts: host names in order; ``None`` names them ``host0``, ``host1``, ... as
            needed. A redeployment to other machines is a placement with other names.
    """

    gpus_per_host: int = 8
    hosts: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.gpus_per_host, bool) or not isinstance(self.gpus_per_host, int) \
                or self.gpus_per_host < 1:
            raise ValueError(f"gpus_per_host={self.gpus_per_host!r} must be a positive integer")
        if self.hosts is not None:
            object.__setattr__(self, "hosts", tuple(self.hosts))
            if len(set(self.hosts)) != len(self.hosts):
                raise ValueError(f"host names repeat in {list(self.hosts)}; give each host once")

    def host_index(self, rank: int) -> int:
        return rank // self.gpus_per_host

    def host(self, rank: int) -> str:
        index = self.host_index(rank)
        if self.hosts is None:
            return f"host{index}"
        if index >= len(self.hosts):
            raise ValueError(
                f"rank {rank} needs host #{index} but only {len(self.hosts)} hosts are given "
                f"({self.gpus_per_host} GPUs each); add hosts or lower the world size"
            )
        return self.hosts[index]

    def device(self, rank: int) -> Device:
        return Device(self.host(rank), rank % self.gpus_per_host)

    def hosts_for(self, world_size: int) -> list[str]:
        """Host names used by a world of ``world_size`` ranks, in order."""
        count = -(-world_size // self.gpus_per_host)
        return [self.host(h * self.gpus_per_host) for h in range(count)]

    def iter_devices(self, world_size: int) -> Iterator[Device]:
        return (self.device(r) for r in range(world_size))


def _plus(counts: Sequence[int]) -> str:
    return "+".join(str(c) for c in counts)


def _uneven_example(num_layers: int, pp: int) -> list[int]:
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]
