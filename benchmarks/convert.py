"""Conversions in and out of scalai against the peers' own tools: time and peak memory.

One run prints one table measured in that run. Every conversion is a row: scalai's way and
the peers' way of doing the same conversion of the same model on the same storage, each
side in a process of its own, so that each side's memory is its own: the child imports
what it needs, then the clock starts, the conversion runs, the clock stops. Columns:
seconds (median of the rounds, min-max), the peak resident memory of the child (VmHWM:
the interpreter and its imports included, as a user sees it), the peak above what the
child held after its imports (the conversion's own memory; it counts the pages of files
the child maps, which are the kernel's cache: scalai reads checkpoints through mappings),
the peak of its private (anonymous) memory above the same point (sampled every 2 ms), and
the ratios peer / scalai (above 1: scalai is faster, or smaller).

Hugging Face rows (a random GPT-2 of gpt2-small's shape, made with transformers and
saved with ``save_pretrained`` before timing, fp32; ``--layers`` shrinks it for
development):

- **HF import** into ``--layout`` (default ``tp=2,pp=2,dp=1``):
  **scalai**: ``scalai.interop.convert.import_hf`` (what ``scalai import hf`` runs): one
  plan from the directory's files, read with ``pread`` a block at a time, into a scalai
  checkpoint (CRC-32 per block while it is in cache, fsync at commit).
  **peers**: what a user does today to split it: ``from_pretrained`` (the whole model in
  memory), then for every rank its tensors cut by hand as Megatron lays them out (QKV
  interleaved per head, vocabulary padded, rows or columns of each linear), each saved
  with ``safetensors.torch.save_file`` (no fsync, no checksums); replicas are saved once,
  as scalai saves them (fewer bytes for the peer than a plain per-rank save). Its rank
  files are checked equal, tensor by tensor, to scalai's before anything is timed.
- **HF export** of that checkpoint: **scalai**: ``export_hf`` (``scalai export hf``): one
  plan from the rank files into ``save_pretrained``'s layout (5 GB shards, fsync).
  **peers, merge + save_pretrained**: every rank file read whole (``safetensors``),
  full tensors assembled by hand, loaded into a ``GPT2LMHeadModel`` built on the meta
  device (``load_state_dict(assign=True)``), ``save_pretrained`` (no fsync).
  **peers, from_pretrained + save_pretrained**: transformers' own round trip of the
  same model, no layout involved: the floor of any conversion through transformers.
  Every output loads with ``from_pretrained`` to the original weights (checked once,
  untimed).

DCP row (the same GPT-2's ``state_dict`` saved with ``dcp.save`` under ``model.``, before
timing; one process, so each tensor is one chunk):

- **DCP import** into ``--layout``: **scalai**: ``import_dcp`` (``scalai import dcp
  --rules``, the built-in GPT-2 rules): one plan from the chunks, read with ``pread`` in
  place (no ``torch.load``), into a scalai checkpoint. **peers**: torch's own
  consolidation, ``dcp_to_torch_save`` (one ``.pt`` of the whole state), ``torch.load``
  of it, then the same split by hand as the HF import's peers (``safetensors``, replicas
  once). Its rank files are checked equal to scalai's import before timing.

scalai syncs its outputs (its default, as the CLI runs); ``--no-sync`` drops that for a
like-for-like comparison with the peers, which never fsync. Threads: scalai's default
(one per core, at most 8); torch's own intra-op threads for the peers.

Usage::

    .venv/bin/python benchmarks/convert.py                       # gpt2-small, 3 rounds
    .venv/bin/python benchmarks/convert.py --layers 2 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Stats, choose_workdir, log, machine_description, print_table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- the child: one side of one conversion, in a process of its own --------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _child(side: str, args: dict) -> None:
    """Run one side (a function of :data:`SIDES`) and print its JSON measurement; a thread
    samples the private (anonymous) resident memory every 2 ms meanwhile."""
    import threading

    prepare = SIDES[side]
    run = prepare(args)  # imports and untimed setup
    base, anon_base = _status("VmRSS"), _status("RssAnon")
    anon, done = [anon_base], []

    def sample() -> None:
        while not done:
            anon[0] = max(anon[0], _status("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    nbytes = run()
    seconds = time.perf_counter() - t0
    done.append(True)
    sampler.join()
    peak = _status("VmHWM")
    print(json.dumps({"seconds": seconds, "peak": peak, "above": max(0, peak - base),
                      "private": max(0, anon[0] - anon_base), "bytes": nbytes}))


# -- HF import ----------------------------------------------------------------------------------

def scalai_hf_import(args: dict) -> Callable[[], int]:
    from scalai.interop.convert import import_hf

    def run() -> int:
        return import_hf(args["hf"], args["out"], args["layout"], sync=args["sync"]).bytes
    return run


def peers_hf_import(args: dict) -> Callable[[], int]:
    """from_pretrained, then every rank's tensors cut by hand and saved with safetensors."""
    import safetensors.torch  # noqa: F401  (imported before the clock)
    from transformers import GPT2LMHeadModel

    from scalai.config import ParallelConfig

    layout = ParallelConfig.parse(args["layout"])

    def run() -> int:
        model = GPT2LMHeadModel.from_pretrained(args["hf"])
        cfg = model.config
        state = model.state_dict()
        os.makedirs(args["out"])
        return _save_split(state, cfg, layout, args)
    return run


