"""Redis unavailable: `pause` holds events back and loses or duplicates nothing once Redis returns;
`pass-through` keeps delivering without the dedupe and ledger checks."""

from __future__ import annotations

import asyncio

import pytest

from devtools.redis import LocalRedis
from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from tests.helpers import SentryReceiver, post, wait_for, write_webhook_config


@pytest.mark.parametrize("mode", ["pause", "pass-through"])
async def test_redis_down(mode, tmp_path, namespace, port_base, settings_for, start_pipeline):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    redis = LocalRedis(url=f"redis://127.0.0.1:{port_base + 17}/0", data_dir=tmp_path / "redis")
    config = write_webhook_config(
        tmp_path / "hifi.yaml",
        hook.port,
        sections=f"dedupe: {{backend: redis, on_redis_down: {mode}}}\n"
        + "audit: {outage_alert_after_s: 2, canary_interval_s: 0}\n",
    )
    sentry = SentryReceiver()
    # nothing listens at the Redis URL yet
    pipeline = await start_pipeline(settings_for(config, redis_url=redis.url, sentry_dsn=sentry.dsn))
    try:
        factory = EventFactory(producer_id=namespace)
        events = [factory.make() for _ in range(40)]
        assert (await post(pipeline.collector_url, "k", events))[0] == 200  # the collector needs no Redis
        if mode == "pause":
            await asyncio.sleep(6.0)
            assert hook.received == [], "with Redis down, pause must hold events back"
            stats = pipeline.stats()["deduplicator"]
            assert stats["retries"] > 0 and stats["out"] == 0
            await wait_for(lambda: sentry.alerts("dedupe_store_unreachable"), 20, "the Redis alert", pipeline)
            await asyncio.to_thread(redis.ensure)
            await wait_for(lambda: len(hook.received) >= 40, 60, "delivery after Redis is back", pipeline)
            await asyncio.sleep(2.0)
            assert sorted(hook.counts().values()) == [1] * 40
            (alert,) = sentry.alerts("dedupe_store_unreachable")  # one page for the whole outage
            assert alert["fingerprint"] == ["hifi", "dedupe_store_unreachable", "deduplicator"]
            assert alert["level"] == "error" and "k" not in alert.get("extra", {})
        else:
            await wait_for(lambda: len(hook.received) >= 40, 60, "pass-through delivery", pipeline)
            assert pipeline.stats()["deduplicator"]["passed_unchecked"] >= 40
    finally:
        await hook.stop()
        redis.stop()
        sentry.close()
