"""Each sink type against its real destination: status classification, rotation, streams, topics."""

from __future__ import annotations

import pytest

from devtools.webhook import WebhookReceiver
from services.sender.file_sink import FileSink
from services.sender.kafka_sink import KafkaSink
from services.sender.redis_stream import RedisStreamSink
from services.sender.webhook import WebhookSink
from shared.config import SinkConfig
from shared.errors import PermanentSinkError, SinkMisconfigured, TransientError
from shared.event import Event
from tests.helpers import read_file_sink, read_kafka_topic, read_redis_stream


def events(n, tenant="acme"):
    return [Event(f"e{i}", "play", 1.0, tenant, {"i": i}, device_id=f"d{i % 3}") for i in range(n)]


@pytest.mark.parametrize(
    "status, retry_after, error",
    [
        (500, None, TransientError),
        (503, None, TransientError),
        (429, "7", TransientError),
        (408, None, TransientError),
        (400, None, PermanentSinkError),
        (422, None, PermanentSinkError),
        (401, None, SinkMisconfigured),
        (403, None, SinkMisconfigured),
        (404, None, SinkMisconfigured),
        (405, None, SinkMisconfigured),
        (410, None, SinkMisconfigured),
        (415, None, SinkMisconfigured),
    ],
)
async def test_webhook_classifies_answers(status, retry_after, error, port_base):
    hook = WebhookReceiver(port=port_base + 19, fail_status=status, retry_after=retry_after)
    await hook.start()
    sink = WebhookSink(SinkConfig("hook", "webhook", {"url": f"http://127.0.0.1:{hook.port}/x"}, timeout_s=2))
    await sink.start()
    try:
        with pytest.raises(error) as err:
            await sink.deliver_batch(events(2))
        if retry_after:
            assert err.value.retry_after == 7.0
        hook.fail_status = None
        await sink.deliver_batch(events(3))
        assert [e["idempotency_key"] for e in hook.received] == ["hook:acme:e0", "hook:acme:e1", "hook:acme:e2"]
    finally:
        await sink.close()
        await hook.stop()


async def test_webhook_unreachable_is_transient(port_base):
    sink = WebhookSink(SinkConfig("hook", "webhook", {"url": f"http://127.0.0.1:{port_base + 17}/x"}, timeout_s=2))
    await sink.start()
    with pytest.raises(TransientError):
        await sink.deliver_batch(events(1))
    await sink.close()


async def test_file_sink_appends_and_rotates(tmp_path):
    sink = FileSink(SinkConfig("f", "file", {"path": str(tmp_path), "rotate_bytes": 2000}))
    await sink.start()
    for i in range(10):
        await sink.deliver_batch([Event(f"e{i}-{j}", "t", 1.0, "acme", {"pad": "x" * 100}) for j in range(3)])
    rotated = list(tmp_path.glob("events-*.jsonl"))
    assert rotated and all(p.stat().st_size >= 2000 for p in rotated)
    got = read_file_sink(tmp_path)
    assert [r["event_id"] for r in got] == [f"e{i}-{j}" for i in range(10) for j in range(3)]


async def test_redis_stream_sink(redis_client, namespace):
    sink = RedisStreamSink(SinkConfig("s", "redis_stream", {"stream": f"{namespace}:s"}), "redis://127.0.0.1:1/0")
    sink.client = redis_client  # the test's Redis (db 15), not the unreachable default given above
    await sink.deliver_batch(events(5))
    got = await read_redis_stream(redis_client, f"{namespace}:s")
    assert [r["event_id"] for r in got] == [f"e{i}" for i in range(5)]


async def test_redis_stream_sink_down_is_transient():
    sink = RedisStreamSink(SinkConfig("s", "redis_stream", {"stream": "x"}, timeout_s=1), "redis://127.0.0.1:1/0")
    with pytest.raises(TransientError):
        await sink.deliver_batch(events(1))
    await sink.close()


async def test_kafka_sink(kafka, namespace):
    sink = KafkaSink(SinkConfig("m", "kafka", {"topic": f"{namespace}.out"}), kafka.bootstrap)
    await sink.start()
    try:
        await sink.deliver_batch(events(6))
    finally:
        await sink.close()
    got = await read_kafka_topic(kafka.bootstrap, f"{namespace}.out", 6)
    assert sorted(r["event_id"] for r in got) == [f"e{i}" for i in range(6)]
    # Plain JSON with the envelope, for consumers outside Hifi (read_kafka_topic parsed each value as JSON).
    by_id = {r["event_id"]: r for r in got}
    assert {"event_id", "tenant", "type", "ts", "payload"} <= set(by_id["e3"])
    assert by_id["e3"]["payload"] == {"i": 3} and by_id["e3"]["tenant"] == "acme" and by_id["e3"]["type"] == "play"
