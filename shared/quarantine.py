"""Failed events: quarantine what breaks a tenant's schemas, list and show it, replay it after a fix.

The deduplicator checks each event it passes as new (so SDK re-sends are never validated twice) with
`SchemaGate`. An `enforce` tenant's violating event goes to `hifi.failed.<tenant>` as a failed record
(below) instead of downstream, and is tallied `quarantined`, which the auditor counts as accounted for,
never as lost; the tally's note names its type (as /metrics labels it) and each rule it broke once, so the
auditor counts quarantined events per tenant, type and rule too. A `warn` tenant's goes on, with
`schema_violations: [{pointer, rule}]` in its envelope (no messages: they quote values, and the flag is
outside what a sink's transform rewrites).

A failed record (msgpack): `event` (the event as the client sent it), `tenant`, `type`, `event_id`,
`schema` (the schema's name, None for an unknown type), `violations` ([{pointer, rule, message}]),
`received_ts` (the collector's ingest time), `quarantined_ts`, `partition_key`, and `claim`: the
deduplicator input message that claimed the event id.

Replay re-submits each original event at the front door (`hifi.raw`, the collector's output) with a
fresh ingest time, the header `hifi-replay-of: <claim>`, and an `accepted` tally (stage `replay`) so the
auditor's ledger balances. The enricher passes the header on; the deduplicator lets the replay take
over the claim of its quarantined copy, so it passes once, and a second replay of the same record finds
the claim taken and is dropped as a duplicate. The claim lives for `dedupe.window_s`: replay within it.
Replay commits its progress (ReplayProgress) after each chunk is acknowledged and tallied, so a second run
re-submits only what was not replayed yet, also past the window; `from_start` re-submits everything.
The HTTP API cannot carry the claim (a replay through it would be dropped as a duplicate of its own
quarantined copy), so replay does not use it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry, Counter

from shared.app import durable_producer
from shared.audit import accepted_tally, bucket_of
from shared.codec import encode_event, pack, unpack
from shared.config import HifiConfig
from shared.dlq import REPLAY_OF
from shared.errors import HifiError, InvalidEvent
from shared.event import Event, now_ms
from shared.outcome import Outcome
from shared.publish import Output, transient
from shared.retry import Backoff
from shared.schemas import CLIENT_FIELDS, Violation, client_view
from shared.step import Record
from shared.topics import Topics

log = logging.getLogger(__name__)

QUARANTINED = Outcome.QUARANTINED  # the tally outcome
REPLAY_STAGE = "replay"  # the `accepted` tallies of replayed events
REPLAY_CHUNK = 100  # replayed events per `accepted` tally: what an interrupted replay may leave untallied
PROGRESS_ATTEMPTS = 8  # reads of a replay progress group before giving up (about 20 s with the backoff)
PROGRESS_BACKOFF = Backoff(0.2, 5.0)
LOCK_JOIN_TIMEOUT_S = 30.0  # joining the tenant's replay lock group (a new broker elects a coordinator first)
LOCK_MAX_IDLE_MS = 2**31 - 1  # the lock member never polls: aiokafka must not leave the group for that
PROGRESS_TIMEOUT_S = 20.0  # a progress commit's budget, as long as the reads' retries (aiokafka retries forever)
UNKNOWN_TYPE_LABEL = "(unknown)"  # metric label of types no schema names: clients choose them, so unbounded


class UnknownTenant(HifiError):
    pass


class ReplayProgressUnavailable(HifiError):
    """The broker did not answer where a replay got to: replaying blind could re-submit everything."""


class ReplayAlreadyRunning(HifiError):
    """Another replay of the tenant is running: both would re-submit every record."""


class SchemaGate:
    """Checks events against their tenant's schemas; counts per tenant, type and rule in /metrics."""

    def __init__(self, config: HifiConfig, topics: Topics, registry: CollectorRegistry) -> None:
        self.config = config
        self.topics = topics
        self.quarantined = Counter(
            "hifi_events_quarantined",
            "Events quarantined to hifi.failed.<tenant> for breaking the tenant's schemas",
            ["tenant", "type"],
            registry=registry,
        )
        self.violations = Counter(
            "hifi_schema_violations",
            "Schema violations found (mode enforce: quarantined; warn: delivered flagged)",
            ["tenant", "type", "rule", "mode"],
            registry=registry,
        )

    def quarantine(self, record: Record) -> Output | None:
        """None: the event goes on (valid, allowed, or flagged in warn mode); else its failed record. A
        quarantined record's outcome is `quarantined`, and its tally note names the type (as /metrics
        labels it) and the rules it broke, each once, for the auditor's counts."""
        failed, note = self._check(record.event, record.source)
        if failed is not None:
            record.outcome = QUARANTINED
            record.note = {**(record.note or {}), **note}
        return failed

    def _check(self, event: Event, claim: str) -> tuple[Output | None, dict[str, Any]]:
        tenant = self.config.tenants.get(event.tenant)
        contract = tenant.schemas if tenant is not None else None
        if contract is None or event.canary:  # canaries probe delivery, not contracts
            return None, {}
        try:
            schema, found = contract.check(event)
        except Exception as exc:  # a validator bug must not crash the worker nor pass the event unchecked
            schema, found = None, [Violation("", "validator_error", f"{type(exc).__name__}: {exc}"[:300])]
        if not found:
            return None, {}
        type_label = event.type if schema is not None else UNKNOWN_TYPE_LABEL
        for violation in found:
            self.violations.labels(event.tenant, type_label, violation.rule, contract.mode).inc()
        if contract.mode == "warn":
            event.schema_violations = [v.flag() for v in found]
            return None, {}
        self.quarantined.labels(event.tenant, type_label).inc()
        record = {
            "tenant": event.tenant,
            "type": event.type,
            "event_id": event.event_id,
            "event": client_view(event),
            "schema": schema,
            "violations": [v.to_wire() for v in found],
            "received_ts": event.ingest_ts,
            "quarantined_ts": now_ms(),
            "partition_key": event.partition_key.decode(),
            "claim": claim,
        }
        note = {"event_type": type_label, "rules": sorted({v.rule for v in found})}
        return Output(self.topics.failed(event.tenant), event.partition_key, pack(record)), note


