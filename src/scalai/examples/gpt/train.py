"""The training loop of the reference trainer: one process per rank, under torchrun.

Per step, each data-parallel replica reads its share of the global batch from the
dataset's global order (:class:`scalai.data.ElasticDataLoader`: micro-batches of rows, each
row with its sample id), runs it as micro-batches (through the pipeline schedule when
``pp > 1``, by gradient accumulation otherwise), and AdamW steps. Every rank reports the
ids of the rows it fed to its model (:func:`scalai.training.gather_fed`); rank 0 writes
them into the step's metrics row, so that exactly-once checks count what was read. The job state is a :class:`scalai.training.JobState`: ``--resume`` loads
it from a checkpoint of any layout, ``--save`` writes it when the run ends or is stopped
(``--stop-file``, ``SIGTERM``, ``SIGUSR1``), all ranks at the same step.

The loss logged for a step is the mean token cross-entropy over the whole global batch,
the same quantity under every layout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ...data import DataState, ElasticDataLoader, TokenDataset
from ...elastic.worker import ElasticWorker
from ...training import (FedSamples, StopFlag, agree, close, describe, find_checkpoint, gather_fed, load, save,
                         step_dir)
from .corpus import ensure_index
from .model import preset
from .options import TrainOptions
from .parallel import StageModel, build_stage, loss_fn, meta_stage

__all__ = ["train", "build", "describe_layout", "resume", "step", "Run", "lr_factor"]


def lr_factor(step: int, warmup: int, decay_steps: int) -> float:
    """LR multiplier before optimizer step ``step + 1``: linear warm-up, then cosine to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_step(sm: StageModel, micro_batches: list[dict], config: Any,
                device: str) -> tuple[torch.Tensor | None, list[int]]:
    """Forward and backward of one step on this replica's micro-batches (items of
    :class:`~scalai.data.ElasticDataLoader`: ``tokens`` ``int64[k, seq + 1]`` with their
    ``sample_ids``): the gradients, reduced over the replicas. The optimizer steps later,
    after the step's last collective (see :func:`step`).

    Each micro-batch's mean loss is weighted by its ``loss_scale`` (``k * dp /
    global_batch``), so that the summed, data-parallel-averaged gradient is the gradient of
    the global mean loss (through the pipeline schedule, the stage's loss function applies
    the same weight).

    Returns ``(loss, fed)``: on the last pipeline stage, this replica's weighted loss sum
    (its share of the global mean loss, times ``dp``), ``None`` elsewhere; and the sample
    ids of the rows this rank fed to its model (inputs on the first stage, targets on the
    last, none in between), in the order fed.
    """
    tokens = torch.cat([m["tokens"] for m in micro_batches]).to(device)  # [part, seq + 1]
    ids = torch.cat([m["sample_ids"] for m in micro_batches])  # [part]: travelled with the rows
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    sizes = [len(m["sample_ids"]) for m in micro_batches]
    fed: list[int] = []
    context = nullcontext()
    if config.tp > 1:
        from torch.distributed.tensor.parallel import loss_parallel

        context = loss_parallel()  # cross-entropy on vocabulary-sharded logits
    losses: list[torch.Tensor] = []
    with context:
        if sm.schedule is not None:  # the schedule weights each micro-batch through its loss_fn
            if sm.is_first:
                sm.schedule.step(inputs)
            elif sm.is_last:
                sm.schedule.step(target=targets, losses=losses)
            else:
                sm.schedule.step()
            if sm.is_first or sm.is_last:
                fed = ids.tolist()
        else:
            for i, (x, y, m) in enumerate(zip(inputs.split(sizes), targets.split(sizes), micro_batches)):
                if config.dp > 1:  # all-reduce / reduce-scatter once, after the last micro-batch
                    sm.module.set_requires_gradient_sync(i == len(sizes) - 1)
                loss = loss_fn(sm.module(x), y) * m["loss_scale"]
                loss.backward()
                losses.append(loss)
                fed += m["sample_ids"].tolist()
    if not sm.is_last:
        return None, fed
    values = [loss.full_tensor() if hasattr(loss, "full_tensor") else loss for loss in losses]
    return torch.stack([v.detach().double() for v in values]).sum(), fed


