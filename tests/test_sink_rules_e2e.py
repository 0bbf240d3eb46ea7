"""Per-sink filters, consent and transforms on the real pipeline: each sink gets exactly the events its
rules let through, in the shape its transforms give them, and the auditor counts the rest `filtered`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer

from devtools.webhook import WebhookReceiver
from shared.codec import unpack
from shared.topics import Topics
from tests.helpers import post, tenant_block, wait_for
from tests.test_auditor import audit_summary

SECRETS = {"acme": "acme-pii-secret-1", "globex": "globex-pii-secret-2"}
KEYS = {"acme": "key-acme", "globex": "key-globex"}
TYPES = ("play", "pause", "seek")
CONSENTS = ([], ["analytics"], ["analytics", "marketing"], ["marketing"])


def make_event(tenant: str, i: int) -> dict[str, Any]:
    return {
        "event_id": f"{tenant}-{i}",
        "type": TYPES[i % 3],
        "ts": time.time() * 1000,
        "device_id": f"device-{i % 5}",
        "consent": list(CONSENTS[i % 4]),
        "payload": {"bitrate_kbps": (i % 5) * 64, "email": f"user{i}@example.com", "plan": "gold", "debug": "x"},
        "context": {"ip": f"198.51.100.{i % 250}", "user_agent": "test-agent"},
    }


def to_analytics(tenant: str, e: dict[str, Any]) -> bool:
    return e["type"] == "play" and e["payload"]["bitrate_kbps"] > 0 and "analytics" in e["consent"]


def to_crm(tenant: str, e: dict[str, Any]) -> bool:
    return tenant != "globex" and "marketing" in e["consent"]


def mac(tenant: str, value: str) -> str:
    return hmac.new(SECRETS[tenant].encode(), value.encode(), hashlib.sha256).hexdigest()


async def read_sink_topic(bootstrap: str, topic: str, expect: int) -> list[tuple[bytes, dict[str, Any]]]:
    """What the router wrote to a sink's topic (record key, msgpack event), once `expect` records are in."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[tuple[bytes, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend((r.key, unpack(r.value)) for r in records)
    finally:
        await consumer.stop()
    return out


def router_metrics(pipeline: Any) -> str:
    with urllib.request.urlopen(pipeline.services["router"].url("/metrics"), timeout=5) as resp:
        return resp.read().decode()


