"""The project's own broker launcher: a 3-node KRaft cluster comes up, replicates with
min.insync.replicas=2, survives losing one node, and stops cleanly."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from devtools.kafka import LocalKafka
from shared.topics import ensure_topics


async def test_three_node_cluster(tmp_path):
    cluster = LocalKafka(nodes=3, port=29092, data_root=tmp_path / "k3", heap="384m")
    try:
        await asyncio.to_thread(cluster.start, 180.0)  # three JVMs on a busy two-core runner
        assert len(cluster.running_pids()) == 3
        await ensure_topics(cluster.bootstrap, ["rf3"], partitions=3, replication=3, min_insync=2)
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        described = await admin.describe_topics(["rf3"])
        await admin.close()
        assert all(len(p["replicas"]) == 3 for p in described[0]["partitions"])

        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        for i in range(50):
            await producer.send_and_wait("rf3", str(i).encode(), key=str(i % 5).encode())
        await asyncio.to_thread(cluster.kill_node, 3)  # one of three gone: acks=all with min ISR 2 still works
        for i in range(50, 100):
            await producer.send_and_wait("rf3", str(i).encode(), key=str(i % 5).encode())
        await producer.stop()

        consumer = AIOKafkaConsumer("rf3", bootstrap_servers=cluster.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        got: list[int] = []
        async with asyncio.timeout(60):
            while len(got) < 100:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(int(r.value) for r in records)
        await consumer.stop()
        assert sorted(got) == list(range(100))
    finally:
        await asyncio.to_thread(cluster.stop)
    assert cluster.running_pids() == {}
