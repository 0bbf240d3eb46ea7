"""Reading what each kind of sink received, from the real destination."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from devtools.kafka import DEFAULT_HOME, LocalKafka
from shared.config import hash_api_key


def tenant_block(name: str, key: str, sinks: list[str], metadata: dict[str, Any] | None = None) -> str:
    meta = f"\n    metadata: {json.dumps(metadata)}" if metadata else ""
    return f"""  {name}:
    api_keys: ["{hash_api_key(key)}"]
    sinks: {json.dumps(sinks)}{meta}
"""


def write_webhook_config(
    path: Path,
    hook_port: int,
    key: str = "k",
    *,
    tenants: str | None = None,
    url_path: str = "/in",
    sink_options: str = "",
    sections: str = "",
) -> Path:
    """The pipeline most tests run: tenant acme (API key `key`) subscribed to one webhook sink `hook` on
    hook_port. `tenants` replaces the tenants' YAML, `sink_options` adds `, key: value` to the sink, and
    `sections` adds top-level YAML (dedupe, audit, ...)."""
    tenants = tenant_block("acme", key, ["hook"]) if tenants is None else tenants
    sink = f'{{type: webhook, url: "http://127.0.0.1:{hook_port}{url_path}"{sink_options}}}'
    path.write_text(f"tenants:\n{tenants}sinks:\n  hook: {sink}\n{sections}")
    return path


def read_file_sink(directory: Path) -> list[dict[str, Any]]:
    """Everything in the rotated files and the current one; re-list if a rotation raced the read."""
    while True:
        out: list[dict[str, Any]] = []
        try:
            for path in sorted(directory.glob("*.jsonl")):
                out.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        except FileNotFoundError:
            continue
        return out


async def read_redis_stream(client: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    """The whole stream, a page at a time: one XRANGE of megabytes outlasted the socket timeout on a busy machine."""
    out: list[dict[str, Any]] = []
    start = "-"
    while True:
        entries = await client.xrange(stream, min=start, count=1000)
        out.extend(json.loads(fields[b"data"]) for _, fields in entries)
        if len(entries) < 1000:
            return out
        start = "(" + entries[-1][0].decode()


async def read_kafka_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",  # a transactional Kafka sink: aborted records are not delivered
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(json.loads(r.value) for r in records)
            if len(out) >= expect:
                # keep reading briefly: a duplicate would arrive right behind
                more = await consumer.getmany(timeout_ms=1000)
                for records in more.values():
                    out.extend(json.loads(r.value) for r in records)
                break
    finally:
        await consumer.stop()
    return out


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", pipeline: Any = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.25)
    report = f"\nstage stats: {json.dumps(pipeline.stats(), indent=1)}" if pipeline is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{report}")


async def post(url: str, key: str, body: Any, content_type: str = "application/json") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers={"X-Api-Key": key, "Content-Type": content_type}) as resp:
            return resp.status, await resp.json(content_type=None)


class SentryReceiver:
    """Sentry's envelope endpoint on a local port: services report here when SENTRY_DSN points at it."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        events: list[dict[str, Any]] = []
        self.events = events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                import gzip

                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    events.extend(envelope_events(body))
                finally:  # always 200: an error answer would make the SDK back off and hold later events
                    self.send_response(200)
                    self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_port}/1"

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("tags", {}).get("alert") == name]

    def close(self) -> None:
        self.server.shutdown()


def envelope_events(body: bytes) -> list[dict[str, Any]]:
    """The event items of a Sentry envelope: a header line, then items (a header line, then a payload
    of `length` bytes or up to the next newline)."""
    out = []
    pos = body.find(b"\n") + 1
    while 0 < pos < len(body):
        end = body.find(b"\n", pos)
        end = len(body) if end == -1 else end
        header = json.loads(body[pos:end] or b"{}")
        pos = end + 1
        length = header.get("length")
        if length is None:
            end = body.find(b"\n", pos)
            end = len(body) if end == -1 else end
            payload, pos = body[pos:end], end + 1
        else:
            payload, pos = body[pos : pos + length], pos + length + 1
        if header.get("type") == "event":
            out.append(json.loads(payload))
    return out


CLUSTER_PORT = int(os.environ.get("HIFI_TEST_CLUSTER_PORT", "27092"))  # the 3-node test clusters' first port


def three_node_cluster() -> Iterator[LocalKafka]:
    """A module's own 3-node cluster on HIFI_TEST_CLUSTER_PORT (its modules share one xdist group in conftest, so
    two never run at once): stopped after the module unless it was running before."""
    nodes = LocalKafka(nodes=3, port=CLUSTER_PORT, data_root=DEFAULT_HOME / f"test-3n-{CLUSTER_PORT}", heap="384m")
    started_here = not nodes.running_pids()
    try:
        nodes.start(timeout=180.0)  # three JVMs on a busy two-core runner
    except BaseException:
        nodes.stop()  # nodes that did start would hold the ports of the next run's cluster
        raise
    yield nodes
    if started_here:
        nodes.stop()
