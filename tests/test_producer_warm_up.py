"""Producers warmed before a worker joins (issue 15): a restarted worker's first batch pays no metadata
lookup and no connection set-up, which on a loaded machine cost it tens to hundreds of milliseconds while
the partitions it had just been handed stood still."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from devtools.kafka import LocalKafka
from services.collector.app import Collector, CollectorProducer
from shared import pipeline
from shared.codec import encode_event
from shared.config import HifiConfig, hash_api_key
from shared.publish import warm_up
from shared.service import ServiceContext
from shared.stage import Output, Record, StageRunner, StepResult
from shared.topics import Topics, ensure_topics
from tests.test_stage_runner import create_topic, make_runner, wait_for

CONFIG = f"""
tenants:
  acme: {{api_keys: ["{hash_api_key("k")}"], sinks: [hook]}}
sinks:
  hook: {{type: webhook, url: "http://127.0.0.1:1/x"}}
"""


def leaders_connected(producer: AIOKafkaProducer, topic: str) -> bool:
    """Metadata known for `topic`, and an open connection (the one produce requests use) to each leader."""
    client = producer.client
    partitions = client.cluster.partitions_for_topic(topic)
    if not partitions:
        return False
    leaders = {client.cluster.leader_for_partition(TopicPartition(topic, p)) for p in partitions}
    return all(any(key[0] == leader and conn.connected() for key, conn in client._conns.items()) for leader in leaders)


@pytest.mark.asyncio
async def test_a_worker_knows_and_is_connected_to_every_topic_it_writes_before_it_joins(
    kafka: LocalKafka, namespace: str
) -> None:
    source, out, tallies = f"{namespace}.warm.in", f"{namespace}.warm.out", f"{namespace}.warm.tallies"
    for topic in (source, out, tallies, f"{source}.dlq"):
        await create_topic(kafka.bootstrap, topic, 2)

    async def relay(records: list[Record]) -> StepResult:
        return StepResult(outputs=[Output(out, r.message.key, encode_event(r.event)) for r in records])

    runner: StageRunner = make_runner(kafka.bootstrap, f"{namespace}-warm", "warm", source, relay)
    runner.produces_to = [out]
    runner.tallies = tallies
    await runner.start()
    try:
        await wait_for(lambda: runner.joined, 30, "the join")
        assert runner.producer is not None
        for topic in (out, tallies, f"{source}.dlq"):
            assert leaders_connected(runner.producer, topic), f"{topic}: no metadata or no leader connection yet"
    finally:
        await runner.stop()


@pytest.mark.asyncio
async def test_warm_up_of_a_topic_it_cannot_look_up_gives_up_in_time_and_names_it(
    kafka: LocalKafka, namespace: str
) -> None:
    """Not fatal: the worker joins anyway, and its first batch waits for the topic as it did before."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        real = f"{namespace}.warm.real"
        await create_topic(kafka.bootstrap, real, 1)
        missing = "not a topic!"  # refused by the broker (the local one creates unknown topics on lookup)
        began = asyncio.get_running_loop().time()
        cold = await warm_up(producer, [real, missing], timeout_s=1.0)
        assert cold == [missing]
        # Bounded: aiokafka alone waits out its 40 s request timeout for a topic it cannot look up.
        assert asyncio.get_running_loop().time() - began < 15.0
        assert leaders_connected(producer, real)
    finally:
        await producer.stop()