def _global_loss(loss: torch.Tensor | None, config: Any, device: str) -> float:
    """Mean loss over the global batch, on every rank (one all_reduce)."""
    box = torch.zeros(1, dtype=torch.float64, device=device)
    if loss is not None and config.coords(dist.get_rank()).tp == 0:
        box[0] = loss / config.dp
    dist.all_reduce(box)
    return float(box.item())


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def _save(job: Any, opts: TrainOptions, background: bool = False) -> int:
    """Save the job under ``--save``; ``background``: return once staged in host memory
    (the periodic saves of ``--save-every``: committed by the next save or at the end)."""
    target = step_dir(opts.save, job.step)
    report = save(job, target, background=background)
    how = "training waited" if background else "in"
    _say(f"saved step {job.step} to {target} ({report.total_bytes / 2**20:.2f} MiB from "
         f"{job.config.world_size} ranks; {how} {report.seconds['total']:.2f} s)")
    return job.step


@dataclass
class Run:
    """A built job on this rank: the parallelized stage, its optimizer and the job state.

    ``sizes`` are this replica's micro-batch sizes (samples); ``scale(n)`` is the weight
    of the mean loss of a micro-batch of ``n`` samples (see :func:`_train_step`). ``fed``:
    after a :func:`step`, on rank 0, the sample ids every rank fed its model in it.
    """

    opts: TrainOptions
    stage: StageModel
    job: Any
    optimizer: Any
    scheduler: Any
    index: Any
    sizes: list[int]
    scale: Callable[[int], float]
    device: str
    fed: FedSamples | None = None


def build(opts: TrainOptions) -> Run:
    """Open the corpus, build and parallelize the model, describe the job (collective)."""
    config, cfg = opts.config, preset(opts.model)
    rank = dist.get_rank()
    device = "cpu" if opts.device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    # Rank 0 builds the index if it is missing; the others open it once it exists.
    agree("data: build the corpus index", lambda: ensure_index(cfg.seq_len, opts.data) if rank == 0 else None)
    index = agree("data: open the corpus index", lambda: ensure_index(cfg.seq_len, opts.data))
    if index.seq_len != cfg.seq_len:
        raise ValueError(f"the index at {index.path} has seq_len={index.seq_len}; {opts.model} "
                         f"needs {cfg.seq_len}")
    division = opts.division
    sizes = division.micro_batch_sizes(config.coords(rank).dp).tolist()

    def scale(samples: int) -> float:
        return division.loss_scale(samples, "mean")

    def weighted_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, targets) * scale(targets.shape[0])

    stage = build_stage(cfg, config, seed=opts.seed, micro_batches=len(sizes), schedule=opts.schedule,
                        device=opts.device, loss=weighted_loss)
    optimizer = torch.optim.AdamW(stage.module.parameters(), lr=opts.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, opts.warmup, opts.decay_steps))
    job = describe(stage.module, optimizer, config, num_layers=cfg.layers, scheduler=scheduler,
                   data=DataState(seed=opts.seed, global_batch=opts.global_batch,
                                  num_samples=index.num_samples),
                   seed=opts.seed, extra={"model": opts.model})
    return Run(opts, stage, job, optimizer, scheduler, index, sizes, scale, device)


def describe_layout(opts: TrainOptions) -> Any:
    """The job's PTC under ``opts.layout`` without building it (collective): the stage is
    made on the meta device (:func:`~.parallel.meta_stage`), so this needs no memory and
    may run while other processes still hold the devices."""
    cfg = preset(opts.model)
    sm = meta_stage(cfg, opts.config, opts.device)
    optimizer = torch.optim.AdamW(sm.module.parameters(), lr=opts.lr)  # for the moments' specs
    return describe(sm.module, optimizer, opts.config, num_layers=cfg.layers).ptc


