"""Simulated hosts with limited links: network namespaces + tc (as root) and the transport
rate limiter; a transformation is as slow as its busiest link, and counted bytes match."""

from __future__ import annotations

import subprocess

import pytest

from scalai.store import StoreCluster, reshard
from scalai.store.simnet import SimulatedHosts, netns_available
from store_helpers import assert_pulled_the_lower_bound, deployment


def _run_limited(hosts: SimulatedHosts, ckpt, rate_bytes: float):
    cluster = StoreCluster(hosts.urls, hosts.token)
    cluster.push(str(ckpt), "gpt", gpus_per_host=4)  # host0, host1
    before = hosts.wire_bytes()
    result = reshard(cluster, "gpt", "tp=2,pp=2,dp=2", gpus_per_host=4, hosts=["host2", "host1"])
    after = hosts.wire_bytes()
    s = result.stats
    assert_pulled_the_lower_bound(result.to_json(), deployment("tp=2,pp=2,dp=2", 4, ["host0", "host1"]),
                                  deployment("tp=2,pp=2,dp=2", 4, ["host2", "host1"]))
    busiest = max(s.host_received_bytes.values())
    seconds = result.phases["transform"]
    assert seconds >= 0.7 * busiest / rate_bytes, (seconds, busiest, rate_bytes)  # the link holds
    received = sum(after[h]["received"] - before[h]["received"] for h in after) if after else None
    return result, received


@pytest.mark.slow
@pytest.mark.skipif(not netns_available(), reason="needs root, ip and tc (iproute2)")
def test_namespaces_limit_links_and_count_wire_bytes(tiny_ckpt):
    with SimulatedHosts(3, link="16mbit", mode="netns") as hosts:
        assert all(u.startswith("http://10.250.") for u in hosts.urls)
        result, received = _run_limited(hosts, tiny_ckpt, 16e6 / 8)
        # the wire carries the payload plus headers and control requests (a few percent)
        assert result.cross_host_bytes <= received <= 1.2 * result.cross_host_bytes + 2e6
        tag = hosts.tag
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert tag not in names and tag not in links  # nothing left behind


@pytest.mark.slow
def test_transport_rate_limiter(tiny_ckpt):
    with SimulatedHosts(3, link="2MB", mode="transport") as hosts:
        assert all(u.startswith("http://127.0.0.1:") for u in hosts.urls)
        _run_limited(hosts, tiny_ckpt, 2e6)