@pytest.mark.asyncio
async def test_the_collector_is_ready_only_once_its_producer_knows_and_is_connected_to_its_topics(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    ctx = ServiceContext("collector", settings_for(config_path), HifiConfig.load(config_path))
    await ensure_topics(kafka.bootstrap, [ctx.topics.raw, ctx.topics.tallies], 2, 1)
    collector = Collector(ctx)
    producing = CollectorProducer(collector)
    await producing.start()
    try:
        assert collector.publisher is not None
        for topic in (ctx.topics.raw, ctx.topics.tallies):
            assert leaders_connected(collector.publisher.producer, topic), topic
    finally:
        await producing.stop()
    assert collector.publisher is None  # stopping: not ready


def test_a_stages_outputs_name_each_sink_and_tenant_topic_under_the_namespace() -> None:
    topics = Topics("ns")
    assert topics.outputs(pipeline.ROUTER, ["hook", "files"], ["acme"]) == [
        "ns.hifi.sink.hook",
        "ns.hifi.sink.files",
        "ns.hifi.audit.tallies",
    ]
    assert topics.outputs(pipeline.DEDUPLICATOR, ["hook"], ["acme", "beta"]) == [
        "ns.hifi.unique",
        "ns.hifi.failed.acme",
        "ns.hifi.failed.beta",
        "ns.hifi.audit.tallies",
    ]
    assert topics.outputs(pipeline.AUDITOR, ["hook"], ["acme"]) == []


@pytest.mark.asyncio
async def test_many_topics_are_looked_up_together_not_one_metadata_request_each(
    kafka: LocalKafka, namespace: str
) -> None:
    """A restarted static member's partitions wait for its warm-up: the deduplicator writes a failed topic per
    tenant, and one round trip per topic in turn made that wait grow with the tenants (review finding)."""
    topics = [f"{namespace}.warm.many.{i}" for i in range(20)]
    admin_topics = asyncio.gather(*(create_topic(kafka.bootstrap, t, 1) for t in topics))
    await admin_topics
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    client = producer.client
    real_update = client._metadata_update
    lookups = 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal lookups
        lookups += 1
        return await real_update(*args, **kwargs)

    client._metadata_update = counted
    try:
        assert await warm_up(producer, topics) == []
        assert all(leaders_connected(producer, t) for t in topics)
        # One request answers them all; a few more when the broker does not know the new topics yet (3 to 6
        # measured; one per topic, in turn, before: 54).
        assert lookups <= len(topics) // 2, f"{lookups} metadata requests for {len(topics)} topics"
    finally:
        await producer.stop()


@pytest.mark.asyncio
async def test_a_collector_stopped_while_it_warms_up_stops_its_producer_and_never_becomes_ready(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.collector.app as collector_app

    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    ctx = ServiceContext("collector", settings_for(config_path), HifiConfig.load(config_path))
    made: list[AIOKafkaProducer] = []
    real_producer, real_warm_up = collector_app.durable_producer, collector_app.warm_up

    def kept(*args: Any, **kwargs: Any) -> AIOKafkaProducer:
        made.append(real_producer(*args, **kwargs))
        return made[-1]

    async def slow(producer: AIOKafkaProducer, topics: list[str]) -> list[str]:
        return await real_warm_up(producer, [*topics, "not a topic!"], 3.0)  # refused: the whole bound

    monkeypatch.setattr(collector_app, "durable_producer", kept)
    monkeypatch.setattr(collector_app, "warm_up", slow)
    collector = Collector(ctx)
    producing = CollectorProducer(collector)
    starting = asyncio.create_task(producing.start())
    await wait_for(lambda: bool(made), 10, "the producer")
    await asyncio.sleep(0.5)
    await producing.stop()
    await asyncio.gather(starting, return_exceptions=True)
    await asyncio.sleep(3.0)  # past the warm-up's bound: an unguarded start would install its publisher now
    assert collector.publisher is None
    assert made[0]._closed, "the producer started for the warm-up was left running"


@pytest.mark.asyncio
async def test_a_producer_stopped_during_its_warm_up_opens_no_connection_afterwards(
    kafka: LocalKafka, namespace: str
) -> None:
    """A SIGTERM while a worker warms up stops its producer; a warm-up whose lookups were already answered must not
    then connect the closed client (sockets and reader tasks nobody closes: review finding). The stop lands here
    just before the connecting step, the topic's metadata known."""
    topic = f"{namespace}.warm.stopped"
    await create_topic(kafka.bootstrap, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    await producer.partitions_for(topic)
    for conn in producer.client._conns.values():
        conn.close()  # the lookup's connection: only what the warm-up opens is counted
    await producer.stop()
    await warm_up(producer, [topic], timeout_s=2.0)
    opened = [key for key, conn in producer.client._conns.items() if conn.connected()]
    assert not opened, f"connections opened on a closed client: {opened}"