def resume(run: Run) -> None:
    """Load ``run.opts.resume`` (a checkpoint or a root) into the built job (collective)."""
    opts, job = run.opts, run.job
    source = agree("resume: find the checkpoint", lambda: find_checkpoint(opts.resume))
    report = load(job, source, verify=opts.verify)
    if job.extra.get("model", opts.model) != opts.model:
        raise ValueError(f"{source} holds a {job.extra['model']} job, not {opts.model}")
    if job.data.global_batch != opts.global_batch:
        raise ValueError(f"{source} was trained with a global batch of {job.data.global_batch}; "
                         f"resume with --global-batch {job.data.global_batch} to keep the trajectory")
    _say(f"resumed step {job.step} from {source} ({report.saved_layout} -> {job.config}, "
         f"{report.seconds['total']:.2f} s, RNG {report.rng})")


def step(run: Run, dataset: TokenDataset, updating: Callable[[], Any] = nullcontext) -> float:
    """One optimizer step of the job on this rank (collective): read this replica's share of
    the next global batch, forward and backward, AdamW and the LR schedule; advances
    ``run.job.step`` and ``run.job.data``, and sets ``run.fed`` (on rank 0: what every rank
    fed its model, a :class:`~scalai.training.FedSamples`). Returns the step's mean loss
    over the global batch.

    The optimizer steps after the step's last collective (the loss all-reduce), so that a
    peer failing during the step leaves this rank with the weights of the previous step.
    The update (optimizer, schedule, step counter, data position) runs inside
    ``updating()`` (:meth:`scalai.elastic.worker.ElasticWorker.updating` under ``scalai
    run``: an abort's dump never sees half of it).
    """
    job, config, division = run.job, run.opts.config, run.opts.division
    loader = ElasticDataLoader(dataset, job.data, config.dp, config.coords(dist.get_rank()).dp, steps=1,
                               micro_batch_size=division.micro_batch_size,
                               num_micro_batches=division.num_micro_batches)
    local, ids = _train_step(run.stage, list(loader), config, run.device)
    run.fed = gather_fed(ids, config)
    loss = _global_loss(local, config, run.device)  # the step's last collective
    with updating():
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        job.data, job.step = loader.state, job.step + 1
    return loss


