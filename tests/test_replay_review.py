"""Findings of the replay review on the sender: a forced replay retried after a partial delivery, and a
replayed event that dead-letters (both against the real broker, Redis and an HTTP webhook)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from devtools.kafka import LocalKafka
from devtools.redis import LocalRedis
from devtools.s3 import LocalS3
from devtools.webhook import WebhookReceiver
from services.sender.archive import ArchiveSink
from services.sender.delivery import SinkDelivery
from services.sender.sinks import Source
from services.sender.webhook import WebhookSink
from shared.alerts import Alerter
from shared.archive import REPLAY_FORCE, REPLAY_HEADER, REPLAY_ONCE
from shared.codec import encode_event, unpack
from shared.config import HifiConfig, SinkConfig
from shared.event import Event
from shared.metrics import StageMetrics
from shared.redis_window import RedisKeyWindow
from shared.replay import ReplayError, replay
from shared.retry import Backoff
from shared.stage import StageRunner
from shared.topics import Topics
from tests.helpers import tenant_block
from tests.test_stage_runner import create_topic, make_runner, wait_for


class OnePartitionDown(WebhookReceiver):
    """Answers 503 to the first `failures` requests holding an event of source partition 1 (ids `p1-*`)."""

    failures: int = 3

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.failures > 0 and any(e["event_id"].startswith("p1-") for e in body["events"]):
            self.failures -= 1
            self.requests += 1
            return web.json_response({"error": "injected"}, status=503)
        for event in body["events"]:
            self.received.append(event)
        self.requests += 1
        return web.json_response({"ok": len(body["events"])})


@pytest.fixture
async def runners() -> AsyncIterator[list[StageRunner]]:
    started: list[StageRunner] = []
    yield started
    await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)


async def produce_replays(bootstrap: str, topic: str, events: dict[int, list[Event]], mode: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for partition, batch in events.items():
            for event in batch:
                await producer.send_and_wait(
                    topic, encode_event(event), partition=partition, headers=[(REPLAY_HEADER, mode.encode())]
                )
    finally:
        await producer.stop()


def replayed(delivery: SinkDelivery, outcome: str) -> float:
    return (
        delivery.metrics.registry.get_sample_value(
            "hifi_replayed_events_total", {"sink": delivery.name, "outcome": outcome}
        )
        or 0.0
    )


async def test_forced_replay_retried_after_one_partition_failed_sends_each_event_once(
    kafka: LocalKafka, redis_server: LocalRedis, namespace: str, port_base: int, runners: list[StageRunner]
) -> None:
    source = f"{namespace}.sink.hook"
    await create_topic(kafka.bootstrap, source, 2)
    receiver = OnePartitionDown(port=port_base + 7)
    await receiver.start()
    sink = WebhookSink(SinkConfig("hook", "webhook", {"url": f"http://127.0.0.1:{port_base + 7}/"}, timeout_s=5))
    ledger = RedisKeyWindow(redis_server.url, f"hifi:{namespace}:delivered-ledger:", 3600)
    delivery = SinkDelivery(sink, ledger, StageMetrics(), Alerter("sender.hook"), pass_through=False)
    now = time.time() * 1000
    events = {
        p: [Event(f"p{p}-{i}", "play", 1.0, "acme", {}, device_id=f"d{p}", ingest_ts=now) for i in range(5)]
        for p in (0, 1)
    }
    # the sink had them all once: --force is what sends them again
    every = [e for batch in events.values() for e in batch]
    await ledger.mark([f"hook:{e.dedupe_key}" for e in every], every)
    await produce_replays(kafka.bootstrap, source, events, REPLAY_FORCE)
    await sink.start()
    try:
        runner = make_runner(
            kafka.bootstrap, f"{namespace}-hook", "a", source, delivery.handle, batch_max=50, backoff=Backoff(0.05, 0.2)
        )
        runners.append(runner)
        await runner.start()
        await wait_for(
            lambda: replayed(delivery, "replayed") + replayed(delivery, "replay_skipped") >= 10,
            30,
            "the forced replay handled",
        )
        assert receiver.failures == 0, "the fault was not injected"
        got: dict[str, int] = {}
        for event in receiver.received:
            got[event["event_id"]] = got.get(event["event_id"], 0) + 1
        assert got == {e.event_id: 1 for e in every}, got
    finally:
        await sink.close()
        await receiver.stop()
        await ledger.close()


def test_ledger_keeps_a_replay_dead_letter_out_of_the_live_reconciliation() -> None:
    """10 routed, 9 delivered live and 1 replayed event dead-lettered: one live event is lost, not zero."""
    from services.auditor.ledger import LossLedger

    def tally(stage: str, runs: list[list[Any]]) -> dict[str, Any]:
        return {"stage": stage, "topic": f"in.{stage}", "partition": 0, "first": 0, "runs": runs}

    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 10]]})
    for stage in ("enricher", "deduplicator", "router"):
        ledger.add_tally(tally(stage, [["acme", 0, "out", 10]]))
    ledger.add_tally(tally("sender.hook", [["acme", 0, "delivered", 9], ["acme", 0, "replay_dlq", 1]]))
    (report,) = ledger.reconcile("acme", 0)
    assert (report.lost, report.stage, report.detail) == (1, "sender.hook", "router passed on 10, sender.hook read 9")
    assert ledger.totals["sender.hook"]["replay_dlq"] == 1


async def test_a_replayed_event_the_sink_refuses_is_a_replay_dead_letter(
    kafka: LocalKafka, redis_server: LocalRedis, namespace: str, port_base: int, runners: list[StageRunner]
) -> None:
    source = f"{namespace}.sink.hook"
    await create_topic(kafka.bootstrap, source, 1)
    receiver = WebhookReceiver(port=port_base + 8, reject_event=lambda event_id: event_id == "p0-2")
    await receiver.start()
    sink = WebhookSink(SinkConfig("hook", "webhook", {"url": f"http://127.0.0.1:{port_base + 8}/"}, timeout_s=5))
    ledger = RedisKeyWindow(redis_server.url, f"hifi:{namespace}:delivered-ledger:", 3600)
    delivery = SinkDelivery(sink, ledger, StageMetrics(), Alerter("sender.hook"), pass_through=False)
    now = time.time() * 1000
    events = {0: [Event(f"p0-{i}", "play", 1.0, "acme", {}, device_id="d0", ingest_ts=now) for i in range(5)]}
    await produce_replays(kafka.bootstrap, source, events, REPLAY_ONCE)
    await sink.start()
    try:
        runner = make_runner(kafka.bootstrap, f"{namespace}-hook", "a", source, delivery.handle, batch_max=50)
        runners.append(runner)
        await runner.start()
        await wait_for(lambda: replayed(delivery, "replayed") >= 4, 30, "the replay handled")
        await wait_for(lambda: replayed(delivery, "replay_dlq") >= 1, 10, "the refused replay counted")
        assert replayed(delivery, "dead_lettered") == 0
    finally:
        await sink.close()
        await receiver.stop()
        await ledger.close()


async def read_sink_topic(bootstrap: str, topic: str, partitions: int) -> list[dict[str, Any]]:
    """Everything in a sink's input topic (msgpack wire events), up to its end offsets now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[dict[str, Any]] = []
        while any([await consumer.position(tp) < ends[tp] for tp in parts]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(unpack(r.value) for r in records)
        return out
    finally:
        await consumer.stop()


def rules_config(path: Path, s3: LocalS3, bucket: str) -> None:
    path.write_text(
        "tenants:\n"
        + tenant_block("acme", "key-acme", ["hook"])
        + "    pii_secret_env: HIFI_TEST_PII_ACME\n"
        + tenant_block("globex", "key-globex", ["files"])
        + f"""sinks:
  hook:
    type: file
    path: "{path.parent / "hook"}"
    consent: {{require: [analytics]}}
    transform:
      - hash: [payload.email]
      - mask_ip: context.ip
  files: {{type: file, path: "{path.parent / "files"}"}}
  archive: {{type: s3_archive, bucket: "{bucket}", endpoint: "{s3.endpoint}"}}
"""
    )


async def test_replay_applies_the_sinks_consent_and_transform_and_refuses_an_unsubscribed_sink(
    tmp_path: Path, s3_server: LocalS3, bucket: str, settings_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIFI_TEST_PII_ACME", "acme-secret")
    config_path = tmp_path / "hifi.yaml"
    rules_config(config_path, s3_server, bucket)
    config, settings = HifiConfig.load(config_path), settings_for(config_path)
    hour = datetime(2026, 11, 30, 7, tzinfo=UTC)
    events = [
        Event(
            f"e{i}",
            "play",
            1.0,
            "acme",
            {"email": f"u{i}@example.com"},
            device_id=f"d{i}",
            context={"ip": "203.0.113.77"},
            consent=["analytics"] if i % 2 == 0 else [],
            ingest_ts=hour.timestamp() * 1000 + 10 + i,
        )
        for i in range(6)
    ]
    archive = ArchiveSink(config.sinks["archive"])
    await archive.start()
    await archive.deliver_batch(events, Source("in", 0, list(range(6))))

    report = await replay(settings, config, "acme", hour, hour + timedelta(hours=1), "hook")
    got = {
        e["event_id"]: e
        for e in await read_sink_topic(settings.broker, Topics(settings.namespace).sink("hook"), settings.partitions)
    }
    assert sorted(got) == ["e0", "e2", "e4"], sorted(got)  # no consent, no copy
    for event_id, wire in got.items():
        i = int(event_id[1:])
        expected = hmac.new(b"acme-secret", f"u{i}@example.com".encode(), hashlib.sha256).hexdigest()
        assert wire["payload"]["email"] == expected, wire
        assert wire["context"]["ip"] == "203.0.113.0", wire
    assert (report.events, report.filtered) == (3, 3)

    with pytest.raises(ReplayError, match="does not subscribe"):
        await replay(settings, config, "acme", hour, hour + timedelta(hours=1), "files")
