"""The dedupe window on both backends, on the real pipeline: a copy inside the window is dropped,
a copy after it has expired is delivered again (it is a new event as far as the window knows)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from tests.helpers import post, tenant_block, wait_for

WINDOW_S = 3


def one_hook_config(tmp_path: Path, hook_port: int, backend: str, window_s: float) -> Path:
    """One tenant, one webhook sink, and the dedupe window under test."""
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", "k", ["hook"])
        + f"""sinks:
  hook: {{type: webhook, url: "http://127.0.0.1:{hook_port}/in"}}
dedupe: {{backend: {backend}, window_s: {window_s}}}
"""
    )
    return config


@pytest.mark.parametrize("backend", ["rocksdb", "redis"])
async def test_window_drops_copies_inside_and_expires_after(
    backend, tmp_path, namespace, port_base, settings_for, start_pipeline, redis_client
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    config = one_hook_config(tmp_path, hook.port, backend, WINDOW_S)
    pipeline = await start_pipeline(settings_for(config))
    try:
        factory = EventFactory(producer_id=namespace)
        events = [factory.make() for _ in range(10)]
        assert (await post(pipeline.collector_url, "k", events))[0] == 200
        assert (await post(pipeline.collector_url, "k", events))[0] == 200  # client retry: inside the window
        await wait_for(lambda: len(hook.received) >= 10, 60, "first delivery", pipeline)
        await asyncio.sleep(WINDOW_S + 1.0)
        assert len(hook.received) == 10, "copies inside the window must be dropped"

        assert (await post(pipeline.collector_url, "k", events[:4]))[0] == 200  # after the window expired
        await wait_for(lambda: len(hook.received) >= 14, 60, "delivery after expiry", pipeline)
        assert sorted(e["event_id"] for e in hook.received[10:]) == sorted(e["event_id"] for e in events[:4])
        if backend == "redis":
            keys = [k async for k in redis_client.scan_iter(f"hifi:{namespace}:dedupe-window:*")]
            assert len(keys) == 10 or len(keys) == 4  # entries carry a TTL; expired ones are gone
            ttl = await redis_client.pttl(keys[0])
            assert 0 < ttl <= WINDOW_S * 1000
    finally:
        await hook.stop()


async def test_a_worker_without_its_store_restores_the_window_from_the_changelog(
    tmp_path, namespace, port_base, settings_for, start_pipeline
):
    """A pod rescheduled without its volume (or a sender, which has none) starts with an empty RocksDB
    directory: the window comes back from the changelog, so a client retry after the move is still
    dropped as a copy."""
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    config = one_hook_config(tmp_path, hook.port, "rocksdb", 600)
    settings = settings_for(config)
    pipeline = await start_pipeline(settings)
    try:
        factory = EventFactory(producer_id=namespace, devices=8)
        events = [factory.make() for _ in range(40)]
        assert (await post(pipeline.collector_url, "k", events))[0] == 200
        await wait_for(lambda: len(hook.received) >= 40, 60, "first delivery", pipeline)

        assert await asyncio.to_thread(pipeline.stop, "deduplicator") == 0
        tables = Path(settings.data_dir) / "tables"
        store = next(tables.glob("*hifi-deduplicator/dedupe-window"))
        assert list(store.glob("p*")), "the deduplicator kept its window in RocksDB"
        shutil.rmtree(store)
        # A record the store did not write (e.g. left by another tool) is skipped, not fatal.
        producer = AIOKafkaProducer(bootstrap_servers=settings.broker)
        await producer.start()
        try:
            changelog = f"{namespace}.hifi-deduplicator.dedupe-window.changelog"
            await producer.send_and_wait(changelog, b"\x93\x01\x02", partition=0)
        finally:
            await producer.stop()
        pipeline.start("deduplicator")
        await asyncio.to_thread(pipeline.wait_ready, 60.0, ["deduplicator"])

        assert (await post(pipeline.collector_url, "k", events))[0] == 200  # the retry, after the move
        fresh = [factory.make() for _ in range(5)]
        assert (await post(pipeline.collector_url, "k", fresh))[0] == 200
        await wait_for(lambda: len(hook.received) >= 45, 60, "the fresh events", pipeline)
        await asyncio.sleep(2.0)
        counts = hook.counts()
        assert len(hook.received) == 45 and max(counts.values()) == 1, "copies after the restore were delivered"
        # The deduplicator itself dropped them (the senders' ledger would have hidden a miss here).
        dedupe = pipeline.stats()["deduplicator"]
        assert dedupe["duplicates"] == 40 and dedupe["out"] == 5, dedupe
    finally:
        await hook.stop()
