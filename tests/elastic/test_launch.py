"""Agent command lines (pure) and the loopback addresses that order hosts."""

import pytest

from scalai.elastic.launch import agent_command, slot_address


def test_agent_command_uses_torchrun_with_c10d():
    cmd = agent_command(2, 3, "127.0.0.1:29400", "job-g001", "127.0.0.11", "scalai.examples.gpt", ["--steps", "4"],
                        python="python")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    text = " ".join(cmd)
    for part in ("--nnodes 2", "--nproc-per-node 3", "--rdzv-backend c10d", "--rdzv-endpoint 127.0.0.1:29400",
                 "--rdzv-id job-g001", "--rdzv-conf is_host=false", "--local-addr 127.0.0.11",
                 "--max-restarts 0", "--module scalai.examples.gpt --steps 4"):
        assert part in text


def test_slot_addresses_sort_in_slot_order():
    addresses = [slot_address(s) for s in range(80)]
    assert sorted(addresses) == addresses
    with pytest.raises(ValueError):
        slot_address(90)


def test_process_gone_sees_exited_and_zombie_processes():
    import subprocess
    import sys
    import time

    from scalai.elastic.launch import process_gone

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not process_gone(proc.pid)
    finally:
        proc.kill()
    deadline = time.time() + 10
    while not process_gone(proc.pid):  # a zombie until reaped below: gone already
        assert time.time() < deadline
        time.sleep(0.01)
    proc.wait()
    assert process_gone(proc.pid)
