"""A transactional Kafka sink commits the sender group's offsets in its transactions: the runner must not
commit plain offsets for them too (a plain commit landing after a pending transactional one moves the
group back below what the sink delivered, and the next owner delivers it again)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from aiokafka import TopicPartition

from devtools.kafka import LocalKafka
from devtools.redis import LocalRedis
from services.sender.delivery import SinkDelivery
from services.sender.kafka_sink import KafkaSink
from shared.alerts import Alerter
from shared.config import SinkConfig
from shared.metrics import StageMetrics
from shared.redis_window import RedisKeyWindow
from shared.retry import Backoff
from tests.test_sink_exactly_once import committed_offset, read_committed
from tests.test_stage_runner import create_topic, make_runner, produce_events, wait_for

pytestmark = pytest.mark.asyncio


async def test_runner_of_a_transactional_kafka_sink_never_commits_plain_offsets(
    kafka: LocalKafka, redis_server: LocalRedis, namespace: str
) -> None:
    source, out, group = f"{namespace}.sink", f"{namespace}.mirror", f"{namespace}-sender"
    await create_topic(kafka.bootstrap, source, 1)
    sink = KafkaSink(SinkConfig("m", "kafka", {"topic": out}, timeout_s=5), kafka.bootstrap, group)
    assert sink.transactional
    ledger = RedisKeyWindow(redis_server.url, f"hifi:{namespace}:delivered-ledger:", 3600)
    delivery = SinkDelivery(sink, ledger, StageMetrics(), Alerter("sender.test"), pass_through=False)
    runner = make_runner(
        kafka.bootstrap,
        group,
        "a",
        source,
        delivery.handle,
        backoff=Backoff(0.05, 0.5),
        commit_interval_s=3600.0,
        commits_offsets=not sink.transactional,
    )
    await sink.start()
    await runner.start()
    plain_commits: list[Any] = []
    try:
        commit = runner.consumer.commit  # type: ignore[union-attr]

        async def counting_commit(offsets: Any = None) -> None:
            plain_commits.append(offsets)
            await commit(offsets)

        runner.consumer.commit = counting_commit  # type: ignore[union-attr,method-assign]
        ids = await produce_events(kafka.bootstrap, source, 20)
        tp = TopicPartition(source, 0)
        await wait_for(lambda: runner.done.get(tp) == 20, 60, "the batch durable")
        await runner._commit()
        assert plain_commits == []
        assert await committed_offset(kafka.bootstrap, group, tp) == 20  # the sink's transactions carry them
    finally:
        await runner.stop()
        await sink.close()
    got = Counter(r["event_id"] for r in await read_committed(kafka.bootstrap, out, 20))
    assert got == Counter(ids), got
