"""``scalai train``: the reference GPT trainer under torchrun; ``scalai plot``: its loss curve."""

from __future__ import annotations

import os
import signal

import click

from ..errors import ScalaiError
from .group import cli
from .output import console
from .params import COUNT, NON_NEGATIVE, POSITIVE_NUMBER, SEED

__all__ = ["TrainingFailed"]


class TrainingFailed(ScalaiError):
    """One or more training workers exited with an error."""


@cli.command("train")
@click.option("--layout", "-l", required=True, metavar="LAYOUT", help="parallel layout, e.g. tp=2,pp=2,dp=1[,zero=1]")
@click.option("--steps", type=COUNT, required=True, help="total optimizer steps of the job (a resumed run stops there too)")
@click.option("--model", "-m", default="gpt-tiny", show_default=True, help="gpt-tiny, gpt-small or gpt-bench")
@click.option("--save", type=click.Path(), default=None, help="checkpoint root (a directory or a URL, s3://BUCKET/PREFIX): state saved to SAVE/step-NNNNNN at the end or when stopped")
@click.option("--save-every", type=NON_NEGATIVE, default=0, show_default=True, help="also save every N steps, in the background (the next save or the end commits it)")
@click.option("--resume", type=click.Path(), default=None, help="checkpoint (or root: its latest step) to resume from, any layout")
@click.option("--metrics", type=click.Path(), default=None, help="append one JSON line per step to this file")
@click.option("--plot", type=click.Path(), default=None, help="write the loss curve of --metrics to this PNG at the end")
@click.option("--data", type=click.Path(), default=None, help="sample index (default: the stdlib corpus, built on first use)")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--global-batch", type=COUNT, default=8, show_default=True, help="samples per step over all replicas")
@click.option("--micro-batch", type=COUNT, default=4, show_default=True, help="largest micro-batch (samples)")
@click.option("--lr", type=POSITIVE_NUMBER, default=1e-3, show_default=True, help="peak learning rate")
@click.option("--schedule", type=click.Choice(["1f1b", "gpipe"]), default="1f1b", show_default=True)
@click.option("--stop-file", type=click.Path(), default=None, help="stop and save after the step at which this file exists")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def train(layout, steps, model, save, save_every, resume, metrics, plot, data, seed, global_batch,
          micro_batch, lr, schedule, stop_file, device) -> None:
    """Train the reference GPT with tp*pp*dp processes on this machine (torchrun).

    \b
    scalai train --layout tp=2,pp=2,dp=1 --steps 20 --save run/ckpt --metrics run/metrics.jsonl
    scalai train --layout tp=1,pp=1,dp=4 --steps 40 --resume run/ckpt --save run/ckpt --metrics run/metrics.jsonl
    scalai plot run/metrics.jsonl -o run/loss.png
    """
    from ..examples.gpt.options import TrainOptions

    if plot and not metrics:
        raise click.UsageError("--plot draws the --metrics file; give --metrics too")
    opts = TrainOptions(layout=layout, steps=steps, model=model, save=save, save_every=save_every,
                        resume=resume, metrics=metrics, data=data, seed=seed, global_batch=global_batch,
                        micro_batch=micro_batch, lr=lr, schedule=schedule, stop_file=stop_file, device=device)
    if resume:
        from ..training import find_checkpoint

        find_checkpoint(resume)  # fail here, in one line, before starting any worker
    if metrics:
        os.makedirs(os.path.dirname(os.path.abspath(metrics)), exist_ok=True)
    _prepare_data(opts)
    _launch(opts)
    if plot:
        from ..training.plot import plot_losses, read_metrics

        plot_losses(read_metrics(metrics), plot)
        console().print(f"loss curve written to {plot}")


def _prepare_data(opts) -> None:
    """Build the corpus index once, here, rather than racing in the workers."""
    from ..examples.gpt.corpus import default_index_path, ensure_index
    from ..examples.gpt.model import preset

    seq_len = preset(opts.model).seq_len
    path = opts.data or default_index_path(seq_len)
    if not os.path.isfile(os.path.join(path, "index.json")):
        console(stderr=True).print(f"indexing the standard-library corpus into {path} (once)")
    ensure_index(seq_len, path)


def _launch(opts) -> None:
    """Run ``python -m scalai.examples.gpt`` on tp*pp*dp local processes with torch's launcher."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from ..examples.gpt.options import to_argv

    world = opts.config.world_size
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker: workers share the cores
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
    if opts.device == "cuda":
        import torch

        if torch.cuda.device_count() < world:
            raise ValueError(f"{opts.layout} needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(world), "--module", "scalai.examples.gpt", *to_argv(opts)])
    try:
        run(args)
    except SignalException as exc:
        # torchrun forwarded the signal; the workers' StopFlag stopped them after the same step.
        name = signal.Signals(exc.sigval).name
        saved = " and saved" if opts.save else ""
        console(stderr=True).print(f"scalai: {name}: the workers stopped after the same step{saved}")
        raise click.exceptions.Exit(128 + int(exc.sigval)) from None
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        ranks = sorted(exc.failures)
        raise TrainingFailed(f"training failed on rank(s) {', '.join(map(str, ranks))} (exit code "
                             f"{', '.join(map(str, codes))}); the workers' messages are above") from None


@cli.command("plot")
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(), help="PNG file to write")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="metrics of an unchanged run, overlaid with the relative difference per step")
@click.option("--title", default=None)
def plot(metrics, out, reference, title) -> None:
    """Plot the loss curve of METRICS (metrics.jsonl files) to a PNG, layouts coloured, changes marked."""
    from ..training.plot import plot_losses, read_metrics, relative_differences

    records = read_metrics(metrics)
    ref = read_metrics(reference) if reference else None
    plot_losses(records, out, ref, title)
    say = console().print
    layouts = []
    for r in records:
        if not layouts or layouts[-1][0] != r.get("layout"):
            layouts.append((r.get("layout"), r["step"]))
    say(f"{len(records)} steps, layouts: " + " -> ".join(f"{l} (from step {s})" for l, s in layouts))
    if ref:
        diff = relative_differences(records, ref)
        if diff:
            worst = max(diff, key=diff.get)
            say(f"max relative difference to the reference: {diff[worst]:.2e} at step {worst} "
                f"({len(diff)} steps compared)")
    say(f"wrote {out}")
