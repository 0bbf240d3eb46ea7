"""The collector's producer after its start (issue 15): a renewed producer is warmed before it takes requests, a
renewal that a stop overtakes leaves nothing running and nothing installed, and a metadata refresh that never
finishes is restarted on whichever producer is current, as the stages' are (shared/watchdog.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

import services.collector.app as collector_app
from devtools.kafka import LocalKafka
from services.collector.app import Collector, CollectorProducer
from shared.config import HifiConfig
from shared.service import ServiceContext
from shared.topics import ensure_topics
from tests.test_broker_kill import WedgedRefresh
from tests.test_producer_warm_up import CONFIG, leaders_connected
from tests.test_stage_runner import wait_for

pytestmark = pytest.mark.asyncio


async def collector_for(kafka: LocalKafka, settings_for: Any, tmp_path: Path) -> Collector:
    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    ctx = ServiceContext("collector", settings_for(config_path), HifiConfig.load(config_path))
    await ensure_topics(kafka.bootstrap, [ctx.topics.raw, ctx.topics.tallies], 2, 1)
    return Collector(ctx)


async def test_a_renewed_producer_knows_and_is_connected_to_its_topics_before_it_takes_requests(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    """A batch failure renews the producer; the requests after it must not pay the lookups a restart does not."""
    collector = await collector_for(kafka, settings_for, tmp_path)
    producing = CollectorProducer(collector)
    await producing.start()
    try:
        failed = collector.publisher
        assert failed is not None
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        renewed = collector.publisher
        assert renewed is not None and renewed is not failed
        for topic in (collector.ctx.topics.raw, collector.ctx.topics.tallies):
            assert leaders_connected(renewed.producer, topic), f"{topic}: not looked up or not connected"
    finally:
        await producing.stop()


async def test_a_renewal_a_stop_overtakes_installs_nothing_and_stops_its_producer(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop lands while the renewal starts its producer: the collector must stay not ready (`/ready` reads the
    publisher) and the renewal's producer must not be left running after the stop."""
    collector = await collector_for(kafka, settings_for, tmp_path)
    producing = CollectorProducer(collector)
    await producing.start()
    failed = collector.publisher
    assert failed is not None
    made: list[AIOKafkaProducer] = []
    gate = asyncio.Event()
    real_producer = collector_app.durable_producer

    def gated(*args: Any, **kwargs: Any) -> AIOKafkaProducer:
        producer = real_producer(*args, **kwargs)
        start = producer.start

        async def start_after_the_gate() -> None:
            await gate.wait()
            await start()

        producer.start = start_after_the_gate  # type: ignore[method-assign]
        made.append(producer)
        return producer

    monkeypatch.setattr(collector_app, "durable_producer", gated)
    renewing = asyncio.create_task(collector._renew(failed, RuntimeError("injected: a batch failed")))
    await wait_for(lambda: bool(made), 10, "the renewal's producer")
    await producing.stop()
    gate.set()
    await asyncio.gather(renewing, return_exceptions=True)
    assert collector.publisher is None, "a stopped collector got a publisher: /ready says producing"
    assert made[0]._closed, "the renewal's producer was left running after the stop"


async def test_a_metadata_refresh_that_never_finishes_is_restarted_on_the_current_producer(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    """Unwatched, a wedged refresh failed every request whose leader had moved until the client re-sent past it
    (the stages' watchdog found one held 68 s after a broker kill). Watched: the first producer's, then the
    renewed one's."""
    collector = await collector_for(kafka, settings_for, tmp_path)
    producing = CollectorProducer(collector, metadata_stuck_after_s=0.5)
    await producing.start()
    try:
        for _ in range(2):
            publisher = collector.publisher
            assert publisher is not None
            client = publisher.producer.client
            await asyncio.wait_for(client.force_metadata_update(), 8)  # a refresh begun before the wedge is over
            wedge = WedgedRefresh(client)
            wedge.armed = True
            assert await asyncio.wait_for(client.force_metadata_update(), 8) is True
            assert wedge.wedged == 1  # the fault did happen
            await collector._renew(publisher, RuntimeError("injected: a batch failed"))
    finally:
        await producing.stop()


async def test_a_replacement_that_cannot_start_is_stopped_and_the_old_producer_kept(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal runs in a request group's settling task: before, its start's error ended that task unretrieved
    and left the new producer's client unclosed. The next failed batch tries again."""
    collector = await collector_for(kafka, settings_for, tmp_path)
    producing = CollectorProducer(collector)
    await producing.start()
    made: list[AIOKafkaProducer] = []
    real_producer = collector_app.durable_producer

    def unreachable(broker: str, client_id: str) -> AIOKafkaProducer:
        made.append(real_producer("127.0.0.1:9", client_id))  # nothing listens: the start is refused
        return made[-1]

    monkeypatch.setattr(collector_app, "durable_producer", unreachable)
    try:
        failed = collector.publisher
        assert failed is not None
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        assert collector.publisher is failed
        assert made and made[0]._closed, "the replacement that did not start was left open"
    finally:
        await producing.stop()
