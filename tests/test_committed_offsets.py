"""Where a worker starts reading its partitions, when the group coordinator answers OffsetFetch with an error.

A coordinator moving or still loading its offsets (a fresh cluster, a broker restart) answers OffsetFetch v2+
with a top-level error code and no partitions. aiokafka 0.14 does not read that code: the answer reads as
"nothing committed", and `auto_offset_reset="earliest"` replays the whole retained log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.commit import OffsetFetchRequest

import shared.stage as stage_module
from devtools.kafka import LocalKafka
from shared.stage import StageRunner
from tests.test_stage_runner import FlakySink, create_topic, make_runner, produce_events, runners, start, wait_for

pytestmark = pytest.mark.asyncio
__all__ = ["runners"]  # the fixture, imported for this module's tests

COORDINATOR_LOAD_IN_PROGRESS = 14


class CoordinatorLoading:
    """Wraps a consumer's client: its first `faults` OffsetFetch answers (and every one until `until`, a monotonic
    time) carry an error, as a coordinator still loading its offsets answers; the requests reach the real broker.
    The error is the answer's top-level one (no partitions named), or `partition`'s own."""

    def __init__(self, faults: int, until: float = 0.0, partition: int | None = None) -> None:
        self.faults = faults
        self.until = until
        self.partition = partition
        self.faulted = 0

    def faulting(self) -> bool:
        return self.faulted < self.faults or time.monotonic() < self.until

    def inject(self, response: Any) -> None:
        self.faulted += 1
        if self.partition is None:
            response.error_code, response.topics = COORDINATOR_LOAD_IN_PROGRESS, []
            return
        response.topics = [
            (
                topic,
                [(p, -1, "", COORDINATOR_LOAD_IN_PROGRESS) if p == self.partition else (p, *rest) for p, *rest in ps],
            )
            for topic, ps in response.topics
        ]

    def consumer_class(self) -> type[AIOKafkaConsumer]:
        wrapper = self

        class FaultyConsumer(AIOKafkaConsumer):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                send = self._client.send

                async def send_with_faults(node_id: int, request: Any, *rest: Any, **options: Any) -> Any:
                    response = await send(node_id, request, *rest, **options)
                    if isinstance(request, OffsetFetchRequest) and wrapper.faulting():
                        wrapper.inject(response)
                    return response

                self._client.send = send_with_faults

        return FaultyConsumer


@pytest.fixture
def coordinator_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., CoordinatorLoading]]:
    def install(faults: int, until: float = 0.0, partition: int | None = None) -> CoordinatorLoading:
        fault = CoordinatorLoading(faults, until, partition)
        monkeypatch.setattr(stage_module, "AIOKafkaConsumer", fault.consumer_class())
        return fault

    yield install


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, source: str, partitions: int) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets([TopicPartition(source, p) for p in range(partitions)]))
    finally:
        await consumer.stop()


async def read_from_a_half_committed_log(
    kafka: LocalKafka,
    namespace: str,
    runners: list[StageRunner],
    partitions: int,
    meanwhile: Callable[[list[tuple[int, int]], dict[int, int]], Awaitable[None]] | None = None,
    **options: Any,
) -> tuple[list[tuple[int, int]], dict[TopicPartition, int], StageRunner]:
    """Half of each partition committed; a worker reads until it has every record past the commit (`meanwhile`
    awaited first, with what it read so far and the count to read per partition). What it read (partition,
    offset), the commits, the worker."""
    source = f"{namespace}.src"
    group = f"{namespace}-g"
    await create_topic(kafka.bootstrap, source, partitions)
    await produce_events(kafka.bootstrap, source, 100 * partitions)
    ends = await end_offsets(kafka.bootstrap, source, partitions)
    commits = {tp: end // 2 for tp, end in ends.items()}
    await commit(kafka.bootstrap, group, commits)
    seen: list[tuple[int, int]] = []
    sink = FlakySink()

    async def handle(records: list[Any]) -> Any:
        seen.extend((r.message.partition, r.message.offset) for r in records)
        return await sink.handle(records)

    worker = await start(runners, make_runner(kafka.bootstrap, group, "a", source, handle, batch_max=50, **options))
    expected = sorted((tp.partition, o) for tp, end in ends.items() for o in range(commits[tp], end))
    if meanwhile is not None:
        await meanwhile(seen, {tp.partition: end - commits[tp] for tp, end in ends.items()})
    await wait_for(lambda: len(seen) >= len(expected), 40, "the events past the commit")
    await asyncio.sleep(0.5)  # a straggler read from the log start would show by now
    replayed = sorted((p, o) for p, o in seen if o < commits[TopicPartition(source, p)])
    assert not replayed, f"re-read {len(replayed)} committed records, from {replayed[:3]}"
    assert sorted(seen) == expected
    return seen, commits, worker


@pytest.mark.parametrize("partitions", [1, 3])
async def test_a_coordinator_loading_its_offsets_does_not_send_the_worker_back_to_the_log_start(
    kafka: LocalKafka,
    namespace: str,
    runners: list[StageRunner],
    coordinator_loading: Callable[..., CoordinatorLoading],
    partitions: int,
) -> None:
    """A worker assigned its partitions while the coordinator answers its first OffsetFetch "loading" starts at
    the group's commit; aiokafka read that answer as "never committed" and the worker re-read the log."""
    fault = coordinator_loading(faults=2)  # one for the runner's own fetch, one for aiokafka's position refresh
    await read_from_a_half_committed_log(kafka, namespace, runners, partitions)
    assert fault.faulted == 2, "the fault was not injected"


@pytest.mark.parametrize("partition", [None, 1], ids=["group-error", "one-partition-error"])
async def test_a_commit_unknown_past_the_assign_callbacks_budget_keeps_only_its_partition_waiting(
    kafka: LocalKafka,
    namespace: str,
    runners: list[StageRunner],
    coordinator_loading: Callable[..., CoordinatorLoading],
    partition: int | None,
) -> None:
    """Loading for longer than the assign callback may wait (half the session): the partitions it could not
    verify stay paused while a task asks again, the others are read from their commit meanwhile."""
    faulted_until = time.monotonic() + 12.0
    fault = coordinator_loading(faults=0, until=faulted_until, partition=partition)

    async def the_others_read_meanwhile(seen: list[tuple[int, int]], to_read: dict[int, int]) -> None:
        if partition is None:
            return
        others = [p for p in to_read if p != partition]

        def read(p: int) -> int:
            return sum(1 for q, _ in seen if q == p)

        await wait_for(lambda: all(read(p) >= to_read[p] for p in others), 10.0, "the other partitions' records")
        assert time.monotonic() < faulted_until and not read(partition), "read the faulted partition before a rejoin"

    _, _, worker = await read_from_a_half_committed_log(
        kafka, namespace, runners, 3, the_others_read_meanwhile, session_timeout_ms=6_000
    )
    assert fault.faulted > 2, "the fault did not outlast the callback's budget"
    assert worker.revocations == 0, "the worker rejoined instead of asking again"
