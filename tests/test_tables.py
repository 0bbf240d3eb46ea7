"""The table browser on two deduplicator workers: sizes, owners, paging through every entry, and
lookups answered by the worker that holds the key, forwarded there when asked elsewhere."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiokafka.partitioner import murmur2

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from tests.helpers import post, wait_for, write_webhook_config


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return resp.status, await resp.json()


async def test_table_browser_pages_sizes_and_routes_to_the_owner(
    tmp_path, namespace, port_base, settings_for, start_pipeline
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    config = write_webhook_config(tmp_path / "hifi.yaml", hook.port)
    pipeline = await start_pipeline(settings_for(config))
    second = pipeline.add_worker("deduplicator")
    await asyncio.to_thread(pipeline.wait_ready, 60.0, [second])
    workers = [pipeline.services["deduplicator"], pipeline.services[second]]
    try:
        factory = EventFactory(producer_id=namespace, devices=12)
        events = [factory.make() for _ in range(60)]
        assert (await post(pipeline.collector_url, "k", events))[0] == 200
        await wait_for(lambda: len(hook.received) >= 60, 60, "delivery", pipeline)

        async def owners_settled() -> bool:
            _, body = await get(workers[0].url("/tables"))
            owners = body["tables"][0]["owners"]
            return len(owners) == 2 and sorted(p for ps in owners.values() for p in ps) == [0, 1, 2, 3]

        await wait_for(owners_settled, 30, "both workers in the owner map", pipeline)
        status, summary = await get(workers[0].url("/tables"))
        assert status == 200
        (table,) = summary["tables"]
        assert table["name"] == "dedupe-window" and table["backend"] == "rocksdb"
        owners: dict[str, list[int]] = table["owners"]
        assert set(owners) == {w.url("").rstrip("/") for w in workers}

        # Paging: every entry, each once, from the worker that holds its partition.
        seen: list[str] = []
        sizes = 0
        for worker in workers:
            cursor = ""
            while True:
                status, page = await get(worker.url(f"/tables/dedupe-window?limit=7&cursor={cursor}"))
                assert status == 200 and len(page["entries"]) <= 7
                seen += [e["key"] for e in page["entries"]]
                if page["next_cursor"] is None:
                    break
                cursor = page["next_cursor"]
            _, tables = await get(worker.url("/tables"))
            sizes += tables["tables"][0]["size"]
        assert sorted(seen) == sorted(f"acme:{e['event_id']}" for e in events)
        assert sizes >= 60  # RocksDB's estimate: never fewer than were written here

        # Lookup, naming the partition key: forwarded to the owner when asked of the other worker.
        event = events[0]
        partition = (murmur2(f"acme:{event['device_id']}".encode()) & 0x7FFFFFFF) % 4
        owner = next(host for host, parts in owners.items() if partition in parts)
        other = next(w for w in workers if w.url("").rstrip("/") != owner)
        url = other.url(f"/tables/dedupe-window?key=acme:{event['event_id']}&partition_key=acme:{event['device_id']}")
        status, found = await get(url)
        assert status == 200 and found["worker"] == owner and found["entry"]["live"] is True
        assert found["entry"]["claim"].startswith(f"{namespace}.hifi.enriched:{partition}:")
        # Without it, every worker is asked.
        for worker in workers:
            status, found = await get(worker.url(f"/tables/dedupe-window?key=acme:{event['event_id']}"))
            assert status == 200 and found["worker"] == owner
        status, missing = await get(workers[0].url("/tables/dedupe-window?key=acme:never-sent"))
        assert status == 404 and len(missing["asked"]) == 2
        status, _ = await get(workers[0].url("/tables/no-such-table"))
        assert status == 404

        # The sender's tables: its delivered ledger and its sink's live state.
        sender = pipeline.services["sender.hook"]
        status, state = await get(sender.url("/tables/sink-state"))
        assert status == 200 and state["entries"][0]["circuit"] == "closed"
        status, ledger = await get(sender.url(f"/tables/delivered-ledger?key=hook:acme:{event['event_id']}"))
        assert status == 200 and ledger["entry"]["live"] is True
    finally:
        await hook.stop()
