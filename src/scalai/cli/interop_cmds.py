"""Checkpoints in and out: ``scalai import hf|megatron|dcp`` and ``scalai export hf|dcp``; what
``scalai inspect`` and ``scalai reshard`` do with a PyTorch DCP directory."""

from __future__ import annotations

import os

import click

from .group import cli
from .output import console, emit_json, human_bytes, layout_option
from .params import COUNT, SIZE

__all__ = ["import_group", "export_group", "rules_option", "rules_from", "dcp_model_option", "dcp_source",
           "inspect_dcp", "reshard_dcp"]


@cli.group("import")
def import_group() -> None:
    """Write a checkpoint of another framework as a scalai checkpoint in any layout."""


@cli.group("export")
def export_group() -> None:
    """Write a scalai checkpoint (any layout) in another framework's format."""


def rules_from(path: str | None):
    """The rules file at ``path`` (``None``: none)."""
    from ..interop.rules import load_rules

    return load_rules(path) if path else None


def _report(conv, what: str, as_json: bool) -> None:
    if as_json:
        emit_json(conv.to_json())
        return
    where = {"hf": "a Hugging Face directory", "dcp": "a PyTorch DCP directory"}.get(conv.layout, conv.layout)
    click.echo(f"{what}: wrote {conv.output} ({where}): {conv.tensors} tensors, {human_bytes(conv.bytes)} "
               f"in {conv.seconds['total']:.2f} s")


rules_option = click.option("--rules", "rules_path", type=click.Path(dir_okay=False),
                            help="rules file: how the foreign tensor names map onto scalai's (docs/interop.md)")
dcp_model_option = click.option("--model", "-m", default=None,
                                help="the scalai model a DCP checkpoint holds under scalai's own names "
                                     "(as scalai synth names it)")


def dcp_source(ckpt: str, model: str | None, rules_path: str | None) -> bool:
    """Whether ``ckpt`` is a PyTorch DCP directory; ``--model``/``--rules`` only apply to one."""
    from ..interop.dcp import is_dcp_directory
    from ..locations import is_directory

    if is_directory(ckpt) and is_dcp_directory(ckpt):
        return True
    if model is not None or rules_path is not None:
        raise ValueError(f"--model and --rules say how a PyTorch DCP checkpoint maps onto scalai's tensors; "
                         f"{ckpt} is not one (a scalai checkpoint knows its own layout): leave them out")
    return False


def _unmapped(tensor: dict, unmapped: dict) -> str:
    if tensor["role"] == "step":
        return "- (Adam's step count: the checkpoint's step)"
    return f"- ({unmapped.get(tensor['key'], 'not taken')})"


