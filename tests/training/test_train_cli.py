"""``scalai train`` and ``scalai plot`` as a user runs them: train, stop, resume elsewhere, plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import read_metrics

SCALAI = str(Path(sys.executable).parent / "scalai")


def scalai(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SCALAI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_stop_resume_elsewhere_and_plot(corpus_index, tmp_path):
    root, metrics, plot = tmp_path / "ckpt", tmp_path / "metrics.jsonl", tmp_path / "loss.png"
    first = scalai("train", "--layout", "tp=1,pp=2,dp=1", "--steps", 4, "--save", root,
                   "--metrics", metrics, "--data", corpus_index)
    assert first.returncode == 0, first.stderr
    assert "step 4/4" in first.stdout and f"saved step 4 to {root}/step-000004" in first.stdout

    second = scalai("train", "--layout", "tp=2,pp=1,dp=1", "--steps", 8, "--resume", root, "--save", root,
                    "--metrics", metrics, "--plot", plot, "--data", corpus_index)
    assert second.returncode == 0, second.stderr
    assert "resumed step 4 from" in second.stdout and "(tp=1,pp=2,dp=1 -> tp=2,pp=1,dp=1" in second.stdout
    assert "step 5/8" in second.stdout and "step 4/8" not in second.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 9))

    reference = tmp_path / "reference.jsonl"
    ref = scalai("train", "--layout", "tp=1,pp=1,dp=1", "--steps", 8, "--metrics", reference,
                 "--data", corpus_index)
    assert ref.returncode == 0, ref.stderr
    shown = scalai("plot", metrics, "--reference", reference, "-o", tmp_path / "compare.png")
    assert shown.returncode == 0, shown.stderr
    assert "tp=1,pp=2,dp=1 (from step 1) -> tp=2,pp=1,dp=1 (from step 5)" in shown.stdout
    worst = float(re.search(r"max relative difference to the reference: (\S+)", shown.stdout).group(1))
    assert worst < 1e-4

    inspected = scalai("inspect", root / "step-000008", "--verify")
    assert inspected.returncode == 0 and "tp=2,pp=1,dp=1" in inspected.stdout

    # A worker-side refusal: another global batch would change the trajectory.
    refused = scalai("train", "--layout", "tp=1,pp=1,dp=1", "--steps", 10, "--resume", root,
                     "--global-batch", 16, "--data", corpus_index)
    assert refused.returncode == 1
    assert "resume with --global-batch 8 to keep the trajectory" in refused.stderr
    assert "scalai: error: training failed on rank(s) 0 (exit code 2)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bad_input_is_one_line_before_any_worker_starts(tmp_path):
    for args, code, message in [
        (["--layout", "tp=3", "--steps", 4], 2, "tp=3 does not divide the model's 4 attention heads"),
        (["--layout", "tp=1,pp=1,dp=1", "--steps", 4, "--resume", tmp_path / "none"], 1, "does not exist"),
        (["--layout", "pp=2,dp=3", "--steps", 4], 2, "pipeline micro-batches must be equal"),
        (["--layout", "tp=1", "--steps", 4, "--plot", tmp_path / "x.png"], 2, "--plot draws the --metrics"),
    ]:
        result = scalai("train", *args, timeout=60)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_cli_defaults_are_the_trainers():
    """``scalai train`` spells its defaults out (no torch import at start-up); they must be
    the ones ``python -m scalai.examples.gpt`` uses."""
    import dataclasses

    from scalai.cli.main import _register, cli
    from scalai.examples.gpt.options import TrainOptions

    _register()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    options = {p.name: p.default for p in cli.commands["train"].params if p.name in defaults}
    assert set(options) == {"layout", "steps", "model", "save", "save_every", "resume", "metrics", "data",
                            "seed", "global_batch", "micro_batch", "lr", "schedule", "stop_file", "device"}
    for name, value in options.items():
        if name not in ("layout", "steps"):
            assert value == defaults[name], f"--{name.replace('_', '-')}: CLI {value!r}, trainer {defaults[name]!r}"
