"""A partition handed over while the consumer's metadata names a stale leader must still be read.

Chaos `slow-isr-rebalance` stalled a sender's partition for minutes: aiokafka (0.14) looks up a
partition's start position (ListOffsets, when the group has no committed offset for it) at the
leader its cached metadata names; a `NotLeaderForPartitionError` answer is logged ("Failed fetch
offsets from N") and retried every 100 ms at the same broker without a metadata refresh, and no
fetch goes to that broker meanwhile, so nothing else refreshes it either until `metadata_max_age_ms`
(5 min). Here the leader moves by a reassignment that drops the old leader from the replicas (it
stays up and answers "not leader"), which is what a SIGSTOPped broker fenced by the controller
becomes once it resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.protocol.admin import AlterPartitionReassignmentsRequest

from devtools.kafka import LocalKafka
from shared.codec import encode_event
from shared.event import Event
from shared.stage import StageRunner
from tests.helpers import three_node_cluster
from tests.test_stage_runner import FlakySink, make_runner, wait_for

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalKafka]:
    """Three nodes of our own: the test moves a partition's leader, which one node cannot."""
    yield from three_node_cluster()


@pytest.fixture
async def runners() -> AsyncIterator[list[StageRunner]]:
    started: list[StageRunner] = []
    yield started
    await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)


async def leaders(admin: AIOKafkaAdminClient, topic: str) -> dict[int, tuple[int, list[int]]]:
    described = await admin.describe_topics([topic])
    return {p["partition"]: (p["leader"], list(p["replicas"])) for p in described[0]["partitions"]}


async def test_a_partition_whose_cached_leader_moved_is_read_after_a_rebalance(
    cluster: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    source = f"{namespace}.stale"
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        # Partition 0 led by node 2, partition 1 by node 1: the member that keeps partition 0 never
        # fetches from node 1, so nothing tells it when partition 1's leader moves.
        await admin.create_topics([NewTopic(source, -1, -1, replica_assignments={0: [2, 3, 1], 1: [1, 2, 3]})])
        sink = FlakySink()
        group = f"{namespace}-sender"
        options = dict(batch_max=50, session_timeout_ms=6_000, rebalance_timeout_ms=8_000)
        for name in ("a", "b"):
            runner = make_runner(cluster.members[0].bootstrap, group, name, source, sink.handle, **options)
            runners.append(runner)
            await runner.start()
        first, second = runners
        await wait_for(
            lambda: first.joined and second.joined and len(first.assigned) == len(second.assigned) == 1,
            60,
            "two members with a partition each",
        )
        keeper = first if {tp.partition for tp in first.assigned} == {0} else second
        leaver = second if keeper is first else first

        # Move partition 1's leader off node 1 (node 1 stays up and answers "not leader").
        response = await admin._send_request(
            AlterPartitionReassignmentsRequest(30_000, [(source, [(1, [2, 3], {})], {})], {})
        )
        assert response.error_code == 0, response
        deadline = asyncio.get_running_loop().time() + 60
        while (await leaders(admin, source))[1] != (2, [2, 3]):
            assert asyncio.get_running_loop().time() < deadline, await leaders(admin, source)
            await asyncio.sleep(0.5)
    finally:
        await admin.close()

    await leaver.stop()  # the group rebalances: the keeper takes partition 1
    # Events in partition 1, which the group has no committed offset for (the leaver saw none): its
    # new owner looks up the log start at the leader it knows of.
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        ids = [f"e{n}" for n in range(50)]
        for event_id in ids:
            event = Event(event_id, "play", 1.0, "acme", device_id="d1", ingest_ts=0.0)
            await producer.send_and_wait(source, encode_event(event), key=event.partition_key, partition=1)
    finally:
        await producer.stop()

    await wait_for(lambda: {tp.partition for tp in keeper.assigned} == {0, 1}, 60, "the keeper owning both")
    await wait_for(lambda: set(sink.received) >= set(ids), 45, "every event of partition 1 at the sink")