async def test_each_sink_gets_what_its_filter_and_consent_let_through_transformed(
    tmp_path, namespace, port_base, settings_for, start_pipeline, monkeypatch, kafka
):
    analytics = WebhookReceiver(port=port_base + 19)
    crm = WebhookReceiver(port=port_base + 18)
    await analytics.start()
    await crm.start()
    for tenant, secret in SECRETS.items():
        monkeypatch.setenv(f"HIFI_TEST_PII_{tenant.upper()}", secret)  # the services inherit it
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", KEYS["acme"], ["analytics", "crm"])
        + "    pii_secret_env: HIFI_TEST_PII_ACME\n"
        + tenant_block("globex", KEYS["globex"], ["analytics", "crm"])
        + "    pii_secret_env: HIFI_TEST_PII_GLOBEX\n"
        + f"""sinks:
  analytics:
    type: webhook
    url: "http://127.0.0.1:{analytics.port}/in"
    filter: {{types: [play], where: "payload.bitrate_kbps > `0`"}}
    consent: {{require: [analytics]}}
    transform:
      - hash: [payload.email, device_id]
      - mask_ip: context.ip
      - drop: [payload.debug, context.user_agent]
      - add: {{payload.source: hifi}}
  crm:
    type: webhook
    url: "http://127.0.0.1:{crm.port}/in"
    filter: {{exclude_tenants: [globex]}}
    consent: {{require: [marketing]}}
    transform:
      - keep: [payload.email, payload.plan]
      - mask_email: payload.email
      - rename: {{payload.plan: payload.tier}}
audit: {{bucket_s: 2, settle_s: 3, canary_interval_s: 0, dlq_check_s: 1}}
"""
    )
    pipeline = await start_pipeline(settings_for(config), auditor=True)
    try:
        sent = {tenant: [make_event(tenant, i) for i in range(120)] for tenant in KEYS}
        for start in range(0, 120, 40):
            for tenant, events in sent.items():
                status, body = await post(pipeline.collector_url, KEYS[tenant], events[start : start + 40])
                assert status == 200 and len(body["accepted"]) == 40, body
        want = {
            "analytics": {(t, e["event_id"]) for t, es in sent.items() for e in es if to_analytics(t, e)},
            "crm": {(t, e["event_id"]) for t, es in sent.items() for e in es if to_crm(t, e)},
        }
        assert 0 < len(want["analytics"]) < 240 and 0 < len(want["crm"]) < 240
        got = {"analytics": analytics.received, "crm": crm.received}
        for sink, received in got.items():
            await wait_for(lambda r=received, s=sink: len(r) >= len(want[s]), 90, f"the {sink} sink", pipeline)

        # The auditor: every bucket settled, nothing short, the rest counted filtered per sink.
        def settled() -> bool:
            summary = audit_summary(pipeline)
            senders = summary["stage_totals"]
            return summary["buckets_open"] == 0 and all(
                senders.get(f"sender.{s}", {}).get("delivered", 0) >= len(want[s]) for s in want
            )

        await wait_for(settled, 60, "settled buckets", pipeline)
        summary = audit_summary(pipeline)
        assert (summary["loss"], summary["overdue"], summary["unconfirmed"]) == ([], [], []), summary
        filtered_want = {
            s: dict(Counter(t for t, es in sent.items() for e in es if not ok(t, e)))
            for s, ok in (("analytics", to_analytics), ("crm", to_crm))
        }
        assert summary["filtered"] == filtered_want

        for sink, received in got.items():
            keys = Counter((r["tenant"], r["event_id"]) for r in received)
            assert set(keys) == want[sink], f"{sink}: extra {set(keys) - want[sink]}, missing {want[sink] - set(keys)}"
            assert max(keys.values()) == 1, f"{sink} got duplicates"

        by_id = {(e["tenant"], e["event_id"]): e for e in analytics.received}
        for tenant, events in sent.items():
            for e in events:
                out = by_id.get((tenant, e["event_id"]))
                if out is None:
                    continue
                assert out["payload"]["email"] == mac(tenant, e["payload"]["email"])
                assert out["device_id"] == mac(tenant, e["device_id"])
                assert out["context"] == {"ip": e["context"]["ip"].rsplit(".", 1)[0] + ".0"}
                assert out["payload"] == {
                    "bitrate_kbps": e["payload"]["bitrate_kbps"],
                    "email": mac(tenant, e["payload"]["email"]),
                    "plan": "gold",
                    "source": "hifi",
                }
                # the idempotency key and the ledger's id are the untouched event's
                assert out["idempotency_key"] == f"analytics:{tenant}:{e['event_id']}"
        for out in crm.received:
            i = int(out["event_id"].rsplit("-", 1)[1])
            assert out["payload"] == {"email": "u***@example.com", "tier": "gold"}, out
            assert "context" not in out and out["device_id"] == f"device-{i % 5}"
            assert out["consent"] == list(CONSENTS[i % 4])

        # What a sink may not see never entered its topic (nor, so, its sender or dead letters).
        for sink in want:
            topic = Topics(namespace).sink(sink)
            in_topic = await read_sink_topic(kafka.bootstrap, topic, len(want[sink]))
            assert {(r["tenant"], r["event_id"]) for _, r in in_topic} == want[sink]
            assert not any("@example.com" in str(r) and "***@" not in str(r) for _, r in in_topic), sink
            # The record key (and so a dead letter's key) is the sink's view: a hashed device id stays hashed.
            for key, r in in_topic:
                assert key == f"{r['tenant']}:{r['device_id']}".encode(), (sink, key, r["device_id"])
        assert all(
            b"device-" not in key
            for key, _ in await read_sink_topic(
                kafka.bootstrap, Topics(namespace).sink("analytics"), len(want["analytics"])
            )
        )

        metrics = "\n".join(line for line in router_metrics(pipeline).splitlines() if "filtered" in line)
        assert 'hifi_events_filtered_total{reason="consent",sink="crm",tenant="acme",type="play"}' in metrics, metrics
        assert 'hifi_events_filtered_total{reason="tenant",sink="crm",tenant="globex",type="seek"}' in metrics
    finally:
        await asyncio.to_thread(pipeline.stop_all)
        await analytics.stop()
        await crm.stop()


def test_the_router_refuses_to_start_without_a_tenants_hashing_secret(tmp_path, settings_for, monkeypatch):
    monkeypatch.delenv("HIFI_TEST_PII_ACME", raising=False)
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", KEYS["acme"], ["analytics"])
        + "    pii_secret_env: HIFI_TEST_PII_ACME\n"
        + 'sinks:\n  analytics: {type: webhook, url: "http://127.0.0.1:9/in", transform: [{hash: payload.email}]}\n'
    )
    env = {**os.environ, **settings_for(config).as_env()}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "run", "router"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "config: tenants.acme.pii_secret_env: environment variable HIFI_TEST_PII_ACME is not set" in done.stderr
