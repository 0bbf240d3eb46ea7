"""Demo and test traffic: SDK-like events posted in batches to the collector."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import time
import uuid
from typing import Any

import aiohttp

USER_AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Mobile Safari/537.36",
    "Roku/DVP-12.5 (12.5.0.4178-88)",
]
EVENT_TYPES = ["play", "pause", "heartbeat", "seek", "buffer_start", "buffer_end", "error"]


class EventFactory:
    """Events carry a producer id and sequence number, so a receiver can prove nothing was lost."""

    def __init__(self, producer_id: str | None = None, devices: int = 50) -> None:
        self.producer_id = producer_id or uuid.uuid4().hex[:8]
        self.seq = itertools.count()
        self.devices = [f"dev-{self.producer_id}-{i}" for i in range(devices)]

    def make(self) -> dict[str, Any]:
        seq = next(self.seq)
        return {
            "event_id": f"{self.producer_id}-{seq}",
            "type": random.choice(EVENT_TYPES),
            "ts": time.time() * 1000,
            "device_id": random.choice(self.devices),
            "payload": {"producer": self.producer_id, "seq": seq, "position_s": random.randint(0, 7200)},
            "context": {"user_agent": random.choice(USER_AGENTS), "ip": f"10.{seq % 4}.{seq % 250}.{seq % 200 + 1}"},
        }


async def post_batch(
    session: aiohttp.ClientSession, url: str, api_key: str, events: list[dict[str, Any]], retries: int = 5
) -> dict[str, Any]:
    """Post like an SDK does: retry the whole batch on 5xx or connection errors (which may duplicate)."""
    for attempt in range(retries):
        try:
            async with session.post(url, json=events, headers={"X-Api-Key": api_key}) as resp:
                body = await resp.json(content_type=None)
                if resp.status < 500:
                    return {"status": resp.status, **(body or {})}
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2 * (attempt + 1))
    return {"status": 503, "accepted": [], "rejected": [{"reason": "gave_up"}]}


def send(url: str, api_key: str, path: str | None, count: int, batch: int, rate: float) -> None:
    if path:
        text = sys.stdin.read() if path == "-" else open(path).read()
        text = text.strip()
        events = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    else:
        factory = EventFactory()
        events = [factory.make() for _ in range(count)]

    async def go() -> None:
        accepted = rejected = 0
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            for i in range(0, len(events), batch):
                chunk = events[i : i + batch]
                if rate > 0:
                    await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                answer = await post_batch(session, url, api_key, chunk)
                accepted += len(answer.get("accepted", []))
                for item in answer.get("rejected", []):
                    rejected += 1
                    print(f"rejected: {json.dumps(item)}", file=sys.stderr)
                if answer.get("error"):
                    print(f"HTTP {answer['status']}: {answer['error']}: {answer.get('detail')}", file=sys.stderr)
        print(
            f"sent {len(events)} events in {time.monotonic() - started:.1f}s: {accepted} accepted, {rejected} rejected"
        )

    asyncio.run(go())
