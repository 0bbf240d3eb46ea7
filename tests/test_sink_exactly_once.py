"""Issue 14, items 4-6: each sink type delivers a batch exactly once when it is cut midway and retried,
against the real destination (Kafka, Redis, a local HTTP server)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from services.sender.sinks import RedisStreamSink
from shared.config import SinkConfig
from shared.errors import TransientError
from shared.event import Event
from tests.helpers import read_redis_stream


def events(n: int, tenant: str = "acme") -> list[Event]:
    return [Event(f"e{i}", "play", 1.0, tenant, {"i": i}, device_id=f"d{i % 3}") for i in range(n)]


class CutPipelines:
    """A real Redis client whose next `cuts` pipelines run only their first `keep` commands on the
    server and then fail like a dropped connection: the sender cannot tell what was applied."""

    def __init__(self, client: Any, keep: int, cuts: int = 1) -> None:
        self.client = client
        self.keep = keep
        self.cuts = cuts

    def pipeline(self, transaction: bool = False) -> Any:
        pipe = self.client.pipeline(transaction=transaction)
        execute = pipe.execute

        async def cut_execute(raise_on_error: bool = True) -> Any:
            if self.cuts > 0:
                self.cuts -= 1
                del pipe.command_stack[self.keep :]
                await execute(raise_on_error)
                raise RedisConnectionError("injected: connection lost mid-pipeline")
            return await execute(raise_on_error)

        pipe.execute = cut_execute
        return pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def test_redis_stream_pipeline_cut_midway_then_retried_appends_once(redis_client, namespace):
    stream = f"{namespace}:cut"
    sink = RedisStreamSink(SinkConfig("s", "redis_stream", {"stream": stream}), "redis://127.0.0.1:1/0")
    sink.client = CutPipelines(redis_client, keep=3)  # type: ignore[assignment]
    batch = events(6)
    try:
        await sink.deliver_batch(batch)
        raise AssertionError("the cut pipeline should have failed the batch")
    except TransientError:
        pass
    await sink.deliver_batch(batch)  # the sender's retry of the whole batch
    got = await read_redis_stream(redis_client, stream)
    counts = Counter(r["event_id"] for r in got)
    assert counts == Counter({f"e{i}": 1 for i in range(6)}), counts
    assert [r["event_id"] for r in got] == [f"e{i}" for i in range(6)]  # order kept
