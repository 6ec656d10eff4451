"""What an agent offers and hands its workers (:mod:`scalai.elastic.devices`), and the
reference trainer taking its device from the machine: without a GPU, by feeding the
inventory by hand."""

from __future__ import annotations

import pytest

from elastic_helpers import run_cli
from scalai.elastic.devices import offer, worker_env


def test_cpu_offers_what_is_asked_and_cuda_every_gpu_unless_fewer_are_asked():
    assert (offer("cpu", None).kind, offer("cpu", None).count) == ("cpu", 1)
    assert offer("cpu", 3).count == 3
    eight = offer("cuda", None, inventory=lambda: (8, 79.6))
    assert (eight.kind, eight.count, eight.memory_gib) == ("cuda", 8, 79.6)
    assert offer("cuda", 2, inventory=lambda: (8, 79.6)).count == 2
    assert offer("cuda", 2, memory_gib=40.0, inventory=lambda: (8, 79.6)).memory_gib == 40.0


@pytest.mark.parametrize("kind, devices, inventory, message", [
    ("cuda", None, (0, 0.0), "torch sees no GPU on this machine"),
    ("cuda", 4, (2, 80.0), "--devices 4 is more than the 2 GPUs torch sees"),
    ("tpu", None, (0, 0.0), "--device 'tpu' must be cpu or cuda"),
    ("cpu", 0, (0, 0.0), "--devices 0 must be at least 1"),
])
def test_an_offer_that_cannot_be_met_is_one_line(kind, devices, inventory, message):
    with pytest.raises(ValueError, match=message):
        offer(kind, devices, inventory=lambda: inventory)


def test_workers_get_the_kind_and_the_offered_gpus_in_order():
    two = offer("cuda", 2, inventory=lambda: (4, 80.0))
    assert worker_env(two, {}) == {"SCALAI_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "0,1"}
    # a scheduler gave the agent GPUs 4-7: the first two of those
    assert worker_env(two, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert worker_env(offer("cpu", 2), {"CUDA_VISIBLE_DEVICES": "0"}) == {"SCALAI_DEVICE": "cpu"}


def test_the_reference_trainer_takes_its_device_from_the_machine(monkeypatch):
    from scalai.examples.gpt.options import parse_args
    from scalai.examples.gpt.plugin import ReferenceTrainer

    argv = ReferenceTrainer({"model": "gpt-tiny"}).argv("tp=1,pp=1,dp=2", 4, "m.jsonl", None)
    assert "--device" not in argv  # the coordinator does not decide it
    monkeypatch.setenv("SCALAI_DEVICE", "cuda")
    assert parse_args(argv).device == "cuda"
    assert parse_args(argv + ["--device", "cpu"]).device == "cpu"  # an explicit argument wins
    monkeypatch.delenv("SCALAI_DEVICE")
    assert parse_args(argv).device == "cpu"


def test_an_agent_for_gpus_on_a_machine_without_one_says_so_in_one_line(tmp_path):
    # no GPU visible (on a machine that has some too): the count comes from torch in a child
    made = run_cli("agent", "--join", "127.0.0.1:9", "--name", "m0", "--root", tmp_path / "a", "--device", "cuda",
                   timeout=120, env={"CUDA_VISIBLE_DEVICES": ""})
    assert made.returncode != 0
    lines = made.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch sees no GPU on this machine" in lines[0], made.stderr
    assert not (tmp_path / "a").exists(), "nothing made"
