"""The training API in one process (no process group: every collective is local).

Multi-rank behaviour is tested on gloo in test_failures.py and test_transitions.py; here
the pure parts and the single-rank paths: round trips bit for bit, and every way a load
must refuse to continue (missing optimizer state, another model, damaged files, a plan
that would leave elements unfilled or fill them twice).
"""

from __future__ import annotations

import importlib
import os
import re
import signal

import pytest
import torch

from scalai.checkpoint import Checkpoint
from scalai.data import DataState
from scalai.examples.gpt.model import GPTConfig, GPTStage, init_weights
from scalai.examples.gpt.options import TrainOptions, parse_args, to_argv
from scalai.examples.gpt.parallel import loss_fn
from scalai.examples.gpt.train import lr_factor
from scalai.training import (CollectiveError, DirectoryWriter, JobState, StopFlag, describe,
                             find_checkpoint, list_checkpoints, load, save, step_dir)
from scalai.training.collective import RankFailure

load_module = importlib.import_module("scalai.training.load")  # the package exports load()

CFG = GPTConfig(vocab=32, dim=16, heads=2, layers=2, seq_len=8)


def make_job(seed: int = 0, optimizer: bool = True, cfg: GPTConfig = CFG, steps: int = 2) -> JobState:
    """A one-rank job that has taken ``steps`` AdamW steps on random tokens."""
    model = GPTStage(cfg, range(cfg.layers), True, True)
    init_weights(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)) if optimizer else None
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps if optimizer else 0):
        tokens = torch.randint(0, cfg.vocab, (2, cfg.seq_len + 1), generator=g)
        loss_fn(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    data = DataState(seed=seed, global_batch=4, num_samples=1000).advance(steps)
    return describe(model, opt, "tp=1,pp=1,dp=1", num_layers=cfg.layers, scheduler=sched, data=data,
                    step=steps, seed=seed, extra={"note": "hello"})


def snapshot(job: JobState) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in job.local_tensors().items()}


def test_describe_reads_the_layout_from_the_model():
    job = make_job()
    names = job.ptc.names
    params = [n for n in names if not n.startswith("optimizer.")]
    assert "layers.1.attn.wq.weight" in params and "tok.weight" in params
    assert {f"optimizer.{s}.{p}" for s in ("exp_avg", "exp_avg_sq") for p in params} == \
        set(names) - set(params)
    assert job.ptc.spec("layers.1.mlp.fc1.weight").residence.layer == 1
    assert job.ptc.spec("tok.weight").residence.kind == "first"
    assert job.ptc.spec("out.weight").residence.kind == "last"


def test_save_load_round_trip_is_bit_exact(tmp_path):
    job = make_job(seed=0)
    before = snapshot(job)
    report = save(job, tmp_path / "ckpt")
    assert report.total_bytes == sum(t.numel() * 4 for t in before.values())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no staging left behind"
    Checkpoint.open(tmp_path / "ckpt").verify()

    fresh = make_job(seed=1, steps=0)  # other weights, zero moments, step 0
    assert any(not torch.equal(fresh.local_tensors()[n], t) for n, t in before.items())
    result = load(fresh, tmp_path / "ckpt")
    after = fresh.local_tensors()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert (result.step, fresh.step, result.rng) == (2, 2, "restore")
    assert fresh.data == job.data and fresh.extra == {"note": "hello"}
    assert fresh.scheduler.state_dict()["last_epoch"] == job.scheduler.state_dict()["last_epoch"]
    assert fresh.optimizer.param_groups[0]["lr"] == job.optimizer.param_groups[0]["lr"]
    assert {int(s["step"]) for s in fresh.optimizer.state.values()} == {2}
    assert result.rank_bytes == report.total_bytes


def test_loading_a_checkpoint_without_optimizer_state_is_refused(tmp_path):
    save(make_job(optimizer=False), tmp_path / "weights-only")
    job = make_job(seed=1, steps=0)
    before = snapshot(job)
    with pytest.raises(CollectiveError) as info:
        load(job, tmp_path / "weights-only")
    assert info.value.kinds == {"PlanError"}
    assert "optimizer.exp_avg" in str(info.value) and "weights_only=True" in str(info.value)
    assert all(torch.equal(job.local_tensors()[n], t) for n, t in before.items()), \
        "a refused load must not have touched the job"
    saved = snapshot(make_job(optimizer=False))
    report = load(job, tmp_path / "weights-only", weights_only=True)
    after = job.local_tensors()
    for name, tensor in before.items():  # the weights loaded, the moments (and step) left alone
        assert torch.equal(after[name], saved[name] if name in saved else tensor), name
    assert job.step == 0 and report.restored == ("parameters",) and "state" in report.not_restored


