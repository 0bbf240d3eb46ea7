"""The bench's client: the shapes of traffic, the events, and the open-loop generator that posts them."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

API_KEY = "bench-key"


@dataclass(frozen=True)
class Shape:
    """What the pipeline carries during a run: tenants, sinks, auditor, devices, re-sends, event size."""

    name: str
    tenants: int
    file_sink: bool  # each tenant also subscribed to a file sink (fsynced before the ack)
    auditor: bool  # the auditor runs, with canaries every `canary_interval_s`
    devices: int
    resend_ratio: float  # share of batches a client posts again (same event ids), which dedupe must drop
    payload_bytes: tuple[int, int] | None  # serialised event size range; None: the bare heartbeat (~150 B)

    @property
    def sinks(self) -> tuple[str, ...]:
        return ("hook", "files") if self.file_sink else ("hook",)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenants": self.tenants,
            "sinks_per_tenant": len(self.sinks),
            "sinks": list(self.sinks),
            "auditor": self.auditor,
            "canaries": self.auditor,
            "devices": self.devices,
            "resend_ratio": self.resend_ratio,
            "payload_bytes": list(self.payload_bytes) if self.payload_bytes else None,
        }


SHAPES = {
    "production": Shape("production", 2, True, True, 200, 0.05, (512, 1024)),
    "minimal": Shape("minimal", 1, False, False, 500, 0.0, None),
}


USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0",
    "okhttp/4.12.0 AcmeApp/3.2.1 (Android 14; Pixel 8)",
)


def tenant_names(shape: Shape) -> list[str]:
    """The tenants a shape's config declares and its load posts for, in turn."""
    return [f"bench{i}" for i in range(shape.tenants)]


def api_key(tenant: str) -> str:
    """A tenant's plain API key (the config holds its hash)."""
    return f"{API_KEY}-{tenant}"


@dataclass
class Load:
    """What the client did: the ids the collector accepted, and how many events it posted.

    `accepted` holds every event taken, the run's warm-up included (each must reach every sink once);
    `measured` those of the measured window after it, the denominator of latency, on-time and CPU figures."""

    accepted: set[str]
    offered: int  # events posted, re-sends included
    resent: int  # events posted a second time (same id), which dedupe must drop
    achieved_eps: float  # accepted per second of the measured window
    refused: dict[str, int] = field(default_factory=dict)  # requests not accepted whole, by status or error
    measured: set[str] = field(default_factory=set)


def make_events(
    shape: Shape,
    rng: random.Random,
    prefix: str,
    first: int,
    count: int,
    intended_ms: float,
    warmup: bool = False,
) -> list[dict[str, Any]]:
    """One batch of `count` events with ids `{prefix}-{i}`, keyed by device from `first` on, each stamped with
    `intended_ms`: bare heartbeats, or (a shape with `payload_bytes`) page views padded into that size range.
    `warmup` marks them as the run's warm-up (`payload.warmup`): the sinks count their copies, not their latency."""
    events = []
    base_sizes: dict[int, int] = {}  # per user agent, the one field whose length varies much
    for i in range(count):
        device = (first + i) % shape.devices
        payload: dict[str, Any] = {"intended_ms": intended_ms, "seq": i}
        if warmup:
            payload["warmup"] = True
        event: dict[str, Any] = {
            "event_id": f"{prefix}-{i}",
            "type": "heartbeat",
            "ts": intended_ms,
            "device_id": f"dev-{device}",
            "payload": payload,
        }
        if shape.payload_bytes:
            event["type"] = "page_view"
            event["context"] = {
                "user_agent": USER_AGENTS[device % len(USER_AGENTS)],
                "ip": f"10.{device // 250}.{device % 250}.17",
            }
            # One serialisation per user agent per batch, not per event: the harness shares the CPU it
            # measures. Ids and IPs vary by a few bytes, which the 32-byte margin on each side absorbs.
            ua = device % len(USER_AGENTS)
            if ua not in base_sizes:
                base_sizes[ua] = len(json.dumps(event, separators=(",", ":"))) + 10  # 10: ,"data":""
            lo, hi = shape.payload_bytes
            event["payload"]["data"] = "x" * max(0, rng.randint(lo + 32, hi - 32) - base_sizes[ua])
        events.append(event)
    return events


async def open_loop(
    url: str,
    rate: float,
    duration: float,
    batch: int,
    shape: Shape | None = None,
    seed: int = 0,
    warmup_s: float = 0.0,
) -> Load:
    """Post batches at fixed intended times, each tenant's in turn; a `shape.resend_ratio` share of
    batches is posted again one interval later (a client retrying after a lost response). The first
    `warmup_s` (then `duration` more) are the run's warm-up: the same load, marked, outside `Load.measured`."""
    shape = shape or SHAPES["minimal"]
    tenants = tenant_names(shape)
    rng = random.Random(seed)
    accepted: set[str] = set()
    refused: dict[str, int] = {}
    run_id = uuid.uuid4().hex[:6]
    interval = batch / rate
    start = time.monotonic()
    wall_start = time.time() * 1000
    n = offered = resent = 0
    measured_ids: set[str] = set()
    resend: tuple[str, list[dict[str, Any]]] | None = None
    tasks: set[asyncio.Task[Any]] = set()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def send(tenant: str, events: list[dict[str, Any]]) -> None:
            try:
                body_out = msgspec.json.encode(events)  # the load shares the CPU it measures: C, not json
                headers = {"X-Api-Key": api_key(tenant), "Content-Type": "application/json"}
                async with session.post(url, data=body_out, headers=headers) as resp:
                    body = msgspec.json.decode(await resp.read())
                    accepted.update(body.get("accepted", []))
                    if resp.status != 200:
                        refused[f"HTTP {resp.status}"] = refused.get(f"HTTP {resp.status}", 0) + 1
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
                refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1

        def post(tenant: str, events: list[dict[str, Any]]) -> None:
            task = asyncio.create_task(send(tenant, events))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        while True:
            intended = start + n * interval
            if intended - start >= warmup_s + duration:
                break
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if resend is not None:
                post(*resend)
                resent += len(resend[1])
                resend = None
            intended_ms = wall_start + (intended - start) * 1000
            tenant = tenants[n % len(tenants)]
            warming = intended - start < warmup_s
            events = make_events(shape, rng, f"{run_id}-{n}", n * batch, batch, intended_ms, warmup=warming)
            if not warming:
                measured_ids.update(e["event_id"] for e in events)
            post(tenant, events)
            offered += batch
            if int((n + 1) * shape.resend_ratio) > int(n * shape.resend_ratio):
                resend = (tenant, events)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    measured = accepted & measured_ids
    elapsed = time.monotonic() - start - warmup_s
    return Load(accepted, offered + resent, resent, len(measured) / elapsed if elapsed > 0 else 0.0, refused, measured)