def replayed_event(record: dict[str, Any]) -> Event:
    """The original event of a failed record, with a fresh ingest time (its lag and ledger bucket start now)."""
    original = record["event"]
    fields = {name: original[name] for name in CLIENT_FIELDS if original.get(name) is not None}
    fields["ts"] = float(original["ts"])
    return Event(tenant=record["tenant"], ingest_ts=now_ms(), **fields)


class ReplayProgress:
    """How far `hifi failed replay` got through one tenant's failed records, kept in Kafka consumer groups:
    the tenant-wide group (full replays) and one per type (`--type` replays). A record counts as replayed
    once either its tenant's group or its type's group has committed past its offset. The tenant's groups
    are listed once (ListGroups), and only those that exist are read, each once: a tenant's types are
    chosen by its clients, so one offset fetch per type could be thousands of round trips."""

    def __init__(self, bootstrap: str, topics: Topics, tenant: str, topic: str) -> None:
        self.bootstrap, self.topics, self.tenant, self.topic = bootstrap, topics, tenant, topic
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        self._read: dict[str, dict[int, int]] = {}  # group -> next offset per partition
        self._groups: set[str] | None = None  # the tenant's replay groups the broker holds, once listed
        self._committers: dict[str, AIOKafkaConsumer] = {}

    async def __aenter__(self) -> ReplayProgress:
        await self.admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for committer in self._committers.values():
            await committer.stop()
        await self.admin.close()

    async def committed(self, event_type: str | None = None) -> dict[int, int]:
        """The next offset to replay per partition of the tenant's group, or of one type's."""
        group = self.topics.failed_replay_group(self.tenant, event_type)
        if group not in self._read:
            offsets: dict[TopicPartition, Any] = {}
            if group in await self.groups():
                offsets = await self._retrying(group, lambda: self.admin.list_consumer_group_offsets(group))
            self._read[group] = {
                tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == self.topic and meta.offset >= 0
            }
        return self._read[group]

    async def groups(self) -> set[str]:
        """The tenant's replay groups (tenant-wide and per type) the broker holds: none if no replay ever
        committed, or their offsets expired (`offsets.retention.minutes` after the last commit)."""
        if self._groups is None:
            tenant_group = self.topics.failed_replay_group(self.tenant)
            listed = await self._retrying(f"{tenant_group}*", self.admin.list_consumer_groups)
            self._groups = {
                str(group) for group, *_ in listed if group == tenant_group or str(group).startswith(tenant_group + "/")
            }
        return self._groups

    async def _retrying(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call`, retrying transient errors (no coordinator yet on a new broker) PROGRESS_ATTEMPTS times."""
        for attempt in range(1, PROGRESS_ATTEMPTS + 1):
            try:
                return await call()
            except Exception as exc:
                if not transient(exc) or attempt == PROGRESS_ATTEMPTS:
                    raise ReplayProgressUnavailable(f"replay progress of {what}: {exc!r}") from exc
                delay = PROGRESS_BACKOFF.delay(attempt)
                log.warning("reading %s failed (attempt %d), retrying in %.1fs: %r", what, attempt, delay, exc)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def passed(self, partition: int, offset: int, event_type: str | None) -> bool:
        """Whether a replay has sent the record at `offset` (and the broker acknowledged it)."""
        if offset < (await self.committed()).get(partition, 0):
            return True
        return event_type is not None and offset < (await self.committed(event_type)).get(partition, 0)

    async def start(self, event_type: str | None) -> dict[int, int]:
        """Where a replay (of one type) resumes: past what the tenant's group, or that type's, has passed."""
        tenant_wide = await self.committed()
        if event_type is None:
            return dict(tenant_wide)
        of_type = await self.committed(event_type)
        return {p: max(tenant_wide.get(p, 0), of_type.get(p, 0)) for p in tenant_wide.keys() | of_type.keys()}

    async def commit(self, event_type: str | None, offsets: dict[int, int]) -> None:
        """Commit the next offset per partition in the group of this replay (the tenant's, or the type's), never
        below what the group holds: a `--from-start` or limited replay must not un-replay what others passed.
        Raises ReplayProgressUnavailable past PROGRESS_TIMEOUT_S (a broker outage)."""
        group = self.topics.failed_replay_group(self.tenant, event_type)
        try:
            await asyncio.wait_for(self._commit(group, event_type, offsets), PROGRESS_TIMEOUT_S)
        except ReplayProgressUnavailable:
            raise
        except Exception as exc:
            raise ReplayProgressUnavailable(f"committing replay progress of {group}: {exc!r}") from exc

    async def _commit(self, group: str, event_type: str | None, offsets: dict[int, int]) -> None:
        known = await self.committed(event_type)
        offsets = {p: offset for p, offset in offsets.items() if offset > known.get(p, 0)}
        if not offsets:
            return
        committer = self._committers.get(group)
        if committer is None:
            # A manually assigned consumer commits in the group without joining it (no rebalance, no members).
            committer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False)
            self._committers[group] = committer  # stopped on exit even if its start times out
            await committer.start()
            committer.assign([TopicPartition(self.topic, p) for p in offsets])
        else:
            committer.assign(sorted(committer.assignment() | {TopicPartition(self.topic, p) for p in offsets}))
        await committer.commit({TopicPartition(self.topic, p): offset for p, offset in offsets.items()})
        self._read[group] = {**self._read.get(group, {}), **offsets}
        (await self.groups()).add(group)


class ReplayLock:
    """One `hifi failed replay` per tenant at a time: a running replay is a member of the tenant's lock
    group; one that joins and finds another member there leaves and raises ReplayAlreadyRunning. Two that
    join at the same instant may both refuse, never both run. A killed replay holds the lock until the
    broker's session timeout (10 s) evicts it."""

    def __init__(self, bootstrap: str, topics: Topics, tenant: str, topic: str) -> None:
        self.bootstrap, self.tenant, self.topic = bootstrap, tenant, topic
        self.group = topics.failed_replay_lock_group(tenant)
        self.member = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            max_poll_interval_ms=LOCK_MAX_IDLE_MS,
        )

    async def __aenter__(self) -> ReplayLock:
        joined = asyncio.Event()
        await self.member.start()
        try:
            self.member.subscribe([self.topic], listener=_Joined(self.member, joined))
            try:
                await asyncio.wait_for(joined.wait(), LOCK_JOIN_TIMEOUT_S)
            except TimeoutError as exc:
                raise ReplayProgressUnavailable(
                    f"joining {self.group}: not joined in {LOCK_JOIN_TIMEOUT_S:.0f} s"
                ) from exc
            members = await self._members()
            if members > 1:
                raise ReplayAlreadyRunning(
                    f"another replay of tenant {self.tenant!r} is running ({members} members in {self.group}; a killed"
                    " one holds it for the broker's session timeout, 10 s): try again when it is done"
                )
        except BaseException:
            await self.member.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.member.stop()  # leaves the group: the next replay may start

    async def _members(self) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            (described,) = await admin.describe_consumer_groups([self.group])
        finally:
            await admin.close()
        return sum(len(group["members"]) for group in described.to_object()["groups"])


class _Joined(ConsumerRebalanceListener):  # type: ignore[misc]
    """Sets `joined` once the lock member has its assignment; pauses it (the lock reads nothing)."""

    def __init__(self, member: AIOKafkaConsumer, joined: asyncio.Event) -> None:
        self.member, self.joined = member, joined

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.member.pause(*assigned)
        self.joined.set()


@dataclass
class _Sent:
    """A replayed event the broker may not have acknowledged yet, and the failed record it came from."""

    ack: asyncio.Future[Any]
    ingest_ts: float
    partition: int
    offset: int


@dataclass
class _Chunk:
    """Replayed events not tallied yet, and the buckets whose tallies were written: a tally failing part way
    through a chunk must not have the failure path tally the buckets already written a second time."""

    sent: list[_Sent] = field(default_factory=list)
    tallied: set[int] = field(default_factory=set)


@dataclass
class FailedEvents:
    """Read and replay one tenant's quarantined events (`hifi failed`, the failed-events web view)."""

    bootstrap: str
    topics: Topics
    tenants: list[str]
    bucket_s: int = 10  # the auditor's `audit.bucket_s`: replayed events' accepted tallies use its buckets

    def topic(self, tenant: str) -> str:
        if tenant not in self.tenants:
            raise UnknownTenant(f"unknown tenant {tenant!r}; tenants: {', '.join(self.tenants)}")
        return self.topics.failed(tenant)

    async def read(
        self,
        tenant: str,
        event_type: str | None = None,
        limit: int | None = 100,
        event_id: str | None = None,
        with_progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Failed records up to the topic's end when called, oldest first, filtered by type or event id;
        `replayed`: a replay has sent it (see ReplayProgress); None without `with_progress`."""
        found: list[dict[str, Any]] = []
        async with AsyncExitStack() as stack:
            progress = None
            if with_progress:
                progress = await stack.enter_async_context(
                    ReplayProgress(self.bootstrap, self.topics, tenant, self.topic(tenant))
                )
            async for partition, offset, record in self._scan(tenant):
                if event_type is not None and record.get("type") != event_type:
                    continue
                if event_id is not None and record.get("event_id") != event_id:
                    continue
                replayed = None if progress is None else await progress.passed(partition, offset, _type_of(record))
                found.append({"partition": partition, "offset": offset, "replayed": replayed, **record})
                if limit is not None and len(found) >= limit:
                    break
        return found

    async def view(self, tenant: str, event_type: str | None, limit: int) -> dict[str, Any]:
        """The web view's answer: counts per type and the records. Progress the broker cannot tell does not
        hide the records: each has `replayed: None`, and `replayed_unknown` says why."""
        unknown = None
        try:
            records = await self.read(tenant, event_type, limit)
        except ReplayProgressUnavailable as exc:
            unknown = str(exc)
            records = await self.read(tenant, event_type, limit, with_progress=False)
        return {"tenant": tenant, "counts": await self.counts(tenant), "failed": records, "replayed_unknown": unknown}

    async def counts(self, tenant: str) -> dict[str, int]:
        """Failed records per event type."""
        per_type: Tally[str] = Tally()
        async for _, _, record in self._scan(tenant):
            per_type[str(record.get("type"))] += 1
        return dict(per_type)

    async def progress(self, tenant: str) -> dict[int, int] | None:
        """The tenant-wide replay's next offset per partition (records below it were replayed); None if the
        broker holds no replay group of the tenant at all (never replayed, or its offsets expired)."""
        async with ReplayProgress(self.bootstrap, self.topics, tenant, self.topic(tenant)) as progress:
            if not await progress.groups():
                return None
            return dict(await progress.committed())

    async def replay(
        self,
        tenant: str,
        event_type: str | None = None,
        rate: float = 100.0,
        limit: int | None = None,
        from_start: bool = False,
    ) -> int:
        """Re-submit the original events not replayed before at the front door; `from_start`: all of them.

        Each chunk of REPLAY_CHUNK events is tallied `accepted` as soon as the broker has it (as the
        collector does), then its progress is committed (ReplayProgress), so an interrupted replay leaves
        no acknowledged event untallied (a send that raises: what was acknowledged is tallied and committed
        first), or at most one chunk untallied and uncommitted if the process dies: the next run re-submits
        that chunk, which the deduplicator drops if still within `dedupe.window_s`."""
        topic = self.topic(tenant)
        producer = durable_producer(self.bootstrap)
        await producer.start()
        replayed = 0
        started = time.monotonic()
        chunk = _Chunk()
        scanned: dict[int, int] = {}  # next offset per partition past every record sent or skipped
        try:
            async with (
                ReplayLock(self.bootstrap, self.topics, tenant, topic),
                ReplayProgress(self.bootstrap, self.topics, tenant, topic) as progress,
            ):
                start = {} if from_start else await progress.start(event_type)
                try:
                    async for partition, offset, record in self._scan(tenant, start):
                        if limit is not None and replayed >= limit:
                            break
                        if self._skipped(record, event_type) or (
                            not from_start and await progress.passed(partition, offset, _type_of(record))
                        ):
                            scanned[partition] = offset + 1
                            continue
                        event = replayed_event(record)
                        headers = [(REPLAY_OF, str(record["claim"]).encode())]
                        ack = await producer.send(
                            self.topics.raw, encode_event(event), key=event.partition_key, headers=headers
                        )
                        chunk.sent.append(_Sent(ack, event.ingest_ts, partition, offset))
                        scanned[partition] = offset + 1
                        replayed += 1
                        if len(chunk.sent) >= REPLAY_CHUNK:
                            await self._tally_acked(producer, tenant, chunk)
                            chunk = _Chunk()  # tallied: a failed commit must not tally it again
                            await progress.commit(event_type, scanned)
                        if rate > 0:
                            await asyncio.sleep(max(0.0, started + replayed / rate - time.monotonic()))
                    await self._tally_acked(producer, tenant, chunk)
                    chunk = _Chunk()
                    await progress.commit(event_type, scanned)
                except BaseException as exc:
                    # tally and commit what the broker acknowledged before the failure (no second try of a commit
                    # that just timed out), then fail
                    commit = not isinstance(exc, ReplayProgressUnavailable)
                    settle = self._settle_partial(producer, progress, tenant, event_type, chunk, scanned, commit)
                    await asyncio.shield(settle)
                    raise
        finally:
            await producer.stop()
        return replayed

    @staticmethod
    def _skipped(record: dict[str, Any], event_type: str | None) -> bool:
        return "error" in record or (event_type is not None and record.get("type") != event_type)

    async def _settle_partial(
        self,
        producer: Any,
        progress: ReplayProgress,
        tenant: str,
        event_type: str | None,
        chunk: _Chunk,
        scanned: dict[int, int],
        commit: bool = True,
    ) -> None:
        """After a failure: tally the chunk's acknowledged events, and commit each partition up to its first
        unacknowledged one (a later acknowledged one is re-submitted next time, a duplicate dedupe drops)."""
        failed = await self._tally_acked(producer, tenant, chunk, partial=True)
        if not commit:
            return
        safe = dict(scanned)
        for sent in failed:
            safe[sent.partition] = min(safe[sent.partition], sent.offset)
        await progress.commit(event_type, safe)

    async def _tally_acked(self, producer: Any, tenant: str, chunk: _Chunk, partial: bool = False) -> list[_Sent]:
        """`accepted` tallies for the chunk's events once the broker has them (a tally for an event never
        sent would read as loss), per bucket, each bucket once (`chunk.tallied`). `partial`: tally the
        acknowledged ones, return the failed."""
        acks = await asyncio.gather(*(sent.ack for sent in chunk.sent), return_exceptions=partial)
        buckets: Tally[int] = Tally()
        failed: list[_Sent] = []
        for ack, sent in zip(acks, chunk.sent, strict=True):
            if isinstance(ack, BaseException):
                failed.append(sent)
            else:
                buckets[bucket_of(sent.ingest_ts, self.bucket_s)] += 1
        for bucket, count in buckets.items():
            if bucket in chunk.tallied:
                continue
            await producer.send_and_wait(
                self.topics.tallies, accepted_tally(REPLAY_STAGE, tenant, bucket, count), key=b"replay"
            )
            chunk.tallied.add(bucket)
        return failed

    async def _scan(
        self, tenant: str, start: dict[int, int] | None = None
    ) -> AsyncIterator[tuple[int, int, dict[str, Any]]]:
        """The tenant's failed records up to the topic's end when called, from `start` (next offset per
        partition; the beginning for a partition it does not name)."""
        topic = self.topic(tenant)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        partitions = [p["partition"] for t in described if not t["error_code"] for p in t["partitions"]]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            if not tps:
                return
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            firsts = await consumer.beginning_offsets(tps)
            for tp in tps:
                if (start or {}).get(tp.partition, 0) > firsts[tp]:
                    consumer.seek(tp, (start or {})[tp.partition])
            ends = await consumer.end_offsets(tps)
            left = {tp for tp in tps if ends[tp] > 0}
            for tp in tps:
                if tp in left and await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
            while left:
                batch = await consumer.getmany(*left, timeout_ms=1000)
                for tp, messages in batch.items():
                    for message in messages:
                        if message.offset >= ends[tp]:
                            break
                        try:
                            record = unpack(message.value)
                        except InvalidEvent as exc:
                            record = {"error": f"unreadable failed record: {exc}"}
                        yield tp.partition, message.offset, record
                    if await consumer.position(tp) >= ends[tp]:
                        left.discard(tp)
        finally:
            await consumer.stop()


def describe_progress(progress: dict[int, int] | None) -> str:
    """`hifi failed list`'s progress line (FailedEvents.progress): no groups at all is said plainly, since
    the broker deletes a group's offsets `offsets.retention.minutes` after its last commit."""
    if progress is None:
        return "no replay progress recorded (none yet, or expired after the broker's offsets.retention.minutes)"
    shown = ", ".join(f"partition {p}: {offset}" for p, offset in sorted(progress.items())) or "none"
    return f"replayed (every type) up to offset: {shown}"


def _type_of(record: dict[str, Any]) -> str | None:
    event_type = record.get("type")
    return str(event_type) if event_type is not None else None