def test_loading_another_model_is_refused(tmp_path):
    save(make_job(cfg=GPTConfig(vocab=32, dim=16, heads=2, layers=2, seq_len=16)), tmp_path / "other")
    with pytest.raises(CollectiveError, match="pos.weight"):
        load(make_job(steps=0), tmp_path / "other")


def test_damaged_checkpoints_fail_loudly(tmp_path):
    save(make_job(), tmp_path / "ckpt")
    rank_file = tmp_path / "ckpt" / "rank-00000.safetensors"
    data = bytearray(rank_file.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor's data
    rank_file.write_bytes(bytes(data))
    with pytest.raises(CollectiveError, match="checksum mismatch") as info:
        load(make_job(steps=0), tmp_path / "ckpt")
    assert info.value.kinds == {"ChecksumError"}
    rank_file.unlink()
    with pytest.raises(CollectiveError, match="rank-00000.safetensors is missing"):
        load(make_job(steps=0), tmp_path / "ckpt")
    with pytest.raises(CollectiveError, match="does not exist"):
        load(make_job(steps=0), tmp_path / "nothing")


@pytest.mark.parametrize("tamper", ["drop", "duplicate"])
def test_exactly_once_check_catches_a_bad_plan(tmp_path, monkeypatch, tamper):
    save(make_job(), tmp_path / "ckpt")
    real = load_module.plan_load

    def bad_plan(saved, live, *placements):
        plan = real(saved, live, *placements)
        copies = list(plan.copies)
        victim = next(i for i, c in enumerate(copies) if c.tensor == "optimizer.exp_avg.tok.weight")
        copies = copies[:victim] + copies[victim + 1:] if tamper == "drop" else copies + [copies[victim]]
        return type(plan)(plan.old, plan.new, tuple(copies), plan.stats)

    monkeypatch.setattr(load_module, "plan_load", bad_plan)
    with pytest.raises(CollectiveError, match="optimizer.exp_avg.tok.weight") as info:
        load(make_job(steps=0), tmp_path / "ckpt")
    assert info.value.kinds == {"FillError"}
    expected = (r": [1-9]\d* of \d+ elements not filled, 0 filled" if tamper == "drop"
                else r": 0 of \d+ elements not filled, [1-9]\d* filled more than once")
    assert re.search(expected, str(info.value)), str(info.value)


def test_save_refuses_an_existing_directory_and_cleans_up_failures(tmp_path):
    job = make_job()
    (tmp_path / "taken").mkdir()
    with pytest.raises(CollectiveError, match="already exists"):
        save(job, tmp_path / "taken")

    class Failing(DirectoryWriter):
        def write_rank(self, token, rank, ptc, arrays):
            raise OSError("No space left on device")

    with pytest.raises(CollectiveError, match="No space left"):
        save(job, Failing(tmp_path / "full"))
    assert sorted(os.listdir(tmp_path)) == ["taken"], "a failed save leaves nothing behind"


def test_collective_error_groups_ranks_by_message():
    tb = "Traceback..."
    err = CollectiveError("load: open", [RankFailure(0, "CheckpointError", "gone", tb),
                                         RankFailure(1, "CheckpointError", "gone", tb),
                                         RankFailure(3, "OSError", "disk", tb)])
    assert str(err) == ("load: open failed on ranks 0, 1, 3 - ranks 0, 1: CheckpointError: gone; "
                        "rank 3: OSError: disk")
    assert err.kinds == {"CheckpointError", "OSError"}


def test_stop_flag_file_signal_and_request(tmp_path):
    stop_file = tmp_path / "STOP"
    with StopFlag(stop_file) as flag:
        assert not flag.should_stop()
        stop_file.touch()
        assert flag.should_stop() and flag.reason == f"file {stop_file}"
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.should_stop() and flag.reason == "signal SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL, "close() restores the handler"
    with StopFlag(signals=()) as flag:
        flag.request("runner asked")
        assert flag.should_stop() and flag.reason == "runner asked"


def test_checkpoint_roots(tmp_path):
    job = make_job()
    for step in (3, 12):
        job.step = step
        save(job, step_dir(tmp_path / "root", step))
    (tmp_path / "root" / "step-000020").mkdir()  # no manifest: an unfinished save
    assert [s for s, _ in list_checkpoints(tmp_path / "root")] == [3, 12]
    assert find_checkpoint(tmp_path / "root") == tmp_path / "root" / "step-000012"
    assert find_checkpoint(tmp_path / "root" / "step-000003") == tmp_path / "root" / "step-000003"
    with pytest.raises(Exception, match="no complete step-NNNNNN"):
        find_checkpoint(tmp_path / "root" / "step-000020")


def test_train_options_validate_and_round_trip():
    opts = parse_args(["--layout", "tp=2,pp=2,dp=1", "--steps", "20", "--save", "r", "--no-verify"])
    assert parse_args(to_argv(opts)) == opts
    assert opts.division.micro_batch_sizes(0).tolist() == [4, 4]
    uneven = TrainOptions(layout="dp=3", steps=4)  # 8 samples over 3 replicas: 3, 3, 2
    assert [uneven.division.micro_batch_sizes(r).tolist() for r in range(3)] == [[3], [3], [2]]
    for kwargs, match in [({"layout": "tp=3"}, "tp=3 does not divide"),
                          ({"layout": "pp=3"}, "pp=3 does not divide 4 layers"),
                          ({"layout": "pp=4,dp=4"}, "1F1B over pp=4"),
                          ({"layout": "pp=2,dp=3"}, "pipeline micro-batches must be equal"),
                          ({"layout": "dp=16"}, "smaller than dp=16"),
                          ({"layout": "dp=1", "model": "gpt-huge"}, "unknown model"),
                          ({"layout": "dp=1", "save_every": 5}, "--save-every N needs --save")]:
        with pytest.raises(ValueError, match=match):
            TrainOptions(**{"steps": 4, **kwargs})


def test_lr_schedule_does_not_depend_on_the_step_count():
    factors = [lr_factor(s, warmup=10, decay_steps=2000) for s in range(3000)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] == pytest.approx(0.1)


def test_plot_reads_resumed_metrics_and_writes_a_png(tmp_path):
    from scalai.training.plot import plot_losses, read_metrics, relative_differences

    lines = ['{"step": 1, "loss": 5.0, "layout": "tp=2,pp=1,dp=1"}',
             '{"step": 2, "loss": 4.0, "layout": "tp=2,pp=1,dp=1"}',
             '{"step": 2, "loss": 4.5, "layout": "tp=1,pp=1,dp=2"}',  # resumed from step 1
             '{"step": 3, "loss": 3.0, "layout": "tp=1,pp=1,dp=2"}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    records = read_metrics(tmp_path / "m.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 4.5), (3, 3.0)]
    assert relative_differences(records, records[:2]) == {1: 0.0, 2: 0.0}
    plot_losses(records, tmp_path / "loss.png", reference=records)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.jsonl").write_text('{"step": "one"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 is not a metrics line"):
        read_metrics(tmp_path / "bad.jsonl")


def test_load_reads_only_the_planned_windows_from_a_ranged_source(tmp_path):
    """A ranged source (a store) is asked for exactly the planned windows, never a whole
    tensor for a part of it; the bytes it sends are the bytes the rank needs."""
    import numpy as np

    from scalai.storage import RangeSource

    save(make_job(), tmp_path / "ckpt")
    ckpt = Checkpoint.open(tmp_path / "ckpt")

    class Ranged(RangeSource):
        block_bytes = 1 << 30  # one read per planned window

        def __init__(self):
            self.ptc, self.state, self.reads = ckpt.ptc, ckpt.state, []

        def checksum(self, rank, tensor):
            return ckpt.checksum(rank, tensor)

        def read_into(self, rank, tensor, window, out):
            self.reads.append((rank, tensor, window))
            np.copyto(out, window.select(ckpt.view(rank, tensor)))

    job = make_job(seed=1, steps=0)
    reader = Ranged()
    report = load(job, reader, verify=False)
    plan = load_module.plan_load(ckpt.ptc, job.ptc)
    assert sorted(reader.reads, key=repr) == sorted(((c.src_rank, c.tensor, c.src) for c in plan.copies), key=repr)
    assert report.copies == len(reader.reads) > 0
    assert report.rank_bytes == sum(w.volume * ckpt.view(r, t).itemsize for r, t, w in reader.reads)
    expected = make_job()
    for name, tensor in expected.local_tensors().items():
        assert torch.equal(job.local_tensors()[name], tensor), name
    ckpt.close()
