"""The collector's producer after its start (issue 15): a renewed producer is warmed before it takes requests, a
renewal that a stop overtakes leaves nothing running and nothing installed, and a metadata refresh that never
finishes is restarted on whichever producer is current, as the stages' are (shared/watchdog.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber

import services.collector.app as collector_app
from devtools.kafka import LocalKafka
from services.collector.app import Collector, CollectorProducer
from shared.config import HifiConfig
from shared.publish import Output
from shared.service import ServiceContext
from shared.topics import ensure_topics
from tests.test_broker_kill import WedgedRefresh, leaderless
from tests.test_producer_warm_up import CONFIG, leaders_connected
from tests.test_stage_runner import wait_for

pytestmark = pytest.mark.asyncio


async def collector_for(kafka: LocalKafka, settings_for: Any, tmp_path: Path) -> Collector:
    config_path = tmp_path / "hifi.yaml"
    config_path.write_text(CONFIG)
    ctx = ServiceContext("collector", settings_for(config_path), HifiConfig.load(config_path))
    await ensure_topics(kafka.bootstrap, [ctx.topics.raw, ctx.topics.tallies], 2, 1)
    return Collector(ctx)


async def started_collector(
    kafka: LocalKafka, settings_for: Any, tmp_path: Path, **options: Any
) -> tuple[Collector, CollectorProducer]:
    """A collector whose producer service (`options`: its arguments) has started."""
    collector = await collector_for(kafka, settings_for, tmp_path)
    producing = CollectorProducer(collector, **options)
    await producing.start()
    return collector, producing


def gated_producers(monkeypatch: pytest.MonkeyPatch) -> tuple[list[AIOKafkaProducer], asyncio.Event]:
    """The producers the collector makes from now on, each of whose start waits for the event."""
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
    return made, gate


def unreachable_producers(monkeypatch: pytest.MonkeyPatch) -> list[AIOKafkaProducer]:
    """The producers the collector makes from now on, bootstrapping from a port nothing listens on."""
    made: list[AIOKafkaProducer] = []
    real_producer = collector_app.durable_producer

    def unreachable(broker: str, client_id: str) -> AIOKafkaProducer:
        made.append(real_producer("127.0.0.1:9", client_id))  # the start is refused
        return made[-1]

    monkeypatch.setattr(collector_app, "durable_producer", unreachable)
    return made


async def test_a_renewed_producer_knows_and_is_connected_to_its_topics_before_it_takes_requests(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    """A batch failure renews the producer; the requests after it must not pay the lookups a restart does not."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
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
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
    failed = collector.publisher
    assert failed is not None
    made, gate = gated_producers(monkeypatch)
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
    collector, producing = await started_collector(kafka, settings_for, tmp_path, metadata_stuck_after_s=0.5)
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
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
    made = unreachable_producers(monkeypatch)
    try:
        failed = collector.publisher
        assert failed is not None
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        assert collector.publisher is failed
        assert made and made[0]._closed, "the replacement that did not start was left open"
    finally:
        await producing.stop()


async def wedged_with_a_batch_for_a_leaderless_partition(collector: Collector) -> AIOKafkaProducer:
    """The current producer holds a batch whose partition has no leader, and its metadata refresh never returns:
    aiokafka's sender then waits only on that refresh, so the batch neither goes out nor expires, and a flush
    (`stop`) waits for it."""
    assert collector.publisher is not None
    producer = collector.publisher.producer
    await asyncio.wait_for(producer.client.force_metadata_update(), 8)  # a refresh begun before the wedge is over
    wedge = WedgedRefresh(producer.client)
    wedge.armed = True
    leaderless(producer, collector.ctx.topics.raw, 0)
    await producer.send(collector.ctx.topics.raw, b"held", partition=0)
    await wait_for(lambda: wedge.wedged == 1, 10, "the sender's refresh")
    return producer


