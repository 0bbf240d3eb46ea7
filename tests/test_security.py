"""Who gets in, and what no input can do: signatures, key rotation, tenant isolation, the shared rate
limit, protected views, and a corpus of hostile requests against the running system."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import aiohttp

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from shared.config import RateLimit, Settings, hash_api_key
from shared.ratelimit import TenantRateLimiter
from shared.sentry import scrub
from tests.helpers import post, tenant_block, wait_for, write_webhook_config


def sign(secret: bytes, body: bytes, at: float) -> dict[str, str]:
    stamp = f"{at:.0f}"
    return {
        "X-Hifi-Timestamp": stamp,
        "X-Hifi-Signature": "v1=" + hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest(),
    }


async def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


def test_settings_and_sentry_events_never_show_secrets():
    shown = repr(Settings(redis_url="redis://:hunter2@db:6379/0", sentry_dsn="https://k@o.ingest/1", read_token="t0k"))
    assert "hunter2" not in shown and "t0k" not in shown and "k@o" not in shown
    event = {
        "request": {"headers": {"X-Api-Key": "secret", "Accept": "*/*"}, "data": "{payload}"},
        "extra": {"api_key": "secret", "nested": {"payload": {"x": 1}}, "count": 3},
    }
    cleaned = json.dumps(scrub(event, {}))
    assert "secret" not in cleaned and "payload}" not in cleaned and '"count": 3' in cleaned


async def test_rate_limit_is_shared_across_collector_replicas(redis_server, namespace):
    replica_a = TenantRateLimiter(redis_server.url, namespace)
    replica_b = TenantRateLimiter(redis_server.url, namespace)
    limit = RateLimit(events_per_s=10, burst=20)
    assert await replica_a.take("acme", limit, 15) is None
    wait = await replica_b.take("acme", limit, 15)  # the same bucket: only ~5 tokens left
    assert wait is not None and 0.8 < wait <= 1.1
    await asyncio.sleep(wait)
    assert await replica_b.take("acme", limit, 15) is None


async def test_who_gets_in_and_hostile_input(tmp_path, namespace, port_base, settings_for, start_pipeline, monkeypatch):
    monkeypatch.setenv("HIFI_TEST_SECRET", "s3cret")
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    tenants = (
        tenant_block("acme", "key-acme", ["hook"])
        + "    signing_secret_env: HIFI_TEST_SECRET\n"
        + "  globex:\n"
        + f'    api_keys: ["{hash_api_key("key-globex-old")}", "{hash_api_key("key-globex-new")}"]\n'  # rotation
        + "    sinks: [hook]\n"
        + "    rate_limit: {events_per_s: 20, burst: 60}\n"
    )
    config = write_webhook_config(tmp_path / "hifi.yaml", hook.port, tenants=tenants)
    pipeline = await start_pipeline(settings_for(config, read_token="reader-token"))
    url = pipeline.collector_url
    factory = EventFactory(producer_id=namespace)
    good: list[str] = []
    try:
        # Signed requests: only a fresh, matching signature gets in.
        batch = [factory.make() for _ in range(5)]
        body = json.dumps(batch).encode()
        base = {"X-Api-Key": "key-acme", "Content-Type": "application/json"}
        assert (await raw_post(url, body, base))[1]["error"] == "missing_signature"
        assert (await raw_post(url, body, {**base, **sign(b"wrong", body, time.time())}))[1]["error"] == "bad_signature"
        assert (await raw_post(url, body, {**base, **sign(b"s3cret", body, time.time() - 900)}))[1]["error"] == (
            "stale_signature"
        )
        assert (await raw_post(url, body + b" ", {**base, **sign(b"s3cret", body, time.time())}))[1]["error"] == (
            "bad_signature"
        )
        status, answer = await raw_post(url, body, {**base, **sign(b"s3cret", body, time.time())})
        assert status == 200
        good += answer["accepted"]

        # Key rotation: the old and the new key of globex both work; a key never writes for another tenant.
        for key in ("key-globex-old", "key-globex-new"):
            status, answer = await post(url, key, [factory.make()])
            assert status == 200
            good += answer["accepted"]
        status, answer = await post(url, "key-globex-new", [{**factory.make(), "tenant": "acme"}])
        assert status == 422 and answer["rejected"][0]["reason"] == "unknown_field"

        # The per-tenant rate limit (globex: 20 events/s, burst 60; 2 spent above) answers 429 + Retry-After.
        status, answer = await post(url, "key-globex-old", [factory.make() for _ in range(50)])
        assert status == 200
        good += answer["accepted"]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url, json=[factory.make() for _ in range(30)], headers={"X-Api-Key": "key-globex-old"}
            ) as resp:
                assert resp.status == 429 and float(resp.headers["Retry-After"]) > 0
                assert (await resp.json())["error"] == "rate_limited"
        status, answer = await post(url, "key-globex-old", [factory.make() for _ in range(100)])
        assert status == 413 and answer["error"] == "batch_exceeds_burst"

        # Hostile corpus: each gets its 4xx and a machine-readable reason.
        acme_signed = lambda b, ctype="application/json": {  # noqa: E731
            "X-Api-Key": "key-acme",
            "Content-Type": ctype,
            **sign(b"s3cret", b, time.time()),
        }
        deep = b"[" * 100_000 + b"]" * 100_000
        corpus = [
            (b'[{"event_id": "\xff\xfe", "type": "t", "ts": 1}]', "application/json", 400, "malformed_body"),
            (b'[{"event_id": "big", "type": "t", "ts": 1e400}]', "application/json", 422, None),
            (
                b'[{"event_id": "int", "type": "t", "ts": 1, "payload": {"n": 1' + b"0" * 40 + b"}}]",
                "application/json",
                422,
                None,
            ),
            (deep, "application/json", 400, "malformed_body"),
            (b"x" * (10 * 1024 * 1024), "application/json", 413, "body_too_large"),
            (b"[]", "text/plain", 415, "unsupported_content_type"),
            (b'[{"event_id": "d", "event_id": "e", "type": "t", "ts": 1}]', "application/json", 400, "malformed_body"),
            (b'[{"event_id": "n", "type": "t", "ts": NaN}]', "application/json", 400, "malformed_body"),
            (b"\x91\x81\xa1a\xc1", "application/msgpack", 400, "malformed_body"),
        ]
        for body, ctype, want_status, want_reason in corpus:
            status, answer = await raw_post(url, body, acme_signed(body, ctype))
            assert status == want_status, (body[:60], answer)
            if want_reason:
                assert answer["error"] == want_reason, answer
            else:
                assert answer["rejected"][0]["reason"] in ("wrong_type", "out_of_range"), answer

        # A client that trickles its body is cut off (408) instead of holding a connection forever.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.split(":")[2].split("/")[0]))
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Api-Key: key-globex-old\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n[{"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), 20)
        assert b" 408 " in head, head
        writer.close()

        # The collector is still healthy, and every good event of this run arrived.
        async with aiohttp.ClientSession() as session:
            async with session.get(pipeline.services["collector"].url("/health")) as resp:
                assert resp.status == 200
            stats_url = pipeline.services["collector"].url("/stats")
            async with session.get(stats_url) as resp:
                assert resp.status == 401
            async with session.get(stats_url, headers={"Authorization": "Bearer reader-token"}) as resp:
                assert resp.status == 200
            async with session.get(pipeline.services["deduplicator"].url("/tables/dedupe-window")) as resp:
                assert resp.status == 401
        await wait_for(lambda: {e["event_id"] for e in hook.received} >= set(good), 60, "good events")
        assert "key-" not in json.dumps(hook.received) and "s3cret" not in json.dumps(hook.received)
        for label in pipeline.services:
            assert "s3cret" not in pipeline.tail(label, 500) and "key-acme" not in pipeline.tail(label, 500)
    finally:
        await hook.stop()
