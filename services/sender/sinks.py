"""Sink types. Each `SinkSender.deliver_batch` returns only once the destination acknowledged the
whole batch; otherwise it raises TransientError (retry), PartialDelivery (some records acknowledged:
retry the rest), SinkMisconfigured (the whole sink refuses: page, retry) or PermanentSinkError (the
request was refused: the sender isolates the bad events and dead-letters only those). `probe` carries no
event: it returns if the destination answers at all, so the sender can tell a payload that keeps failing
from a sink that is down."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerClosed,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

from shared.app import durable_producer
from shared.config import SinkConfig
from shared.errors import (
    ConfigError,
    PartialDelivery,
    PermanentSinkError,
    SinkMisconfigured,
    SinkThrottled,
    TransientError,
)
from shared.event import Event
from shared.publish import retire
from shared.webhook_signing import parse_secret, sign_headers

from .file_sink import FileSink


def sink_record(sink: str, event: Event) -> dict[str, Any]:
    """What a destination receives: the event plus a key it can dedupe on."""
    record = event.to_wire()
    record["idempotency_key"] = idempotency_key(sink, event)
    return record


def idempotency_key(sink: str, event: Event) -> str:
    return f"{sink}:{event.tenant}:{event.event_id}"


@dataclass(frozen=True)
class Source:
    """Where a batch was read: one source partition, and each event's offset in it (same order).

    `commit_offset`: where a successor may start once this part is delivered (the first offset of the
    source batch still undelivered or not yet dead-lettered durably); None: past the last of `offsets`.
    """

    topic: str
    partition: int
    offsets: list[int]
    commit_offset: int | None = None


# Produce errors no retry can cure: the record itself is at fault (too large, corrupt, wrong format).
UNSENDABLE_RECORD = (
    RecordTooLargeError,
    MessageSizeTooLargeError,
    InvalidMessageError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)


class SinkSender(Protocol):
    config: SinkConfig

    async def start(self) -> None: ...

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None: ...

    async def probe(self) -> None: ...

    async def close(self) -> None: ...


# Answers about the sink, not about the events: a bad credential, URL, method or content type must not pour
# the stream into the DLQ.
SINK_WIDE_STATUSES = frozenset({401, 403, 404, 405, 407, 410, 415})


class WebhookSink:
    """POST {"sink", "events": [...]} as JSON. 2xx is an ack; 408, 429 and 5xx are retried
    (honouring Retry-After); 401/403/404/405/407/410/415 mean the sink is misconfigured (retried, paged);
    any other 4xx refuses the request's events. A request re-sent after a split carries a new batch
    Idempotency-Key header (its events differ); each event's own `idempotency_key` never changes.
    With `signing_secret_env`, each request is signed per Standard Webhooks (`shared/webhook_signing.py`):
    `webhook-id` is `msg_` + the batch key (the same on a retry of the same batch, new after a split: receivers
    dedupe on each event's `idempotency_key`). `headers_env` and `auth`
    add headers from secrets."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.url = config.options["url"]
        self.headers = {**(config.options.get("headers") or {}), **webhook_secret_headers(config)}
        self.signing_keys = webhook_signing_keys(config)
        self.session: aiohttp.ClientSession | None = None

    def _signed(self, msg_id: str, body: str) -> dict[str, str]:
        """Standard Webhooks headers for this attempt (a fresh timestamp; the same id on every retry)."""
        return sign_headers(self.signing_keys, msg_id, body.encode()) if self.signing_keys else {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        assert self.session is not None
        records = [sink_record(self.config.name, e) for e in events]
        batch_key = hashlib.sha256("\n".join(r["idempotency_key"] for r in records).encode()).hexdigest()
        body = json.dumps({"sink": self.config.name, "events": records}, separators=(",", ":"))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch_key,
            **self.headers,
            **self._signed(f"msg_{batch_key[:32]}", body),
        }
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                text = (await resp.text())[:200] if status >= 300 else ""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"webhook {self.config.name}: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return
        if status == 429:
            raise SinkThrottled(f"webhook {self.config.name}: HTTP 429 {text}", retry_after)
        if status == 408 or status >= 500:
            raise TransientError(f"webhook {self.config.name}: HTTP {status} {text}", retry_after)
        if status in SINK_WIDE_STATUSES:
            raise SinkMisconfigured(f"webhook {self.config.name}: HTTP {status} {text}", status, retry_after)
        raise PermanentSinkError(f"webhook {self.config.name}: HTTP {status} {text}", status)

    async def probe(self) -> None:
        """POST a request with no events: any answer but 408, 429 or 5xx means the sink is up."""
        assert self.session is not None
        body = json.dumps({"sink": self.config.name, "events": []}, separators=(",", ":"))
        try:
            probe_headers = {"Content-Type": "application/json", **self.headers, **self._signed("msg_probe", body)}
            async with self.session.post(self.url, data=body, headers=probe_headers) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"webhook {self.config.name} probe: {type(exc).__name__}: {exc}") from exc
        if status in (408, 429) or status >= 500:
            raise TransientError(f"webhook {self.config.name} probe: HTTP {status}")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _secret_env(config: SinkConfig, name: str, field: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"sinks.{config.name}.{field}", f"environment variable {name} is not set")
    return value


