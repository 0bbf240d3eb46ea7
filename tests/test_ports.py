"""Fixed ports the tests and chaos bind sit below the kernel's ephemeral range.

A broker port inside that range can be taken by any outgoing connection a moment before the broker
binds it: CI once failed on "Socket server failed to bind to 127.0.0.1:40092" (a controller port).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from devtools import chaos
from tests import conftest, helpers, test_kafka_cluster


def _ephemeral_floor() -> int:
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    return int(ranges.read_text().split()[0]) if ranges.exists() else 32768


def test_fixed_broker_ports_sit_below_the_ephemeral_range():
    floor = min(_ephemeral_floor(), 32768)
    chaos_defaults = [int(port) for port in re.findall(r'"HIFI_CHAOS_\w*PORT\w*", "(\d+)"', inspect.getsource(chaos))]
    assert len(chaos_defaults) >= 3  # the port base, one node, three nodes
    cluster_ports = [int(port) for port in re.findall(r"port=(\d+)", inspect.getsource(test_kafka_cluster))]
    clients = [conftest.TEST_KAFKA_PORT, helpers.CLUSTER_PORT, *cluster_ports, *chaos_defaults]
    # A broker's controller listens at +1000, and three nodes take three consecutive ports.
    highest = max(clients) + 1000 + 2
    assert highest < floor, f"a broker port reaches {highest}, inside the ephemeral range from {floor}"


def test_port_blocks_never_hand_out_a_broker_port():
    start = conftest.TEST_KAFKA_PORT - 12  # the first block holds this run's broker port (19092 unless exported)
    blocks = conftest._port_blocks(start)
    handed = [next(blocks) for _ in range(400)]
    assert all(not (base <= port < base + 20) for base in handed for port in conftest._RESERVED_PORTS)
    assert start not in handed and start + 20 in handed  # the block that held the broker port was skipped