async def test_a_stop_whose_flush_waits_on_a_wedged_refresh_ends(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    """Review: the watchdog was cancelled before the stop's flush, which then waited for ever (a rolling deploy
    during broker trouble would hang on the collector)."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path, metadata_stuck_after_s=0.5)
    producer = await wedged_with_a_batch_for_a_leaderless_partition(collector)
    await asyncio.wait_for(producing.stop(), 15)
    assert producer._closed and not any(c.connected() for c in producer.client._conns.values())


async def test_a_retired_producer_whose_flush_waits_on_a_wedged_refresh_is_closed(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    """Review: a renewal took the failed producer out of the watch, so its retire waited for ever and kept its
    sockets."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path, metadata_stuck_after_s=0.5)
    try:
        failed = collector.publisher
        assert failed is not None
        producer = await wedged_with_a_batch_for_a_leaderless_partition(collector)
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        assert collector.publisher is not failed
        await wait_for(lambda: not collector.retirements.tasks, 15, "the retired producer's close")
        assert producer._closed and not any(c.connected() for c in producer.client._conns.values())
    finally:
        await producing.stop()


async def test_a_replacement_whose_lookups_do_not_answer_is_not_installed_cold(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: the renewal installed a producer whose warm-up had found nothing (its first refresh wedged), in
    place of one that knew every topic, and every group then waited on that refresh. Whatever is installed knows
    the topics."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
    made: list[AIOKafkaProducer] = []
    real_producer = collector_app.durable_producer

    def wedged(*args: Any, **kwargs: Any) -> AIOKafkaProducer:
        made.append(real_producer(*args, **kwargs))
        WedgedRefresh(made[-1].client).armed = True  # its first refresh after the bootstrap never returns
        return made[-1]

    monkeypatch.setattr(collector_app, "durable_producer", wedged)
    try:
        failed = collector.publisher
        assert failed is not None
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        current = collector.publisher
        assert current is not None
        for topic in (collector.ctx.topics.raw, collector.ctx.topics.tallies):
            assert current.producer.client.cluster.partitions_for_topic(topic), f"installed without {topic}"
        assert current is failed and made[0]._closed  # kept the old one; the new one stopped
    finally:
        await producing.stop()


async def test_a_replacement_that_did_not_start_is_not_tried_again_at_once(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: every failed group tried a full producer start in turn, back to back, under the renewal lock."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
    made = unreachable_producers(monkeypatch)
    try:
        failed = collector.publisher
        assert failed is not None
        for _ in range(5):
            await collector._renew(failed, RuntimeError("injected: a batch failed"))
        assert len(made) == 1, f"{len(made)} replacements started within the backoff"
        collector._renew_not_before = 0.0  # the backoff over
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        assert len(made) == 2
    finally:
        await producing.stop()


async def test_a_start_cancelled_while_its_producer_starts_stops_that_producer(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a SIGTERM during start-up cancels the start; one landing in the producer's start left it open."""
    collector = await collector_for(kafka, settings_for, tmp_path)
    made, _never_set = gated_producers(monkeypatch)
    producing = CollectorProducer(collector)
    starting = asyncio.create_task(producing.on_start())
    await wait_for(lambda: bool(made), 10, "the producer")
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    assert made[0]._closed, "the producer whose start was cancelled was left open"
    assert collector.publisher is None


async def test_a_replacement_that_cannot_look_up_the_tallies_topic_is_installed(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second review: requiring every topic refused every renewal while the (best-effort) tallies topic could not
    be looked up, and the failed producer served on. Only the raw topic is required."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
    real_warm_up = collector_app.warm_up

    async def with_an_unknown_topic(producer: AIOKafkaProducer, topics: list[str], *args: Any) -> list[str]:
        return await real_warm_up(producer, [*topics, "not a topic!"], 1.0)  # refused by the broker

    monkeypatch.setattr(collector_app, "warm_up", with_an_unknown_topic)
    try:
        failed = collector.publisher
        assert failed is not None
        await collector._renew(failed, RuntimeError("injected: a batch failed"))
        assert collector.publisher is not failed
    finally:
        await producing.stop()


async def test_a_producer_whose_sender_died_is_renewed_even_after_a_refused_renewal(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second review: once aiokafka's sender has died, every send fails before any batch exists, so nothing
    failed renewed the producer; after one refused renewal, ingest failed for ever."""
    collector, producing = await started_collector(kafka, settings_for, tmp_path)
    raw = collector.ctx.topics.raw
    try:
        failed = collector.publisher
        assert failed is not None
        sender = failed.producer._sender

        async def refused(*args: Any, **kwargs: Any) -> Any:
            raise OutOfOrderSequenceNumber("injected: the broker refused the sequence")

        sender._send_produce_req = refused  # the sender routine dies of it, as aiokafka's does
        reachable = collector_app.durable_producer
        made = unreachable_producers(monkeypatch)  # and the renewal that follows does not start
        first = await collector._publish([Output(raw, b"k", b"first")], collector._events)
        assert isinstance(first[0], BaseException)
        await wait_for(lambda: bool(made) and not collector._renewing.locked(), 15, "the refused renewal")
        assert collector.publisher is failed and sender.sender_task.done()
        monkeypatch.setattr(collector_app, "durable_producer", reachable)  # reachable again, the backoff over
        collector._renew_not_before = 0.0
        second = await collector._publish([Output(raw, b"k", b"second")], collector._events)
        assert isinstance(second[0], BaseException)  # the dead sender's
        await wait_for(lambda: collector.publisher is not failed, 15, "a renewal")
        third = await collector._publish([Output(raw, b"k", b"third")], collector._events)
        assert not isinstance(third[0], BaseException), third
    finally:
        await producing.stop()


async def test_a_stop_that_cuts_a_flush_short_leaves_no_sender_or_connection(
    kafka: LocalKafka, namespace: str, settings_for: Any, tmp_path: Path
) -> None:
    """Second review: the stop's grace cancelled the producer's `stop` part way (after `_closed` was set), so its
    sender, its refresh task and its sockets lived on, and a later batch could still have gone out."""
    collector, producing = await started_collector(  # the watchdog restarts nothing in time
        kafka, settings_for, tmp_path, metadata_stuck_after_s=60.0, stop_grace_s=1.0
    )
    producer = await wedged_with_a_batch_for_a_leaderless_partition(collector)
    await asyncio.wait_for(producing.stop(), 15)
    assert producer._sender.sender_task.done()
    assert producer.client._sync_task is None
    assert not any(c.connected() for c in producer.client._conns.values())