def webhook_signing_keys(config: SinkConfig) -> list[bytes]:
    """The keys of `signing_secret_env` (new first, then the one being retired), checked at start-up."""
    keys = []
    for i, name in enumerate(config.options.get("signing_secret_env") or []):
        field = f"signing_secret_env[{i}]"
        try:
            keys.append(parse_secret(_secret_env(config, name, field)))
        except ValueError as exc:
            raise ConfigError(f"sinks.{config.name}.{field}", f"environment variable {name}: {exc}") from None
    return keys


def webhook_secret_headers(config: SinkConfig) -> dict[str, str]:
    """`headers_env` and `auth`, read from the environment at start-up: a missing variable names its field."""
    headers = {
        header: _secret_env(config, name, f"headers_env.{header}")
        for header, name in (config.options.get("headers_env") or {}).items()
    }
    auth = config.options.get("auth")
    if auth and auth["type"] == "bearer":
        headers["Authorization"] = "Bearer " + _secret_env(config, auth["token_env"], "auth.token_env")
    elif auth:
        user = auth.get("username") or _secret_env(config, auth.get("username_env", ""), "auth.username_env")
        password = _secret_env(config, auth["password_env"], "auth.password_env")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return headers


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


class KafkaSink:
    """A topic, written with acks=all and the idempotent producer, exactly once.

    On the pipeline's own cluster (option `transactional`, default when `bootstrap` is unset or the
    pipeline's): one transaction per source partition's batch holds its records and the sender group's
    next offsets (`send_offsets_to_transaction`), so delivery and the input commit are one atomic step.
    Readers of the sink topic must use isolation_level=read_committed. aiokafka's TxnOffsetCommit is v0
    (no group generation, no KIP-447 fencing), so each source partition has its own transactional id
    `<group>.<topic>.<partition>`: a new owner's producer fences the old one and aborts its open
    transaction (or completes one already committing), then the group's committed offset says which
    records that owner already delivered. A transaction commits only once every record in it was acked,
    and only the offsets below the first event of the batch not yet delivered and below the partition's
    lowest dead letter not yet durable (`Source.commit_offset`, set by `SinkDelivery`): a kill must not
    leave an event in neither the sink nor the DLQ.
    On another cluster: per-record acks; a partial failure raises PartialDelivery so only the
    unacknowledged records are retried; an unretriable error renews the producer.
    """

    def __init__(self, config: SinkConfig, default_bootstrap: str, group_id: str | None = None) -> None:
        self.config = config
        self.topic = config.options["topic"]
        self.bootstrap = config.options.get("bootstrap") or default_bootstrap
        same_cluster = self.bootstrap == default_bootstrap
        self.transactional = bool(config.options.get("transactional", same_cluster)) and group_id is not None
        self.group_id = group_id
        self.producer: AIOKafkaProducer | None = None
        self.admin: AIOKafkaAdminClient | None = None
        self.txn_producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.committed_at_fence: dict[TopicPartition, int] = {}  # group offset read after fencing
        self.pending: dict[str, asyncio.Future[Any]] = {}  # per idempotency key: records sent, not yet settled
        # The sink hears of no revocation: a source partition's producer unused this long is closed.
        self.producer_idle_s = 300.0
        self.used_at: dict[TopicPartition, float] = {}
        self.retiring: set[asyncio.Task[None]] = set()  # replaced producers, flushing their records

    async def start(self) -> None:
        self.producer = durable_producer(self.bootstrap, request_timeout_ms=int(self.config.timeout_s * 1000))
        await self.producer.start()
        if self.transactional:
            self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await self.admin.start()

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        if self.transactional and source is not None:
            await self._drop_idle_producers()
            await self._deliver_in_transaction(events, source)
        else:
            await self._deliver_acked(events)

    def _send(self, producer: AIOKafkaProducer, event: Event) -> Any:
        record = sink_record(self.config.name, event)
        return producer.send(
            self.topic,
            json.dumps(record, separators=(",", ":")).encode(),
            key=event.partition_key,
            headers=[("idempotency-key", record["idempotency_key"].encode())],
        )

    async def _deliver_acked(self, events: list[Event]) -> None:
        assert self.producer is not None
        futures: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        for event in events:
            key = idempotency_key(self.config.name, event)
            earlier = self.pending.get(key)
            if earlier is not None and (not earlier.done() or earlier.exception() is None):
                futures.append(earlier)  # still in flight (or acked) from an attempt that was cut: no second copy
                continue
            try:
                future = await self._send(self.producer, event)
            except KafkaError as exc:  # the rest was not even buffered; what was, may still be acked
                error = exc
                break
            self.pending[key] = future
            futures.append(future)
        if futures:
            # Bounded: the producer's own retries end within its delivery timeout; past this, a future that is
            # still open stays in `pending`, so the retry waits for it instead of sending another copy.
            await asyncio.wait(futures, timeout=3 * self.config.timeout_s)
        outcomes: list[BaseException | None] = []
        for event, future in zip(events, futures, strict=False):
            if not future.done():
                outcomes.append(TimeoutError("no ack within the sink's bound"))
                continue
            outcomes.append(future.exception())
            self.pending.pop(idempotency_key(self.config.name, event), None)
        delivered = [i for i, outcome in enumerate(outcomes) if outcome is None]
        failed = next((o for o in outcomes if o is not None), error)
        if failed is None:
            return
        message = f"kafka sink {self.config.name}: {len(delivered)}/{len(events)} acknowledged: {failed!r}"
        if any(
            isinstance(o, KafkaError) and not o.retriable and not isinstance(o, ProducerClosed)
            for o in (*outcomes, error)
            if o is not None
        ):
            # Unretriable errors break the idempotent producer's sequence for the partition: later records
            # would fail out of order forever. A fresh producer (new producer id) starts clean.
            await self._renew_producer()
        refused = next((o for o in (*outcomes, error) if isinstance(o, UNSENDABLE_RECORD)), None)
        if refused is not None:
            permanent = PermanentSinkError(f"kafka sink {self.config.name}: {self.topic} refused a record: {refused!r}")
            if delivered:
                raise PartialDelivery(message, delivered, permanent) from failed
            raise permanent from failed
        if delivered:
            raise PartialDelivery(message, delivered) from failed
        raise TransientError(message) from failed

    async def _renew_producer(self) -> None:
        """Swap in a started producer, then retire the old one in the background: its queued records are
        flushed and acked (a retry finds them in `pending` and waits rather than sending a second copy), and
        those it could no longer send fail with ProducerClosed, so their events are retried."""
        fresh = durable_producer(self.bootstrap, request_timeout_ms=int(self.config.timeout_s * 1000))
        await fresh.start()
        old, self.producer = self.producer, fresh
        if old is not None:
            task = asyncio.create_task(retire(old), name=f"kafka-sink-{self.config.name}-retire-producer")
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)

    async def _deliver_in_transaction(self, events: list[Event], source: Source) -> None:
        tp = TopicPartition(source.topic, source.partition)
        self.used_at[tp] = time.monotonic()
        try:
            producer = await self._transactional_producer(tp)
            # Below the committed offset: a previous owner's transaction delivered them already.
            first = self.committed_at_fence[tp]
            todo = [e for e, offset in zip(events, source.offsets, strict=True) if offset >= first]
            if not todo:
                return
            await producer.begin_transaction()
            futures = [await self._send(producer, event) for event in todo]
            # aiokafka does not abort a transaction whose produce failed: commit only if every record landed.
            await asyncio.wait(futures)
            errors = [f.exception() for f in futures]  # each retrieved: the later ones fail out of sequence
            failed = next((e for e in errors if e is not None), None)
            if failed is not None:
                raise failed
            commit_offset = max(source.offsets) + 1 if source.commit_offset is None else source.commit_offset
            await producer.send_offsets_to_transaction({tp: max(commit_offset, first)}, self.group_id)
            await producer.commit_transaction()
        except UNSENDABLE_RECORD as exc:
            await self._abort(tp)
            # The topic can never take this request's records: bisection isolates and dead-letters the culprit.
            raise PermanentSinkError(f"kafka sink {self.config.name}: {self.topic} refused a record: {exc!r}") from exc
        except (TimeoutError, KafkaError) as exc:
            # Outcome unknown (the commit may have landed): a fresh producer fences this one, aborts its open
            # transaction (or completes one already committing), and re-reads the committed offset.
            await self._abort(tp)
            raise TransientError(f"kafka sink {self.config.name}: transaction for {tp}: {exc!r}") from exc
        except BaseException:
            await self._drop_producer(tp)
            raise

    async def _abort(self, tp: TopicPartition) -> None:
        """Abort the open transaction if the producer still can, then drop the producer either way."""
        producer = self.txn_producers.get(tp)
        if producer is not None:
            try:
                await asyncio.wait_for(producer.abort_transaction(), self.config.timeout_s)
            except (KafkaError, TimeoutError, AssertionError):
                pass  # no open transaction, or the producer is broken: the next one fences and aborts it
        await self._drop_producer(tp)

    async def _transactional_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self.txn_producers.get(tp)
        if producer is not None:
            return producer
        assert self.admin is not None and self.group_id is not None
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            transactional_id=f"{self.group_id}.{tp.topic}.{tp.partition}",
            enable_idempotence=True,
            acks="all",
            request_timeout_ms=int(self.config.timeout_s * 1000),
        )
        try:
            await producer.start()  # InitProducerId: fences an older owner, aborts its open transaction
            committed = await self.admin.list_consumer_group_offsets(self.group_id, partitions=[tp])
        except BaseException:
            await asyncio.wait_for(producer.stop(), 5.0)
            raise
        meta = committed.get(tp)
        self.committed_at_fence[tp] = meta.offset if meta is not None and meta.offset >= 0 else 0
        self.txn_producers[tp] = producer
        return producer

    async def _drop_idle_producers(self) -> None:
        """Close the producers of source partitions this worker no longer delivers (most likely revoked)."""
        idle_since = time.monotonic() - self.producer_idle_s
        for tp in [tp for tp, used in self.used_at.items() if used < idle_since]:
            used = self.used_at.get(tp)
            if used is None or used >= idle_since:
                continue  # delivered to again (or dropped) while an earlier producer was closing
            self.used_at.pop(tp, None)
            await self._drop_producer(tp)

    async def _drop_producer(self, tp: TopicPartition) -> None:
        producer = self.txn_producers.pop(tp, None)
        self.committed_at_fence.pop(tp, None)
        if producer is not None:
            try:
                await asyncio.wait_for(retire(producer), 5.0)
            except (KafkaError, TimeoutError):
                pass  # fenced or unreachable: the next producer with this id completes its transaction

    async def probe(self) -> None:
        """Ask the cluster for its metadata: the brokers answer, and the sink topic exists."""
        assert self.producer is not None
        try:
            metadata = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.config.timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise TransientError(f"kafka sink {self.config.name} probe: {exc!r}") from exc
        if metadata.partitions_for_topic(self.topic) is None:
            raise TransientError(f"kafka sink {self.config.name} probe: no topic {self.topic}")

    async def close(self) -> None:
        for tp in list(self.txn_producers):
            await self._drop_producer(tp)
        if self.admin is not None:
            await self.admin.close()
        if self.retiring:
            await asyncio.wait(self.retiring, timeout=self.config.timeout_s)
        if self.producer is not None:
            await self.producer.stop()