def _save_split(state: dict, cfg, layout, args: dict) -> int:
    """Every rank's tensors cut by hand (:func:`_megatron_ranks`), each rank saved with
    ``safetensors`` into ``args["out"]``; the bytes saved."""
    from safetensors.torch import save_file

    total = 0
    for rank, tensors in _megatron_ranks(state, cfg, layout, args["owners"]):
        save_file(tensors, os.path.join(args["out"], f"rank-{rank:05d}.safetensors"))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total


def _megatron_ranks(state: dict, cfg, layout, owners: dict):
    """``(rank, {scalai name: local tensor})`` for every rank, cut as Megatron lays GPT-2 out:
    the user's own splitting script (it knows the layout; it uses no scalai code). Only the
    tensors ``owners`` says a rank stores (each replica once, as scalai stores it)."""
    import torch

    tp, pp = layout.tp, layout.pp
    h, heads, layers = cfg.n_embd, cfg.n_head, cfg.n_layer
    hd = h // heads
    padded = -(-cfg.vocab_size // (128 * tp)) * 128 * tp
    per_stage = layers // pp

    def rows(t, r):
        n = t.shape[0] // tp
        return t[r * n:(r + 1) * n].contiguous()

    def cols(t, r):
        n = t.shape[1] // tp
        return t[:, r * n:(r + 1) * n].contiguous()

    def qkv(t, r):  # [3h, ...] -> this rank's heads, each [q_h; k_h; v_h] (Megatron's order)
        q, k, v = t.split(h)
        mine = range(r * heads // tp, (r + 1) * heads // tp)
        return torch.cat([x[i * hd:(i + 1) * hd] for i in mine for x in (q, k, v)]).contiguous()

    wte = torch.nn.functional.pad(state["transformer.wte.weight"], (0, 0, 0, padded - cfg.vocab_size))
    for stage in range(pp):
        for r in range(tp):
            rank = layout.rank(r, 0, stage)
            out = {}
            if stage in (0, pp - 1):
                out["embedding.word_embeddings.weight"] = rows(wte, r)
            if stage == 0:
                out["embedding.position_embeddings.weight"] = state["transformer.wpe.weight"]
            for i in range(stage * per_stage, (stage + 1) * per_stage):
                p, d = f"transformer.h.{i}.", f"decoder.layers.{i}."
                out[d + "input_layernorm.weight"] = state[p + "ln_1.weight"]
                out[d + "input_layernorm.bias"] = state[p + "ln_1.bias"]
                out[d + "self_attention.linear_qkv.weight"] = qkv(state[p + "attn.c_attn.weight"].T, r)
                out[d + "self_attention.linear_qkv.bias"] = qkv(state[p + "attn.c_attn.bias"], r)
                out[d + "self_attention.linear_proj.weight"] = cols(state[p + "attn.c_proj.weight"].T, r)
                out[d + "self_attention.linear_proj.bias"] = state[p + "attn.c_proj.bias"]
                out[d + "pre_mlp_layernorm.weight"] = state[p + "ln_2.weight"]
                out[d + "pre_mlp_layernorm.bias"] = state[p + "ln_2.bias"]
                out[d + "mlp.linear_fc1.weight"] = rows(state[p + "mlp.c_fc.weight"].T, r)
                out[d + "mlp.linear_fc1.bias"] = rows(state[p + "mlp.c_fc.bias"], r)
                out[d + "mlp.linear_fc2.weight"] = cols(state[p + "mlp.c_proj.weight"].T, r)
                out[d + "mlp.linear_fc2.bias"] = state[p + "mlp.c_proj.bias"]
            if stage == pp - 1:
                out["decoder.final_layernorm.weight"] = state["transformer.ln_f.weight"]
                out["decoder.final_layernorm.bias"] = state["transformer.ln_f.bias"]
            yield rank, {n: t.contiguous() for n, t in out.items() if owners[n][str(rank)] == rank}


# -- HF export ----------------------------------------------------------------------------------

def scalai_hf_export(args: dict) -> Callable[[], int]:
    from scalai.interop.convert import export_hf

    def run() -> int:
        return export_hf(args["ckpt"], args["out"], sync=args["sync"]).bytes
    return run


def peers_merge_save_pretrained(args: dict) -> Callable[[], int]:
    """Every rank file read whole, full tensors assembled by hand, save_pretrained."""
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config.from_pretrained(args["hf"])
    tp, pp = args["tp"], args["pp"]

    def run() -> int:
        ranks = {r: load_file(os.path.join(args["ckpt"], f"rank-{r:05d}.safetensors")) for r in range(tp * pp)}
        owners = args["owners"]

        def local(name, r):
            return ranks[owners[name][str(r)]][name]

        h, heads = cfg.n_embd, cfg.n_head
        hd, per_stage = h // heads, cfg.n_layer // pp
        state = {}
        wte = torch.cat([local("embedding.word_embeddings.weight", t) for t in range(tp)])[:cfg.vocab_size]
        state["transformer.wte.weight"] = wte
        state["transformer.wpe.weight"] = local("embedding.position_embeddings.weight", 0)
        for i in range(cfg.n_layer):
            rank0 = (i // per_stage) * tp
            p, d = f"transformer.h.{i}.", f"decoder.layers.{i}."
            parts = lambda n: [local(d + n, rank0 + t) for t in range(tp)]  # noqa: E731

            def unqkv(pieces):  # each rank: [q_h; k_h; v_h] per head -> [Q; K; V]
                per = torch.cat(pieces).reshape(heads, 3, hd, *pieces[0].shape[1:])
                return torch.cat([per[:, j].reshape(h, *pieces[0].shape[1:]) for j in range(3)])

            state[p + "ln_1.weight"], state[p + "ln_1.bias"] = local(d + "input_layernorm.weight", rank0), \
                local(d + "input_layernorm.bias", rank0)
            state[p + "attn.c_attn.weight"] = unqkv(parts("self_attention.linear_qkv.weight")).T.contiguous()
            state[p + "attn.c_attn.bias"] = unqkv(parts("self_attention.linear_qkv.bias"))
            state[p + "attn.c_proj.weight"] = torch.cat(parts("self_attention.linear_proj.weight"), 1).T.contiguous()
            state[p + "attn.c_proj.bias"] = local(d + "self_attention.linear_proj.bias", rank0)
            state[p + "ln_2.weight"], state[p + "ln_2.bias"] = local(d + "pre_mlp_layernorm.weight", rank0), \
                local(d + "pre_mlp_layernorm.bias", rank0)
            state[p + "mlp.c_fc.weight"] = torch.cat(parts("mlp.linear_fc1.weight")).T.contiguous()
            state[p + "mlp.c_fc.bias"] = torch.cat(parts("mlp.linear_fc1.bias"))
            state[p + "mlp.c_proj.weight"] = torch.cat(parts("mlp.linear_fc2.weight"), 1).T.contiguous()
            state[p + "mlp.c_proj.bias"] = local(d + "mlp.linear_fc2.bias", rank0)
        last = (pp - 1) * tp
        state["transformer.ln_f.weight"] = local("decoder.final_layernorm.weight", last)
        state["transformer.ln_f.bias"] = local("decoder.final_layernorm.bias", last)
        with torch.device("meta"):
            model = GPT2LMHeadModel(cfg)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model.save_pretrained(args["out"])
        return sum(t.numel() * t.element_size() for t in state.values())
    return run


def peers_from_pretrained_save_pretrained(args: dict) -> Callable[[], int]:
    from transformers import GPT2LMHeadModel

    def run() -> int:
        model = GPT2LMHeadModel.from_pretrained(args["hf"])
        model.save_pretrained(args["out"])
        return sum(t.numel() * t.element_size() for t in model.state_dict().values()
                   if t.data_ptr() != model.lm_head.weight.data_ptr() or t is model.transformer.wte.weight)
    return run


# -- DCP import -----------------------------------------------------------------------------------

def scalai_dcp_import(args: dict) -> Callable[[], int]:
    import torch.distributed.checkpoint  # noqa: F401  (DCP's metadata classes: imports happen before the clock)

    from scalai.interop.convert import import_dcp
    from scalai.interop.hf_files import read_config
    from scalai.interop.hf_models import hf_rules

    rules = hf_rules(read_config(os.path.join(args["hf"], "config.json")), "config.json")

    def run() -> int:
        return import_dcp(args["dcp"], args["out"], args["layout"], rules=rules, sync=args["sync"]).bytes
    return run


def peers_dcp_import(args: dict) -> Callable[[], int]:
    """dcp_to_torch_save (torch consolidates the checkpoint into one file), torch.load,
    then every rank's tensors cut by hand and saved with safetensors."""
    import torch
    import safetensors.torch  # noqa: F401  (imported before the clock)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import GPT2Config

    from scalai.config import ParallelConfig

    layout = ParallelConfig.parse(args["layout"])
    cfg = GPT2Config.from_pretrained(args["hf"])

    def run() -> int:
        os.makedirs(args["out"])
        whole = os.path.join(args["out"], "consolidated.pt")
        dcp_to_torch_save(args["dcp"], whole)
        state = torch.load(whole, weights_only=True)["model"]
        return _save_split(state, cfg, layout, args)
    return run


#: Every side of every conversion, by name: ``prepare(args) -> run() -> bytes written``.
SIDES: dict[str, Callable[[dict], Callable[[], int]]] = {
    "scalai_hf_import": scalai_hf_import,
    "peers_hf_import": peers_hf_import,
    "scalai_hf_export": scalai_hf_export,
    "peers_merge_save_pretrained": peers_merge_save_pretrained,
    "peers_from_pretrained_save_pretrained": peers_from_pretrained_save_pretrained,
    "scalai_dcp_import": scalai_dcp_import,
    "peers_dcp_import": peers_dcp_import,
}


# -- the harness ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One conversion: its sides (first: scalai's), their samples."""

    conversion: str
    sides: list[tuple[str, str]]  # (label, side name)
    samples: dict[str, list[dict]] = field(default_factory=dict)


def measure(side: str, args: dict) -> dict:
    """One side, once, in a fresh child process; its JSON measurement."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side, json.dumps(args)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_rows(rows: list[Row], args_of: Callable[[str, int], dict], repeats: int) -> None:
    """Every side of every row, ``repeats`` rounds, sides in a rotated order each round;
    outputs removed after each measurement."""
    for k in range(repeats):
        for row in rows:
            sides = row.sides[k % len(row.sides):] + row.sides[:k % len(row.sides)]
            for label, side in sides:
                args = args_of(side, k)
                log(f"round {k + 1}/{repeats}: {row.conversion}: {label}")
                row.samples.setdefault(label, []).append(measure(side, args))
                shutil.rmtree(args["out"], ignore_errors=True)


def table(rows: list[Row], fmt: str) -> None:
    headers = ["conversion", "side", "seconds (median, min–max)", "peak RSS MiB", "above imports MiB",
               "private above imports MiB", "peer / scalai time", "peer / scalai peak RSS"]
    out, sections = [], []
    for row in rows:
        sections.append(len(out))
        ours = row.samples[row.sides[0][0]]
        base_t = Stats.of([s["seconds"] for s in ours]).median
        base_m = max(s["peak"] for s in ours)
        for label, _ in row.sides:
            samples = row.samples[label]
            st = Stats.of([s["seconds"] for s in samples])
            peak = max(s["peak"] for s in samples)
            above = max(s["above"] for s in samples)
            private = max(s["private"] for s in samples)
            first = label == row.sides[0][0]
            out.append([row.conversion, label, f"{st.median:.2f} ({st.min:.2f}–{st.max:.2f})", f"{peak / 2**20:.0f}",
                        f"{above / 2**20:.0f}", f"{private / 2**20:.0f}", "" if first else f"{st.median / base_t:.2f}x",
                        "" if first else f"{peak / base_m:.2f}x"])
    print_table("conversions: each side in its own process", headers, out, sections, fmt)


# -- setup ------------------------------------------------------------------------------------------

def _make_gpt2(path: str, layers: int | None) -> int:
    """A random GPT-2 of gpt2-small's shape (``layers`` fewer for development), saved."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers or 12)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _save_dcp(hf: str, out: str) -> None:
    """The model's ``state_dict`` saved with ``dcp.save`` (one process) under ``model.``."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": yes
        dcp.save({"model": model.state_dict()}, checkpoint_id=out, no_dist=True)


def _check_split(ckpt: str, split: str) -> None:
    """Untimed: the peers' rank files in ``split`` equal scalai's checkpoint ``ckpt`` rank by
    rank, and hold every tensor it stores."""
    import torch
    from safetensors.torch import load_file

    from scalai.checkpoint import Checkpoint
    from scalai.storage.arrays import to_torch

    with Checkpoint.open(ckpt) as c:
        for rank in range(c.ptc.config.world_size):
            theirs = load_file(os.path.join(split, f"rank-{rank:05d}.safetensors"))
            if set(theirs) != set(c.stored(rank)):
                raise AssertionError(f"{split}: rank {rank} holds other tensors than {ckpt}")
            for name, tensor in theirs.items():
                ours = to_torch(c.view(rank, name), c.ptc.spec(name).dtype)
                if not torch.equal(ours, tensor):
                    raise AssertionError(f"{split} and {ckpt} differ: {name} of rank {rank}")


def _check_outputs(work: str, layout: str) -> None:
    """Untimed: the peers' splits equal scalai's imports (HF and DCP) rank by rank; both
    exports load with from_pretrained to the original weights."""
    import torch
    from transformers import GPT2LMHeadModel

    _check_split(os.path.join(work, "ckpt"), os.path.join(work, "check-import"))
    _check_split(os.path.join(work, "check-dcp"), os.path.join(work, "check-dcp-split"))
    _check_split(os.path.join(work, "ckpt"), os.path.join(work, "check-dcp-split"))
    original = GPT2LMHeadModel.from_pretrained(os.path.join(work, "hf")).state_dict()
    for out in ("check-export", "check-merge"):
        back = GPT2LMHeadModel.from_pretrained(os.path.join(work, out)).state_dict()
        for name, tensor in original.items():
            if not torch.equal(back[name], tensor):
                raise AssertionError(f"{out}: {name} differs from the original")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="GPT-2 layers (default 12: gpt2-small)")
    p.add_argument("--layout", default="tp=2,pp=2,dp=1", help="import layout (default tp=2,pp=2,dp=1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--no-sync", action="store_true", help="scalai does not fsync (the peers never do)")
    p.add_argument("--workdir", help="scratch parent directory (default /dev/shm when it has room, else /tmp)")
    p.add_argument("--format", choices=("rich", "markdown", "plain"), default="rich")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "ARGS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], json.loads(a.child[1]))
        return 0
    from scalai.config import ParallelConfig
    from scalai.interop.convert import export_hf, import_hf

    try:
        layout = ParallelConfig.parse(a.layout)
    except ValueError as exc:
        print(f"convert.py: {exc}", file=sys.stderr)
        return 2
    size = 500 << 20 if not a.layers else (a.layers * 30 + 160) << 20
    work, where = choose_workdir(12 * size, 6 * size, a.workdir, "scalai-bench-convert")
    try:
        log(f"scratch: {where}")
        nbytes = _make_gpt2(os.path.join(work, "hf"), a.layers)
        log(f"GPT-2 ({a.layers or 12} layers, {nbytes / 2**20:.0f} MiB fp32) saved; reference import")
        import_hf(os.path.join(work, "hf"), os.path.join(work, "ckpt"), layout, sync=False)
        from scalai.checkpoint import Checkpoint

        with Checkpoint.open(os.path.join(work, "ckpt")) as c:
            owners = {s.name: {str(r): c.stored_in(r, s.name) for r in range(layout.world_size)
                               if s.name in dict(c.ptc.rank_shards(r))} for s in c.ptc.specs}
        _save_dcp(os.path.join(work, "hf"), os.path.join(work, "dcp"))
        common = {"hf": os.path.join(work, "hf"), "ckpt": os.path.join(work, "ckpt"), "layout": str(layout),
                  "owners": owners, "tp": layout.tp, "pp": layout.pp, "sync": not a.no_sync,
                  "dcp": os.path.join(work, "dcp")}
        # untimed correctness first
        measure("peers_hf_import", {**common, "out": os.path.join(work, "check-import")})
        measure("scalai_dcp_import", {**common, "out": os.path.join(work, "check-dcp"), "sync": False})
        measure("peers_dcp_import", {**common, "out": os.path.join(work, "check-dcp-split")})
        export_hf(os.path.join(work, "ckpt"), os.path.join(work, "check-export"), sync=False)
        measure("peers_merge_save_pretrained", {**common, "out": os.path.join(work, "check-merge")})
        _check_outputs(work, str(layout))
        log("outputs checked equal; timing")
        rows = [Row("HF import", [("scalai import hf", "scalai_hf_import"),
                                  ("from_pretrained + split by hand", "peers_hf_import")]),
                Row("HF export", [("scalai export hf", "scalai_hf_export"),
                                  ("merge by hand + save_pretrained", "peers_merge_save_pretrained"),
                                  ("from_pretrained + save_pretrained", "peers_from_pretrained_save_pretrained")]),
                Row("DCP import", [("scalai import dcp", "scalai_dcp_import"),
                                   ("dcp_to_torch_save + split by hand", "peers_dcp_import")])]
        run_rows(rows, lambda side, k: {**common, "out": os.path.join(work, f"out-{side}")}, a.repeats)
        print(json.dumps({"machine": machine_description(), "scratch": where, "model_bytes": nbytes,
                          "layout": str(layout), "sync": not a.no_sync}))
        table(rows, a.format)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
