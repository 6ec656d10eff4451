"""Import and export stream: a model far larger than the bound passes through a few buffers.

The model (a Llama of 12 layers, every tensor 4 MiB, 340 MiB in all) is written as sparse
safetensors files (headers only: its bytes read as zeros), imported into tp=2,pp=2 and
exported back, in a child process that measures its own peak memory two ways: the peak of
the bytes Python and numpy allocate (tracemalloc; every buffer of the runner and the
converters is a numpy array) and the peak of its anonymous resident memory (RssAnon,
sampled every 2 ms; file pages of the checkpoints it maps are the kernel's cache, not
the process's memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

MiB = 1 << 20
HIDDEN, LAYERS, VOCAB = 1024, 12, 1024

_CHILD = textwrap.dedent("""
    import json, sys, threading, time, tracemalloc

    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    from scalai.interop.convert import export_hf, import_hf  # every import done before the baseline
    import scalai.interop.hf_storage, scalai.checkpoint, scalai.locations  # noqa
    src, work = sys.argv[1], sys.argv[2]
    peak, done = [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)
    base = rss_anon()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    tracemalloc.start()
    import_hf(src, work + "/ckpt", "tp=2,pp=2,dp=1", sync=False, workers=2)  # as on a 2-core machine
    export_hf(work + "/ckpt", work + "/out", max_shard_bytes=64 << 20, sync=False, workers=2)
    traced = tracemalloc.get_traced_memory()[1]
    done[0] = True
    t.join()
    print(json.dumps({"traced_peak": traced, "rss_anon_peak": peak[0] - base}))
""")


def _sparse_llama(path) -> int:
    """A Llama directory whose tensors are all 4 MiB and all zeros (sparse files)."""
    from scalai.checkpoint.safetensors_io import SafetensorsWriter

    os.makedirs(path)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
           "hidden_size": HIDDEN, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
           "num_attention_heads": 8, "num_key_value_heads": 8, "tie_word_embeddings": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    square = ("float32", (HIDDEN, HIDDEN))
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"] + [p + f"mlp.{x}_proj.weight" for x in
                                                                      ("gate", "up", "down")]
    entries = [(n, *square) for n in names]
    entries += [("model.norm.weight", "float32", (HIDDEN,))]
    entries += [(f"model.layers.{i}.{n}.weight", "float32", (HIDDEN,)) for i in range(LAYERS)
                for n in ("input_layernorm", "post_attention_layernorm")]
    files = [entries[i:i + 24] for i in range(0, len(entries), 24)]
    index = {"metadata": {}, "weight_map": {}}
    for k, group in enumerate(files):
        name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        w = SafetensorsWriter(os.path.join(path, name), group, {"format": "pt"})
        w.finalize(sync=False)
        index["weight_map"].update((n, name) for n, _, _ in group)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return sum(4 * HIDDEN * HIDDEN for _ in names) + 4 * HIDDEN * (2 * LAYERS + 1)


@pytest.mark.slow
def test_import_and_export_hold_a_few_tensors_never_the_model(tmp_path):
    total = _sparse_llama(tmp_path / "hf")
    largest = 4 * HIDDEN * HIDDEN
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "hf"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 12 * largest  # the runner's blocks and a tensor per worker: a few tensors
    assert total > 6 * bound  # the model is far above the bound
    assert peaks["traced_peak"] < bound, (peaks, bound)
    assert peaks["rss_anon_peak"] < bound + 32 * MiB, (peaks, bound)