# Check the idempotency key's marker and append in one atomic step: a pipeline cut midway and re-run
# whole skips what the server already applied. The marker is set after XADD, so a failed XADD leaves none.
# KEYS: stream, marker. ARGV: marker TTL (ms), MAXLEN ('' for none), then field, value pairs.
APPEND_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local cmd = {'XADD', KEYS[1]}
if ARGV[2] ~= '' then
  cmd[#cmd + 1] = 'MAXLEN'; cmd[#cmd + 1] = '~'; cmd[#cmd + 1] = ARGV[2]
end
cmd[#cmd + 1] = '*'
for i = 3, #ARGV do cmd[#cmd + 1] = ARGV[i] end
local id = redis.call(unpack(cmd))
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return 1
"""


def _has_hash_tag(name: str) -> bool:
    start = name.find("{")
    return start != -1 and name.find("}", start + 1) > start + 1


class RedisStreamSink:
    """XADD each event to a Redis Stream once per idempotency key: one pipelined round trip per batch of
    `APPEND_ONCE` script calls. The key's marker lives for the dedupe window (option
    `dedupe_window_s`, default the pipeline's `dedupe.window_s`)."""

    def __init__(self, config: SinkConfig, default_url: str, dedupe_window_s: float = 86_400.0) -> None:
        self.config = config
        self.stream = config.options["stream"]
        self.maxlen = config.options.get("maxlen")
        self.marker_ttl_ms = int(float(config.options.get("dedupe_window_s") or dedupe_window_s) * 1000)
        self.client = aioredis.from_url(
            config.options.get("url") or default_url, socket_timeout=config.timeout_s, socket_connect_timeout=2.0
        )
        self.append_once = self.client.register_script(APPEND_ONCE)

    def marker_key(self, key: str) -> str:
        # Named so marker and stream would share a Redis Cluster slot (the stream's own hash tag, or its
        # whole name as the tag); the sink's client is not a cluster client, so this is only a naming rule.
        if _has_hash_tag(self.stream):
            return f"{self.stream}:idem:{key}"
        return f"{{{self.stream}}}:idem:{key}"

    async def start(self) -> None:
        pass

    async def deliver_batch(self, events: list[Event], source: Source | None = None) -> None:
        maxlen = "" if self.maxlen is None else str(int(self.maxlen))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for event in events:
                    record = sink_record(self.config.name, event)
                    key = record["idempotency_key"]
                    fields = {
                        "event_id": event.event_id,
                        "tenant": event.tenant,
                        "type": event.type,
                        "idempotency_key": key,
                        "data": json.dumps(record, separators=(",", ":")),
                    }
                    args = [self.marker_ttl_ms, maxlen, *(x for pair in fields.items() for x in pair)]
                    await self.append_once([self.stream, self.marker_key(key)], args, client=pipe)
                await pipe.execute()
        except (AuthenticationError, AuthorizationError, NoPermissionError) as exc:
            raise SinkMisconfigured(f"redis stream {self.config.name}: {exc}") from exc
        except OutOfMemoryError as exc:
            # maxmemory reached under noeviction: every append fails until an operator adds memory or trims
            raise SinkMisconfigured(f"redis stream {self.config.name}: OOM (maxmemory reached): {exc}") from exc
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):  # the stream's key holds something else: every append fails
                raise SinkMisconfigured(f"redis stream {self.config.name}: {self.stream}: {exc}") from exc
            raise TransientError(f"redis stream {self.config.name}: {exc!r}") from exc
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis stream {self.config.name}: {exc!r}") from exc

    async def probe(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise TransientError(f"redis stream {self.config.name} probe: {exc!r}") from exc

    async def close(self) -> None:
        await self.client.aclose()


def make_sink(
    config: SinkConfig,
    bootstrap: str,
    redis_url: str,
    group_id: str | None = None,
    dedupe_window_s: float = 86_400.0,
) -> SinkSender:
    """`group_id`: the sender's consumer group, whose offsets a transactional Kafka sink commits."""
    if config.type == "webhook":
        return WebhookSink(config)
    if config.type == "kafka":
        return KafkaSink(config, bootstrap, group_id)
    if config.type == "redis_stream":
        return RedisStreamSink(config, redis_url, dedupe_window_s)
    if config.type == "file":
        return FileSink(config)
    if config.type == "postgres":
        from .postgres import PostgresSink  # imports this module

        return PostgresSink(config)
    if config.type == "s3_archive":
        from .archive import ArchiveSink

        return ArchiveSink(config)
    raise ValueError(f"unknown sink type {config.type}")