def inspect_dcp(ckpt: str, model: str | None, rules_path: str | None, verify: bool, show_tensors: bool,
                as_json: bool) -> None:
    """``scalai inspect`` of a PyTorch DCP directory: its tensors, chunks and bytes, and what
    each maps to (:func:`~scalai.interop.dcp.open.dcp_summary`)."""
    from ..interop.dcp.open import dcp_summary, open_dcp

    import time

    from ..storage.verify import verify_source

    with open_dcp(ckpt, rules=rules_from(rules_path), model=model) as source:
        info = dcp_summary(source, tensors=show_tensors or as_json)
        if verify:
            t0 = time.perf_counter()
            verify_source(source)
            info["verified"] = {"checksums": sum(source.checksum(r, n) is not None for (r, n) in source.layout.slots),
                                "chunks": len(source.layout.slots), "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        emit_json(info)
        return
    out = console()
    out.print(f"[bold]{info['checkpoint']}[/bold]")
    out.print(f"  format     PyTorch DCP (version {info['version'] or 'not recorded'}), {info['files']} data files")
    out.print(f"  tensors    {info['tensors']} in {info['chunks']} chunks ({info['parameters']} parameters, "
              f"{info['optimizer_tensors']} optimizer tensors), {info['objects']} other values")
    out.print(f"  bytes      {human_bytes(info['bytes'])}")
    out.print(f"  step       {info['step']} (Adam's step count)" if info["optimizer_tensors"] else
              "  step       not recorded (no optimizer state)")
    how = (f"{info['num_layers']} layers, ready to lay out (scalai reshard {ckpt} OUT --to L)" if info["laid_out"]
           else "named as stored; give --model M or --rules FILE to lay it out")
    out.print(f"  scalai     {info['scalai_tensors']} tensors, {how}")
    if info["unmapped"]:
        out.print(f"  unmapped   {len(info['unmapped'])} keys (--tensors or --json: which and why)")
    if verify:
        v = info["verified"]
        unchecked = v["chunks"] - v["checksums"]
        out.print(f"  verified   {v['checksums']} chunks match the CRC-32 their archive records"
                  f"{f' ({unchecked} record none)' if unchecked else ''} ({v['seconds']:.2f} s)")
    if show_tensors:
        from rich.table import Table

        table = Table("key", "shape", "dtype", "chunks", "bytes", "scalai tensor", box=None)
        for t in info["tensor_list"]:
            table.add_row(t["key"], "x".join(map(str, t["shape"])), t["dtype"], str(t["chunks"]),
                          human_bytes(t["bytes"]), t["maps_to"] or _unmapped(t, info["unmapped"]))
        out.print(table)

def reshard_dcp(ckpt: str, out: str, to_layout, model: str | None, rules_path: str | None, workers: int | None,
                verify: bool, as_json: bool) -> None:
    """``scalai reshard`` of a PyTorch DCP directory: ``scalai import dcp`` under reshard's name
    (``verify``: the chunks' CRC-32s checked first, as reshard checks a scalai checkpoint's)."""
    from ..interop.convert import import_dcp

    conv = import_dcp(ckpt, out, to_layout, model=model, rules=rules_from(rules_path), workers=workers,
                      verify=verify)
    if as_json:
        emit_json({"from": "dcp", "to": str(to_layout), **conv.to_json()})
    else:
        click.echo(f"dcp -> {to_layout}: wrote {conv.output}: {conv.tensors} tensors, "
                   f"{human_bytes(conv.bytes)} in {conv.seconds['total']:.2f} s")


@import_group.command("hf")
@click.argument("model_dir", type=click.Path())
@click.argument("out", type=click.Path())
@layout_option("--layout", "-l")
@rules_option
@click.option("--workers", "-j", type=COUNT, default=None, help="copy threads (default: one per core, <= 8)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def import_hf_cmd(model_dir: str, out: str, layout, rules_path: str | None, workers: int | None,
                  as_json: bool) -> None:
    """Import the Hugging Face model in MODEL_DIR (config.json and safetensors, single or
    sharded) as checkpoint OUT in LAYOUT.

    Llama-style (llama) and GPT-2-style (gpt2) models are built in; other models need
    --rules. Separate q/k/v and gate/up become scalai's fused tensors, the vocabulary is
    padded as LAYOUT needs, tied embeddings stay tied. Tensors stream through a few
    buffers: the whole model is never in memory.
    """
    from ..interop.convert import import_hf

    conv = import_hf(model_dir, out, layout, rules=rules_from(rules_path), workers=workers)
    _report(conv, f"imported {os.path.basename(os.path.abspath(model_dir))}", as_json)


@import_group.command("megatron")
@click.argument("path", type=click.Path())
@click.argument("out", type=click.Path())
@layout_option("--layout", "-l")
@click.option("--vocab-size", type=COUNT, default=None,
              help="the tokenizer's vocabulary (Megatron saves only the padded one, used otherwise)")
@click.option("--weights-only", is_flag=True, help="leave the optimizer state out")
@rules_option
@click.option("--workers", "-j", type=COUNT, default=None, help="copy threads (default: one per core, <= 8)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def import_megatron_cmd(path: str, out: str, layout, vocab_size: int | None, weights_only: bool,
                        rules_path: str | None, workers: int | None, as_json: bool) -> None:
    """Import the legacy Megatron-LM checkpoint under PATH (mp_rank_XX[_YYY]/model_optim_rng.pt;
    a save directory, or one iter_* directory of it) as checkpoint OUT in LAYOUT: weights,
    fp32 masters and Adam state, and the iteration as the step.

    Files are read without running code from them: anything beyond tensors and plain data
    is refused.
    """
    from ..interop.convert import import_megatron

    conv = import_megatron(path, out, layout, vocab_size=vocab_size, weights_only=weights_only,
                           rules=rules_from(rules_path), workers=workers)
    _report(conv, f"imported {os.path.basename(os.path.abspath(path))}", as_json)


@import_group.command("dcp")
@click.argument("path", type=click.Path())
@click.argument("out", type=click.Path())
@layout_option("--layout", "-l")
@dcp_model_option
@rules_option
@click.option("--workers", "-j", type=COUNT, default=None, help="copy threads (default: one per core, <= 8)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def import_dcp_cmd(path: str, out: str, layout, model: str | None, rules_path: str | None, workers: int | None,
                   as_json: bool) -> None:
    """Import the PyTorch Distributed Checkpoint (torch.distributed.checkpoint.save) in directory
    PATH as checkpoint OUT in LAYOUT: parameters, Adam's exp_avg/exp_avg_sq and the step.

    DCP records the boxes each rank saved, not how the model splits: give --rules FILE (its
    keys as scalai tensors and their splits) or --model M (a scalai model under its own
    names). Every window of OUT is read from the stored chunks that overlap it, in place:
    nothing is consolidated. .metadata is unpickled through an allow-list of DCP's own
    classes: a file that names anything else is refused, nothing in it runs.
    """
    from ..interop.convert import import_dcp

    conv = import_dcp(path, out, layout, model=model, rules=rules_from(rules_path), workers=workers)
    _report(conv, f"imported {os.path.basename(os.path.abspath(path))}", as_json)


@export_group.command("hf")
@click.argument("ckpt", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--max-shard-size", "max_shard_bytes", default="5G", show_default=True, type=SIZE,
              help="largest safetensors file (e.g. 500M, 2G: powers of 1024), as save_pretrained's max_shard_size")
@rules_option
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="config.json to write (default: the imported model's, or the HF counterpart of the scalai model)")
@click.option("--workers", "-j", type=COUNT, default=None, help="copy threads (default: one per core, <= 8)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def export_hf_cmd(ckpt: str, out: str, max_shard_bytes: int, rules_path: str | None, config_path: str | None,
                  workers: int | None, as_json: bool) -> None:
    """Export the weights of checkpoint CKPT (any layout) as Hugging Face directory OUT, which
    transformers' from_pretrained loads: un-fused, un-padded tensors in safetensors files
    (with an index when there are several) and config.json. The optimizer state stays behind.
    """
    from ..interop.convert import export_hf
    from ..interop.hf_files import read_config

    config = read_config(config_path) if config_path else None
    conv = export_hf(ckpt, out, rules=rules_from(rules_path), config=config, max_shard_bytes=max_shard_bytes,
                     workers=workers)
    _report(conv, f"exported {os.path.basename(os.path.abspath(ckpt))}", as_json)


@export_group.command("dcp")
@click.argument("ckpt", type=click.Path())
@click.argument("out", type=click.Path())
@rules_option
@click.option("--weights-only", is_flag=True, help="leave the optimizer state out")
@click.option("--workers", "-j", type=COUNT, default=None, help="copy threads (default: one per core, <= 8)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def export_dcp_cmd(ckpt: str, out: str, rules_path: str | None, weights_only: bool, workers: int | None,
                   as_json: bool) -> None:
    """Export checkpoint CKPT (any layout) as PyTorch Distributed Checkpoint directory OUT, which
    torch.distributed.checkpoint.load reads into a model of any DTensor layout: model.<key>
    and optim.state.<key>.exp_avg|exp_avg_sq|step, as get_state_dict names them. Each tensor
    is written in the boxes CKPT stores it in (one chunk each): nothing is consolidated.
    """
    from ..interop.convert import export_dcp

    conv = export_dcp(ckpt, out, rules=rules_from(rules_path), weights_only=weights_only, workers=workers)
    _report(conv, f"exported {os.path.basename(os.path.abspath(ckpt))}", as_json)
