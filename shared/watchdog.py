"""Partition health of one stage worker: consumer lag, a stuck-partition alarm, stale partition leaders, and a
Kafka client's metadata refresh that never finishes.

The first two read a narrow view of the runner (`PartitionView`): the partitions it reads from, its committed and
durable offsets, and its consumer. None changes what the runner commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from shared.membership import request_rejoin
from shared.metrics import StageMetrics

log = logging.getLogger(__name__)

# A Kafka client's metadata refresh unfinished for this long is restarted (`restart_stuck_metadata_refresh`).
METADATA_STUCK_AFTER_S = 5.0


class PartitionView(Protocol):
    """What the watchdogs read of a StageRunner."""

    stage: str
    consumer: AIOKafkaConsumer | None
    assigned: set[TopicPartition]  # owned and restored: read from
    committed: dict[TopicPartition, int]  # the group's committed offsets
    done: dict[TopicPartition, int]  # next offset after the last durable batch
    last_timestamp: dict[TopicPartition, float]  # Kafka timestamp (ms) of the last event read
    readable_since: dict[TopicPartition, float]  # monotonic time a partition was resumed


class PartitionWatchdog:
    """Consumer lag per partition, and a stuck-partition alarm.

    Lag in offsets is the high watermark minus the committed offset (or, before the first commit, the
    offset after the last durable batch); lag in seconds is the age of the last event read while lag
    remains (0 when caught up). A partition with lag whose committed offset has not moved for
    `stuck_after_s` pages once and makes the worker rejoin its group, which re-runs assignment and
    restarts the partition's fetch from the committed offset.
    """

    def __init__(self, runner: PartitionView, metrics: StageMetrics, alerter: Any, stuck_after_s: float) -> None:
        from prometheus_client import Gauge

        self.runner = runner
        self.stage = runner.stage
        self.alerter = alerter
        self.stuck_after_s = stuck_after_s
        self.progress: dict[Any, tuple[int | None, float]] = {}  # tp -> (committed, since when)
        self.rejoins = 0
        self.lag_messages = Gauge(
            "hifi_consumer_lag_messages",
            "High watermark minus the committed offset",
            ["stage", "partition"],
            registry=metrics.registry,
        )
        self.lag_seconds = Gauge(
            "hifi_consumer_lag_seconds",
            "Age of the oldest unprocessed event (approximated by the last processed one) while there is lag",
            ["stage", "partition"],
            registry=metrics.registry,
        )
        self.partitions: dict[str, dict[str, Any]] = {}

    async def check(self) -> None:
        try:
            self._check()
        except Exception:  # a watchdog must not take the worker down
            log.exception("%s: partition watchdog failed", self.stage)

    def _check(self) -> None:
        runner = self.runner
        consumer = runner.consumer
        if consumer is None:
            return
        now = time.monotonic()
        seen = {}
        stuck: list[str] = []
        for tp in sorted(runner.assigned):
            highwater = consumer.highwater(tp)
            committed = runner.committed.get(tp, runner.done.get(tp))
            if highwater is None or committed is None:
                continue
            lag = max(0, highwater - committed)
            last_ts = runner.last_timestamp.get(tp)
            lag_s = max(0.0, time.time() - last_ts / 1000) if lag and last_ts else 0.0
            self.lag_messages.labels(self.stage, str(tp.partition)).set(lag)
            self.lag_seconds.labels(self.stage, str(tp.partition)).set(lag_s)
            previous = self.progress.get(tp)
            if previous is None or previous[0] != committed or lag == 0:
                self.progress[tp] = (committed, now)
                stalled_s = 0.0
            else:
                stalled_s = now - previous[1]
            seen[f"{tp.topic}:{tp.partition}"] = {
                "committed": committed,
                "next": runner.done.get(tp),
                "highwater": highwater,
                "lag_messages": lag,
                "lag_seconds": round(lag_s, 3),
                "stalled_s": round(stalled_s, 1),
            }
            if stalled_s > self.stuck_after_s:
                stuck.append(f"{tp.topic}:{tp.partition} ({lag} waiting, committed {committed}, {stalled_s:.0f}s)")
        self.partitions = seen
        # One page per stage and episode, however many of its partitions are stuck.
        if stuck:
            fired = self.alerter.fire(
                "stuck_partition",
                f"{self.stage}: partitions with lag whose committed offset has not moved for over "
                f"{self.stuck_after_s:.0f}s: {', '.join(stuck)}; rejoining the group",
                partitions=stuck,
            )
            if fired:
                self._rejoin()
        else:
            self.alerter.resolve("stuck_partition")

    def _rejoin(self) -> None:
        """Ask the group coordinator for a rebalance (aiokafka's own rejoin)."""
        try:
            assert self.runner.consumer is not None
            request_rejoin(self.runner.consumer)
            self.rejoins += 1
        except Exception:
            log.exception("%s: could not request a rejoin", self.stage)


async def refresh_stale_leaders(runner: PartitionView, unfetched_after_s: float) -> None:
    """Unstick partitions whose start position aiokafka keeps asking a broker that is no longer leader.

    aiokafka 0.14 looks up a partition's position (ListOffsets, when the group committed none) at
    the leader of its cached metadata and, answered NotLeaderForPartition, retries that broker every
    100 ms without refreshing the metadata ("Failed fetch offsets from N"); it fetches nothing from
    that broker meanwhile, so only the 5-minute metadata refresh ends it. A readable partition with
    no fetch answered yet (no high watermark) for `unfetched_after_s` is in that state or its leader
    is down: `end_offsets` asks the same leader, and on that error refreshes the metadata the
    fetcher's next attempt then uses.
    """
    consumer = runner.consumer
    assert consumer is not None
    while True:
        await asyncio.sleep(unfetched_after_s / 2)
        now = time.monotonic()
        owned = runner.assigned & consumer.assignment()  # `highwater` asserts the consumer has it
        unfetched = [
            tp
            for tp, since in runner.readable_since.items()
            if tp in owned and now - since > unfetched_after_s and consumer.highwater(tp) is None
        ]
        if not unfetched:
            continue
        log.warning(
            "%s: partitions %s assigned %.0fs ago and not fetched yet; looking their leaders up again",
            runner.stage,
            sorted(tp.partition for tp in unfetched),
            unfetched_after_s,
        )
        for tp in unfetched:  # at most once per `unfetched_after_s` each
            runner.readable_since[tp] = now
        try:
            await consumer.end_offsets(unfetched)
        except KafkaError as exc:  # the leader is down: the fetcher's own retries go on
            log.warning("%s: looking up the leaders of %s failed: %r", runner.stage, unfetched, exc)


async def restart_stuck_metadata_refresh(
    stage: str, clients: Callable[[], Iterable[Any]], stuck_after_s: float, on_restart: Callable[[], None] | None = None
) -> None:
    """Restart a Kafka client's metadata refresh that has not finished `stuck_after_s` after it began.

    aiokafka 0.14 refreshes an `AIOKafkaClient`'s metadata in one background task (`_md_synchronizer`, client.py
    ~246), and `force_metadata_update()` hands every caller the refresh in flight (`_md_update_fut`) instead of
    starting another. Chaos kill-broker (issue 15) found a router whose refresh, begun at a broker's kill -9, never
    finished: the fetcher's refused connections to the dead leader and the coordinator lookup all waited on it, so
    the worker asked the dead node for 68 s, until it came back (aio-libs/aiokafka#712 reports the same after
    network trouble; what held ours is not known). A refresh takes milliseconds, a dead node refuses at once, and a
    silent node costs `request_timeout_ms` (40 s) per try: past `stuck_after_s` the task is cancelled and a new one
    started, which finishes the same pending refresh (its callers keep waiting on it) from the nodes in a new
    random order; each restart of the same refresh waits twice as long before the next (up to the client's request
    timeout), so a slow but healthy broker's answer still arrives. `clients` gives the clients to watch at each
    check (a producer may be replaced). A client whose `close()` has begun (it cancels the current refresh task,
    which only a close does: a restart here replaces the task it cancels) is left alone, as a restart after it
    would outlive the client; so the watchdog may keep running while producers flush and close (the stages and
    the collector stop it last, and watch the producers a renewal is retiring). Not watched: the Kafka sink's
    producers and the standby's changelog consumer (a wedge there stalls that sender or slows a standby; nothing
    is lost; a sink's producer still flushing at its close is abandoned). The collector's producers are watched
    by `CollectorProducer`.
    """
    seen: dict[int, tuple[Any, float]] = {}  # id(client) -> (the refresh in flight, monotonic time first seen)
    # Restarts of the same pending refresh: each waits twice as long (a broker that answers Metadata in 7 s, slow
    # but healthy, was restarted every 5 s and never answered), up to aiokafka's request timeout.
    restarts: dict[int, int] = {}
    while True:
        await asyncio.sleep(min(1.0, stuck_after_s / 2))
        try:
            now = time.monotonic()
            watched = set()
            for client in clients():
                key = id(client)
                watched.add(key)
                task = getattr(client, "_sync_task", None)
                if task is None or task.cancelling() or task.cancelled():  # not started, or closing or closed
                    seen.pop(key, None)
                    restarts.pop(key, None)  # keyed by id(): a client made later may get the same one
                    continue
                died = task.done()  # an error ended it: nothing refreshes any more
                pending = client._md_update_fut
                if pending is None or pending.done():
                    seen.pop(key, None)
                    restarts.pop(key, None)
                    if not died:
                        continue
                else:
                    first = seen.setdefault(key, (pending, now))
                    if first[0] is not pending:  # a new refresh: its own clock
                        seen[key] = (pending, now)
                        restarts.pop(key, None)
                        if not died:
                            continue
                    ceiling = getattr(client, "_request_timeout_ms", 40_000) / 1000
                    if now - seen[key][1] < min(stuck_after_s * 2 ** restarts.get(key, 0), ceiling) and not died:
                        continue
                log.warning(
                    "%s: a Kafka client's metadata refresh %s; restarting it (it was at: %s)",
                    stage,
                    f"task died: {task.exception()!r}" if died else f"has not finished in {now - seen[key][1]:.0f}s",
                    _awaiting(task),  # where it is held: the cause is still unknown (issue 15)
                )
                _restart_metadata_refresh(client)
                if pending is not None and not pending.done():
                    seen[key] = (pending, now)
                    restarts[key] = restarts.get(key, 0) + 1
                if on_restart is not None:
                    on_restart()
            for key in set(seen) - watched:
                del seen[key]
            for key in set(restarts) - watched:
                del restarts[key]
        except Exception:  # a watchdog must not take the worker down (its loop runs under `_guard`)
            log.exception("%s: metadata refresh watchdog failed", stage)


def _restart_metadata_refresh(client: Any) -> None:
    """Cancel aiokafka's metadata refresh task and start another that refreshes at once."""
    client._sync_task.cancel()
    if not client._md_update_waiter.done():
        client._md_update_waiter.set_result(None)
    client._sync_task = asyncio.create_task(client._md_synchronizer(), name="aiokafka-metadata-refresh")


def _awaiting(task: asyncio.Task[Any]) -> str:
    """The chain of coroutines a task is suspended in, outermost first (`Task.print_stack` shows only the first)."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            node = f" node {frame.f_locals['node_id']}" if "node_id" in frame.f_locals else ""  # the broker asked
            frames.append(
                f"{frame.f_code.co_name}{node} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})"
            )
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " -> ".join(frames) or "no frame"
