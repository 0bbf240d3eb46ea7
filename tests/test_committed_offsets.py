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

import shared.rebalance as rebalance_module
import shared.stage as stage_module
from devtools.kafka import LocalKafka
from shared.membership import CommittedOffsetsUnknown
from shared.rebalance import RebalanceListener
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


class LateCommits:
    """Wraps `committed_offsets` in shared.rebalance: `late` partitions come back unknown (as from a coordinator
    still loading) to the assign callback, and to the late start's rounds while `hold_late` says so; the answers
    are the real broker's. `before_late_round` is awaited in each late-start round, before its answer returns."""

    def __init__(self, late: set[int], rounds_unknown: int = 1_000_000) -> None:
        self.late = late
        self.rounds_unknown = rounds_unknown  # rounds after the assign callback's still answering "unknown"
        self.calls = 0
        self.before_late_round: Callable[[], Awaitable[None]] | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> LateCommits:
        real = rebalance_module.committed_offsets

        async def committed_offsets(consumer: Any, partitions: set[TopicPartition], within_s: float) -> Any:
            self.calls += 1
            starts, unknown = await real(consumer, partitions, within_s)
            if self.calls > 1 and self.before_late_round is not None:
                await self.before_late_round()  # then the answer comes back at once
            if self.calls > self.rounds_unknown + 1:
                return starts, unknown
            held = {tp for tp in partitions if tp.partition in self.late}
            if not held:
                return starts, unknown
            group = str(consumer._coordinator.group_id)
            return {tp: o for tp, o in starts.items() if tp not in held}, CommittedOffsetsUnknown(group, held, "test")

        monkeypatch.setattr(rebalance_module, "committed_offsets", committed_offsets)
        return self


class HeldState:
    """A partitioned state whose restore never ends until cancelled; it records opens and revokes in order."""

    changelog_topic = "held.changelog"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.restoring = asyncio.Event()
        self.restore_cancelled = asyncio.Event()

    def open(self, partitions: list[int]) -> list[int]:
        self.calls.append(("open", list(partitions)))
        return list(partitions)

    async def restore(self, partitions: list[int], restored: Callable[[int], None] | None = None) -> None:
        self.restoring.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.restore_cancelled.set()
            raise

    async def catch_up(self) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def revoke(self, partitions: list[int]) -> None:
        self.calls.append(("revoke", list(partitions)))

    def changelog(self) -> list[Any]:
        return []

    def durable(self, partition: int, next_offset: int) -> None:
        pass


async def test_a_revocation_leaves_no_restore_behind_that_a_late_start_began_meanwhile(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revoke listener cancelled the restore before the late start: a late-start round answered in between
    (its partition still looked owned) began a restore of a partition being revoked, and opened its store after
    the revocation closed it (RocksDB used after close, or a lock error)."""
    source = f"{namespace}.held"
    await create_topic(kafka.bootstrap, source, 2)
    late = LateCommits({1}, rounds_unknown=0).install(monkeypatch)
    state = HeldState()

    late_round_answered = asyncio.Event()

    async def answer_once_the_restore_is_cancelled() -> None:
        late_round_answered.set()
        await state.restore_cancelled.wait()

    late.before_late_round = answer_once_the_restore_is_cancelled
    worker = make_runner(kafka.bootstrap, f"{namespace}-g", "a", source, FlakySink().handle, states=[state])
    await start(runners, worker)
    await asyncio.wait_for(state.restoring.wait(), 30)
    await asyncio.wait_for(late_round_answered.wait(), 30)
    assert worker.restoring == {TopicPartition(source, 0)}, worker.restoring
    await RebalanceListener(worker).on_partitions_revoked({TopicPartition(source, p) for p in range(2)})
    await asyncio.sleep(0.5)  # a restore begun behind the revocation would open its store by now
    after_revoke = state.calls[next(i for i, (what, ps) in enumerate(state.calls) if what == "revoke" and ps) :]
    assert worker.restorer._task is None and worker.restoring == set(), "a restore outlived the revocation"
    assert not [ps for what, ps in after_revoke if what == "open"], f"opened after the revocation: {state.calls}"


async def test_a_commit_never_told_pages_and_shows_the_partition_waiting(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition whose commit the coordinator never tells was in no monitoring view (not `assigned`, /ready
    joined) and only logged an error before each rejoin: it must page, and /ready must show it waiting."""
    monkeypatch.setattr(rebalance_module, "LATE_START_ATTEMPTS", 2)
    source = f"{namespace}.never"
    await create_topic(kafka.bootstrap, source, 2)
    LateCommits({1}).install(monkeypatch)
    worker = make_runner(kafka.bootstrap, f"{namespace}-g", "a", source, FlakySink().handle)
    await start(runners, worker)
    await wait_for(lambda: worker.joined, 30, "the assignment")
    assert worker.ready()["awaiting_commit"] == [1] and not worker.ready()["joined"], worker.ready()
    await wait_for(lambda: bool(worker.alerter.fired), 30, "an alert for the partition whose commit is unknown")
    assert worker.alerter.fired[0]["name"] == "commit_unknown", worker.alerter.fired


async def test_an_unexpected_error_in_the_late_start_pages_and_rejoins(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late start ran outside the runner's guard: an unexpected error ended it silently and left its
    partition paused until some other rebalance. It must page and rejoin, after which the partition is read."""
    source = f"{namespace}.crash"
    await create_topic(kafka.bootstrap, source, 2)
    late = LateCommits({1}, rounds_unknown=0).install(monkeypatch)
    crashes = [RuntimeError("a bug in the late start")]

    async def crash_once() -> None:
        if crashes:
            raise crashes.pop()

    late.before_late_round = crash_once
    sink = FlakySink()
    worker = make_runner(kafka.bootstrap, f"{namespace}-g", "a", source, sink.handle)
    await start(runners, worker)
    await wait_for(lambda: bool(worker.alerter.fired), 30, "an alert for the failed late start")
    assert worker.alerter.fired[0]["name"] == "late_start_failed", worker.alerter.fired
    ids = await produce_events(kafka.bootstrap, source, 100)
    await wait_for(lambda: set(sink.received) >= set(ids), 40, "every event, the late partition's too, after a rejoin")
    assert worker.revocations >= 1, "no rejoin after the failure"
