"""The bench's limit: a bare aiokafka relay (consume -> produce, POST or append -> commit), no processing.

One process per hop. It uses the stages' producer settings and batching (shared.app, shared.publish), so
the gap between it and Hifi is what Hifi's processing costs, not a different producer.

    python -m devtools.relay SOURCE TARGET GROUP BOOTSTRAP

TARGET is an http(s) URL (POST the batch as {"events": [...]}), file:PATH (append JSON lines and fsync),
or topics, comma-separated.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import msgpack
from aiokafka import AIOKafkaConsumer

from shared.app import durable_producer
from shared.gc_policy import apply_gc_policy
from shared.publish import BatchPublisher, Output


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


async def relay(source: str, target: str, group: str, bootstrap: str) -> None:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        max_poll_records=500,
    )
    await consumer.start()
    session: aiohttp.ClientSession | None = None
    path: Path | None = None
    publisher: BatchPublisher | None = None
    producer = None
    topics: list[str] = []
    if target.startswith("http"):
        session = aiohttp.ClientSession()
    elif target.startswith("file:"):
        path = Path(target.removeprefix("file:"))
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        producer = durable_producer(bootstrap)
        await producer.start()
        publisher = BatchPublisher(producer)
        topics = target.split(",")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=500)
            records = [record for partition in batch.values() for record in partition]
            if not records:
                continue
            if session is not None:
                events = [msgpack.unpackb(r.value) for r in records]
                async with session.post(target, json={"events": events}) as resp:
                    await resp.read()
            elif path is not None:
                lines = "".join(json.dumps(msgpack.unpackb(r.value), separators=(",", ":")) + "\n" for r in records)
                await asyncio.to_thread(_append, path, lines.encode())
            elif publisher is not None:
                outputs = [Output(topic, r.key, r.value) for topic in topics for r in records]
                published = await publisher.publish(outputs)
                await asyncio.gather(*published.futures)
            await consumer.commit()
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()
        if session is not None:
            await session.close()


if __name__ == "__main__":
    apply_gc_policy()  # the limit runs under the collector policy Hifi's services run under
    asyncio.run(relay(*sys.argv[1:5]))
