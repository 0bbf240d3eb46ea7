"""Findings of the replay review on the sender: a forced replay retried after a partial delivery, and a
replayed event that dead-letters (both against the real broker, Redis and an HTTP webhook)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer

from devtools.kafka import LocalKafka
from devtools.redis import LocalRedis
from devtools.webhook import WebhookReceiver
from services.sender.app import SinkDelivery
from services.sender.sinks import WebhookSink
from shared.alerts import Alerter
from shared.archive import REPLAY_FORCE, REPLAY_HEADER, REPLAY_ONCE
from shared.codec import encode_event
from shared.config import SinkConfig
from shared.event import Event
from shared.keywindow import RedisKeyWindow
from shared.metrics import StageMetrics
from shared.retry import Backoff
from shared.stage import StageRunner
from tests.test_stage_runner import create_topic, make_runner, wait_for

pytestmark = pytest.mark.asyncio


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
