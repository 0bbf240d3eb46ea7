"""Each alert condition, provoked on the running pipeline, pages through Sentry exactly once, with
its stable fingerprint and level, and with no API key or payload value in it.

Services report to a local Sentry envelope endpoint (`SentryReceiver`) through the real sentry-sdk.
Loss is provoked in tests/test_auditor.py, Redis outages in tests/test_redis_down.py.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from devtools.kafka import LocalKafka
from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from shared.topics import Topics
from tests.helpers import SentryReceiver, post, wait_for, write_webhook_config
from tests.test_auditor import audit_summary

API_KEY = "acme-live-key-93be01"
SECRET_VALUE = "private-payload-value-4410"

AUDIT = (
    "audit: {bucket_s: 2, settle_s: 4, canary_interval_s: 0, dlq_check_s: 1, stuck_after_s: 4, outage_alert_after_s: 3}"
)


def write_config(path: Any, hook_port: int) -> None:
    write_webhook_config(path, hook_port, API_KEY, sections=AUDIT + "\n")


def events(factory: EventFactory, n: int) -> list[dict[str, Any]]:
    out = [factory.make() for _ in range(n)]
    for e in out:
        e["payload"]["note"] = SECRET_VALUE
    return out


def scrape(url: str) -> dict[str, float]:
    """The largest value of each metric family on a Prometheus page."""
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            out[name] = max(out.get(name, value), value)
    return out


def assert_one_clean_alert(sentry: SentryReceiver, name: str, fingerprint: list[str], level: str) -> None:
    found = sentry.alerts(name)
    assert len(found) == 1, f"{name}: expected exactly one alert, got {len(found)}: {[a['message'] for a in found]}"
    alert = found[0]
    assert alert["fingerprint"] == fingerprint
    assert alert["level"] == level
    dumped = json.dumps(alert)
    assert API_KEY not in dumped and SECRET_VALUE not in dumped, f"{name} leaks a secret or payload"


async def test_dlq_growth_slo_burn_circuit_and_stuck_partition_page_once_each(
    tmp_path, namespace, port_base, kafka, settings_for, start_pipeline
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    sentry = SentryReceiver()
    config = tmp_path / "hifi.yaml"
    write_config(config, hook.port)
    pipeline = await start_pipeline(settings_for(config, sentry_dsn=sentry.dsn), auditor=True)
    factory = EventFactory(producer_id=namespace, devices=1)  # one device: one partition per topic
    try:
        assert (await post(pipeline.collector_url, API_KEY, events(factory, 20)))[0] == 200
        await wait_for(lambda: len(hook.received) >= 20, 60, "warm-up deliveries", pipeline)

        # DLQ growth: bytes no stage can decode, written straight to the raw topic, once the auditor has
        # read the DLQ sizes (growth is measured from its first reading; letters from before are not news).
        await wait_for(lambda: asyncio.to_thread(lambda: audit_summary(pipeline)["dlq"]), 30, "a DLQ reading", pipeline)
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait(Topics(namespace).raw, b"\xc1 not msgpack " + bytes([i]), key=b"x")
        finally:
            await producer.stop()
        await wait_for(lambda: sentry.alerts("dlq_growth"), 30, "the dlq_growth alert", pipeline)

        # SLO burn: a sink that answers after 1.3 s, past the 1 s SLA.
        hook.delay_s = 1.3
        for _ in range(3):
            assert (await post(pipeline.collector_url, API_KEY, events(factory, 10)))[0] == 200
        await wait_for(lambda: sentry.alerts("slo_burn"), 40, "the slo_burn alert", pipeline)
        hook.delay_s = 0.0

        # A failing sink: the circuit opens, and its partition stops moving while events wait.
        hook.fail_status = 500
        assert (await post(pipeline.collector_url, API_KEY, events(factory, 20)))[0] == 200
        await wait_for(lambda: sentry.alerts("circuit_opened"), 40, "the circuit_opened alert", pipeline)
        await wait_for(lambda: sentry.alerts("stuck_partition"), 40, "the stuck_partition alert", pipeline)

        # consumer lag, in offsets and in seconds, on the stuck sender's /metrics: the seconds keep growing
        # while the partition is stuck, so wait for them rather than read them once at the alert.
        def lagging() -> bool:
            lag = scrape(pipeline.services["sender.hook"].url("/metrics"))
            return lag["hifi_consumer_lag_messages"] >= 20 and lag["hifi_consumer_lag_seconds"] > 4.0

        await wait_for(lambda: asyncio.to_thread(lagging), 20, "consumer lag over 20 events and 4 s", pipeline)

        # the waiting events are overdue, not lost: nothing deleted them, the sender has them in its backlog
        def overdue() -> int:
            summary = audit_summary(pipeline)
            assert summary["loss"] == [], summary
            return sum(r["lost"] for r in summary["overdue"])

        await wait_for(lambda: asyncio.to_thread(overdue), 30, "the waiting events reported overdue", pipeline)
        async with aiohttp.ClientSession() as session:
            async with session.get(pipeline.services["sender.hook"].url("/partitions")) as resp:
                progress = await resp.json()
        assert progress["rejoins"] == 1, progress  # the watchdog made the worker rejoin its group, once
        assert any(p["lag_messages"] >= 20 for p in progress["partitions"].values()), progress
        await asyncio.sleep(4.0)  # the watchdog keeps checking: it must not page again
        hook.fail_status = None
        await wait_for(lambda: len(hook.received) >= 70, 60, "delivery after the sink healed", pipeline)
        await asyncio.sleep(2.0)

        assert_one_clean_alert(sentry, "dlq_growth", ["hifi", "dlq_growth", "auditor", "enricher"], "warning")
        assert_one_clean_alert(sentry, "slo_burn", ["hifi", "slo_burn", "auditor", "acme/hook"], "error")
        assert_one_clean_alert(sentry, "circuit_opened", ["hifi", "circuit_opened", "sender.hook", "hook"], "error")
        assert_one_clean_alert(sentry, "stuck_partition", ["hifi", "stuck_partition", "sender.hook"], "error")
        stuck = sentry.alerts("stuck_partition")[0]
        assert (
            Topics(namespace).sink("hook") in stuck["message"]["formatted"]
            if isinstance(stuck.get("message"), dict)
            else Topics(namespace).sink("hook") in json.dumps(stuck)
        )
        assert sorted(hook.counts().values()) == [1] * 70  # nothing lost or doubled on the way
        assert not sentry.alerts("loss_detected") and not sentry.alerts("broker_unreachable")
    finally:
        await hook.stop()
        sentry.close()


async def test_broker_unreachable_pages_once(tmp_path, namespace, port_base, settings_for, start_pipeline):
    broker = LocalKafka(nodes=1, port=port_base + 15, data_root=tmp_path / "kafka")
    await asyncio.to_thread(broker.start)
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    sentry = SentryReceiver()
    config = tmp_path / "hifi.yaml"
    write_config(config, hook.port)
    pipeline = None
    try:
        pipeline = await start_pipeline(
            settings_for(config, sentry_dsn=sentry.dsn, broker=broker.bootstrap, partitions=1), auditor=True
        )
        factory = EventFactory(producer_id=namespace)
        assert (await post(pipeline.collector_url, API_KEY, events(factory, 10)))[0] == 200
        await wait_for(lambda: len(hook.received) >= 10, 60, "deliveries", pipeline)
        await asyncio.to_thread(broker.stop)
        await wait_for(lambda: sentry.alerts("broker_unreachable"), 60, "the broker_unreachable alert")
        await asyncio.sleep(3.0)  # still down, still one page
        await asyncio.to_thread(broker.start)
        assert (await post(pipeline.collector_url, API_KEY, events(factory, 10)))[0] == 200
        await wait_for(lambda: len(hook.received) >= 20, 90, "deliveries after the broker is back", pipeline)
        assert_one_clean_alert(sentry, "broker_unreachable", ["hifi", "broker_unreachable", "auditor"], "error")
    finally:
        if pipeline is not None:  # before the broker goes: the services commit and leave their groups
            codes = await asyncio.to_thread(pipeline.stop_all)
            assert all(code in (0, None) for code in codes.values()), codes
        await hook.stop()
        sentry.close()
        await asyncio.to_thread(broker.stop)