def train(opts: TrainOptions, elastic: ElasticWorker | None = None) -> dict[str, Any]:
    """Run the job on this rank (the process group must be initialized); returns a summary:
    ``step`` reached, ``losses`` of the steps trained here, ``stopped`` (the reason or None)
    and, under ``scalai run`` (``elastic``) after a peer failed, ``dumped`` (the exit code).

    Each step's optimizer update comes after its last collective (the loss all-reduce): a
    failing peer therefore leaves every surviving rank with the weights of the last step
    it completed, which an elastic worker dumps for the runner (see
    :mod:`scalai.elastic.worker`).
    """
    if elastic is not None:
        from .parallel import preload

        elastic.started(dist.get_rank())
        preload(opts.config)  # while the previous generation's workers exit
        elastic.announce(lambda: describe_layout(opts))  # the target of the transformation
        elastic.wait_devices()
    run = build(opts)
    job, config = run.job, opts.config
    if elastic is not None:
        elastic.ready(job)
        report = elastic.resume(job, verify=opts.verify)
        if report is not None:
            _say(f"resumed step {job.step} from the stores ({report.saved_layout} -> {job.config}, "
                 f"{report.seconds['total']:.2f} s)")
    elif opts.resume:
        resume(run)
    dataset = TokenDataset(run.index)
    metrics = open(opts.metrics, "a") if opts.metrics and dist.get_rank() == 0 else None
    losses: list[float] = []
    stopped = None
    saved_step = job.step if (opts.resume or elastic is not None) else None  # never save a step twice
    # SIGINT too: Ctrl-C reaches every worker, and all of them stop after the same step.
    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    try:
        with (elastic.stop_flag(signals) if elastic else StopFlag(opts.stop_file, signals=signals)) as stop:
            try:
                while job.step < opts.steps:
                    start = time.perf_counter()
                    loss = step(run, dataset, elastic.updating if elastic is not None else nullcontext)
                    seconds = time.perf_counter() - start
                    losses.append(loss)
                    if metrics is not None:  # sample_ids: what the ranks fed their models
                        metrics.write(json.dumps({
                            "step": job.step, "loss": loss, "layout": str(config),
                            "samples": job.data.position, **run.fed.to_json(),
                            "step_time": round(seconds, 6), "lr": run.scheduler.get_last_lr()[0],
                            "time": time.time()}) + "\n")
                        metrics.flush()
                    if job.step % opts.log_every == 0 or job.step == opts.steps:
                        _say(f"step {job.step}/{opts.steps}  loss {loss:.4f}  {config}  {seconds:.3f} s")
                    if elastic is not None:
                        elastic.step_done(job, opts.steps)
                    elif opts.save_every and job.step % opts.save_every == 0 and job.step < opts.steps:
                        saved_step = _save(job, opts, background=True)
                    if job.step < opts.steps and stop.should_stop():
                        stopped = stop.reason
                        _say(f"stopping after step {job.step}: {stopped}")
                        break
            except Exception as exc:  # noqa: BLE001 - under scalai run: a peer (or its store) is gone
                # The weights are those of job.step (the optimizer steps after the step's last
                # collective), so the runner can restart from this rank's dump. Outside
                # scalai run, errors propagate as they are.
                if elastic is None:
                    raise
                return {"step": job.step, "losses": losses, "stopped": "peer failure",
                        "dumped": elastic.dump(job, exc)}
    finally:
        if metrics is not None:
            metrics.close()
    if elastic is not None:
        version = elastic.save(job)
        _say(f"saved step {job.step} to the stores as {version}")
    elif opts.save and job.step != saved_step:
        _save(job, opts)
    close(job)  # a background save still in flight is committed (or its failure raised)
    return {"step": job.step, "losses": losses, "stopped": stopped}


def main(opts: TrainOptions) -> int:
    """Entry point of one worker: join the process group, train, report errors as one line.
    Under ``scalai run``, a worker that dumped after a peer failed leaves through
    :meth:`ElasticWorker.exit <scalai.elastic.worker.ElasticWorker.exit>` (no teardown of the
    broken process group)."""
    from ...errors import ScalaiError
    from ...training import CollectiveError

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore", message=".*(torch.distributed.pipelining|_composable|experimental).*")
    backend = "nccl" if opts.device == "cuda" else "gloo"
    if opts.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        elastic = ElasticWorker.from_env()
    except ValueError as exc:  # SCALAI_* set partly, or unparsable: not launched by scalai run
        print(f"scalai train: error: {exc}", flush=True, file=sys.stderr)
        return 2
    dist.init_process_group(backend, timeout=elastic.timeout if elastic and elastic.timeout else timedelta(seconds=300))
    try:
        result = train(opts, elastic)
        if "dumped" in result:
            elastic.exit(result["dumped"])
        return 0
    except (ValueError, ScalaiError, OSError) as exc:
        if os.environ.get("SCALAI_DEBUG"):
            raise
        if dist.get_rank() == 0 or not isinstance(exc, CollectiveError):
            print(f"scalai train (rank {dist.get_rank()}): error: {exc}", flush=True, file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    finally:
        # No gc.collect() first (it took 0.5 s of the old workers' exit, on the critical path
        # of a change): the caller leaves with os._exit, so the model's gloo work objects held
        # in reference cycles are never freed by an interpreter teardown (where gloo's thread
        # destructors could abort a finished worker).
        dist.destroy_process_group()
