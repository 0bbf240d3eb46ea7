"""Where is my event? An index of each event's path, from the tallies and receipts stages already write.

The pipeline partitions by `tenant:device`, which an event id alone does not give, and a trace must not
read an hour of topics. So the auditor, which reads every tally and receipt anyway, writes what they say
about each event into one small Redis hash per event id (`hifi:<namespace>:trace:<event_id>`, TTL
`audit.trace_ttl_s`, at most `max_fields` facts); `hifi trace` and the auditor's `/trace/<event_id>` read it
back in one round trip. The index has its own Redis URL (`Settings.trace_index_url`), so production can keep
it off the server that holds dedupe claims.

What the facts come from:
- the collector's tally: when it accepted the event, and where (raw topic, partition, offset);
- a sender's receipt: the event's stage timestamps, the sink's ack time, attempts, idempotency key (one fact
  per delivery: a duplicate delivery does not overwrite the first);
- any stage's tally: the events it did not pass on, with their outcome (`dup`, `dlq`, `unrouted`, ...)
  and a note (the deduplicator: which message holds the claim; dead letters: reason, error code, attempts).

A new outcome needs one line in OUTCOMES (its text); without it the trace shows its name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from itertools import chain
from typing import Any

import msgpack
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from shared import pipeline
from shared.audit import Receipt, Tally, as_receipt, as_tally
from shared.codec import pack, unpack
from shared.errors import TransientError
from shared.outcome import Outcome
from shared.retry import Backoff

log = logging.getLogger(__name__)

OUTCOMES = {
    Outcome.DUP: "dropped as a duplicate",
    Outcome.DLQ: "dead-lettered",
    Outcome.QUARANTINED: "quarantined: it broke its tenant's schema (hifi failed show)",
    Outcome.UNROUTED: "not routed: its tenant subscribes to no sink",
    Outcome.SKIPPED: "skipped: the sink's ledger had delivered it already",
    Outcome.CANARY_DROPPED: "canary stopped at the sender (drop_canaries)",
}
"""What each outcome a stage tallies means, for the trace's reader."""

STAGE_ORDER = [s.name for s in pipeline.EVENT_PATH]


def describe(outcome: str) -> str:
    return OUTCOMES.get(outcome, outcome)


# ARGV: ttl ms, fields per hash, then the chunk as ONE msgpack array: per event its hash's key, the facts the
# auditor already counted over the cap, and its fields and values in order. One script call per chunk of events,
# and one argument for all its facts: redis-py builds a command in Python per argument, and with every key, field
# and value its own argument that was 30 % of the auditor's CPU (issue 16). Keys travel in ARGV, not KEYS:
# a chunk's 500 keys span hash slots, so this script runs on a standalone server only, as it always did.
# Redis's cmsgpack reads no msgpack bin type: the chunk is packed with every bytes value as a str.
# A hash keeps at most `max_fields` facts (an id every client sends, like "undefined", would grow without bound):
# the rest are counted in its `#more` field, not stored. Facts that fit even if all are new go in one HSET.
WRITE_FACTS = """
local ttl = ARGV[1]
local cap = tonumber(ARGV[2])
local chunk = cmsgpack.unpack(ARGV[3])
for i = 1, #chunk, 3 do
  local key, over, facts = chunk[i], chunk[i + 1], chunk[i + 2]
  local room = cap - redis.call('HLEN', key)
  if #facts <= 2 * room and #facts <= 2000 then  -- 2000: far under unpack's Lua stack limit (8000)
    if #facts > 0 then
      redis.call('HSET', key, unpack(facts))
    end
  else
    for j = 1, #facts, 2 do
      local field = facts[j]
      if room > 0 or redis.call('HEXISTS', key, field) == 1 then
        room = room - redis.call('HSET', key, field, facts[j + 1])
      else
        over = over + 1
      end
    end
  end
  if over > 0 then
    redis.call('HINCRBY', key, '#more', over)
  end
  redis.call('PEXPIRE', key, ttl)
end
return #chunk / 3
"""
CHUNK = 500  # events per script call: Redis runs a script alone, so keep each short
COALESCE_S = 0.5  # how long facts wait to be written with the next ones: `hifi trace` sees them this much later
MEMORY_CHECK_S = 5.0  # how often the writer asks the server how full it is
MORE = "#more"  # a hash's count of the facts it did not keep
_chunk_packer = msgpack.Packer(use_bin_type=False)  # bytes as msgpack str: the form Redis's cmsgpack reads
SAFE_ERROR = re.compile(r"^(status \d+|sqlstate \w+|\w+)$")  # shared.audit.error_code's forms


class TraceIndex:
    """Writes facts about events into one Redis hash per event id, and reads a trace back.

    `flush` hands what was added to a background writer and returns at once: a slow or absent Redis never
    holds up the auditor's reading (its ledger and SLIs). Facts wait in `pending` (at most `max_pending`
    events); past that they are dropped and counted (`dropped`, metric `hifi_trace_facts_dropped_total`),
    logged once per episode."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        ttl_s: float = 3600.0,
        max_pending: int = 200_000,
        max_fields: int = 64,
        registry: CollectorRegistry | None = None,
        memory_ceiling: float = 0.8,
    ) -> None:
        self.client = aioredis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.prefix = f"hifi:{namespace}:trace:"
        self.ttl_ms = int(ttl_s * 1000)
        self.max_pending = max_pending
        self.max_fields = max_fields
        self.pending: dict[str, dict[str, bytes]] = {}
        self.written = 0
        self.dropped = 0  # facts given up while Redis was away and the buffer was full
        self.unreadable = 0  # tallies and receipts whose trace facts could not be read (the auditor's count)
        self.dropped_metric = Counter(
            "hifi_trace_facts_dropped",
            "Facts about events the trace index dropped: its buffer was full while Redis was slow or away",
            registry=registry,
        ) if registry is not None else None  # fmt: skip
        self.dropping_since: float | None = None  # monotonic: the current episode of drops, for one log line
        self.backoff = Backoff(base_s=0.5, ceiling_s=30.0)
        self.failures = 0
        self.retry_at = 0.0  # monotonic: while Redis fails, the writer backs off
        self._warned_at = 0.0
        # Past this share of the server's maxmemory the index stops writing: on a server it shares with dedupe
        # claims and ledgers (noeviction), its facts must not be what makes a claim fail with OOM.
        self.memory_ceiling = memory_ceiling
        self.memory_checked_at = -MEMORY_CHECK_S
        self.memory_full = False
        self._write = self.client.register_script(WRITE_FACTS)
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def key(self, event_id: str) -> str:
        return f"{self.prefix}{event_id}"

    def _put(self, event_id: str, field: str, fact: dict[str, Any]) -> None:
        entry = self.pending.get(event_id)
        if entry is None:
            if len(self.pending) >= self.max_pending:
                self._drop()
                return
            entry = self.pending[event_id] = {}
        if field not in entry and len(entry) >= self.max_fields:  # counted, not kept: as the hash would
            entry[MORE] = b"%d" % (int(entry.get(MORE, b"0")) + 1)
            return
        entry[field] = pack(fact)

    def _drop(self, n: int = 1) -> None:
        self.dropped += n
        if self.dropped_metric is not None:
            self.dropped_metric.inc(n)
        if self.dropping_since is None:
            self.dropping_since = time.monotonic()
            log.warning(
                "trace index: %d events waiting for Redis, dropping facts until it catches up (hifi trace will "
                "miss them; counts are unaffected)",
                len(self.pending),
            )

    # -- facts in --------------------------------------------------------------------------------

    def add_tally(self, value: Tally | dict[str, Any]) -> None:
        tally = as_tally(value)
        stage = tally.stage
        accepted = tally.accepted
        if accepted is not None and tally.runs:  # the collector: where each accepted event was written
            tenant = tally.runs[0].tenant
            for event_id, partition, offset in accepted.events:
                self._put(
                    event_id,
                    f"accepted|{tenant}|{partition}:{offset}",  # each copy: a re-sent event is accepted again
                    {
                        "kind": "accepted",
                        "tenant": tenant,
                        "ingest_ts": accepted.ingest_ts,
                        "topic": accepted.topic,
                        "partition": partition,
                        "offset": offset,
                    },
                )
        for row in tally.events:
            offset, event_id, outcome, tenant, note = row  # a malformed row raises: the caller counts it unreadable
            source = f"{tally.topic}:{tally.partition}:{offset}"
            if note and not SAFE_ERROR.match(str(note.get("error", "-"))):  # a tally from before error codes
                note = {k: v for k, v in note.items() if k != "error"}
            self._put(
                event_id,
                f"outcome|{tenant}|{stage}|{source}",
                {"kind": "outcome", "tenant": tenant, "stage": stage, "outcome": outcome, "at": tally.at,
                 "source": source, "note": note},
            )  # fmt: skip

    def add_receipt(self, value: Receipt | dict[str, Any]) -> None:
        receipt = as_receipt(value)
        traced = receipt.trace
        if not traced:  # a receipt from a sender before traces: lag only
            return
        sink, acked = receipt.sink, receipt.delivered_ts
        put = self._put
        for row, (key, stages, source) in zip(receipt.events, traced, strict=False):
            tenant = row.tenant
            # per delivery (its sink topic's source): a second delivery does not overwrite the first. One fact
            # with the stage stamps: a `path` fact of its own per delivery repeated tenant, ack and source.
            put(
                row.event_id,
                f"sink|{tenant}|{sink}|{source}",
                {"kind": "sink", "tenant": tenant, "sink": sink, "acked_ts": acked, "attempts": row.attempts,
                 "idempotency_key": key, "source": source, "ingest_ts": row.ingest_ts, "stages": stages},
            )  # fmt: skip

    async def flush(self) -> int:
        """Hand what was added to the background writer and return at once; the number of events waiting."""
        if self.ttl_ms <= 0:
            self.pending = {}
            return 0
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_forever(), name="trace-index-writer")
        self._wake.set()
        return len(self.pending)

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            # An event's facts arrive within a second of each other (its collector tally, then a receipt per
            # sink): held this long they leave in one HSET, not one per tally or receipt (issue 16).
            if len(self.pending) < CHUNK:
                await asyncio.sleep(COALESCE_S)
            self._wake.clear()
            while self.pending:
                delay = self.retry_at - time.monotonic()
                if delay > 0:  # backing off after a failure (bounded by the Backoff's ceiling)
                    await asyncio.sleep(delay)
                try:
                    await self.write_pending()
                except Exception:  # a bug must not end the writer for good: log, back off, go on
                    log.exception("trace index: writing facts failed")
                    self.failures += 1
                    self.retry_at = time.monotonic() + self.backoff.delay(self.failures)

    async def write_pending(self) -> int:
        """Write what was added since the last write, a script call per CHUNK events; kept for the next write if
        Redis fails."""
        if not self.pending or self.ttl_ms <= 0:
            self.pending = {}
            return 0
        if time.monotonic() < self.retry_at:
            return 0
        batch, self.pending = self.pending, {}
        items = list(batch.items())
        try:
            for start in range(0, len(items), CHUNK):
                # Asked again before every chunk after the first: a backlog flushed after an outage must not
                # carry the server past the ceiling on one reading.
                if await self._memory_full(fresh=start > 0):  # dropped and counted: the pipeline's keys first
                    self._drop(sum(len(fields) for _, fields in items[start:]))
                    return start
                payload: list[Any] = []
                for event_id, fields in items[start : start + CHUNK]:
                    if MORE in fields:  # counted over the cap while pending: the script adds it to the hash's
                        more = int(fields[MORE])
                        facts = [x for kv in fields.items() if kv[0] != MORE for x in kv]
                    else:
                        more, facts = 0, list(chain.from_iterable(fields.items()))
                    payload += (self.key(event_id), more, facts)  # an f-string: a loose row's id may not be a str
                args = [self.ttl_ms, self.max_fields, _chunk_packer.pack(payload)]
                await self._write(keys=[], args=args, client=self.client)
        except (RedisError, OSError) as exc:  # a chunk written before the failure is written again: HSET is idempotent
            for event_id, fields in batch.items():  # keep them (bounded) for the next attempt
                for field, value in fields.items():
                    if event_id in self.pending or len(self.pending) < self.max_pending:
                        self.pending.setdefault(event_id, {}).setdefault(field, value)
                    else:
                        self._drop()
            self.failures += 1
            now = time.monotonic()
            self.retry_at = now + self.backoff.delay(self.failures)
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("trace index: Redis write failed, %d events buffered: %r", len(self.pending), exc)
            return 0
        self.failures = 0
        self.written += len(batch)
        if self.dropping_since is not None and len(self.pending) < self.max_pending // 2:
            log.warning(
                "trace index: caught up after %.0f s; %d facts dropped so far",
                time.monotonic() - self.dropping_since,
                self.dropped,
            )
            self.dropping_since = None
        return len(batch)

    async def _memory_full(self, fresh: bool = False) -> bool:
        """Whether the server is past `memory_ceiling` of its maxmemory (asked every MEMORY_CHECK_S, or now)."""
        now = time.monotonic()
        if fresh or now - self.memory_checked_at >= MEMORY_CHECK_S:
            self.memory_checked_at = now
            info = await self.client.info("memory")
            limit = int(info.get("maxmemory", 0) or 0)
            used = int(info.get("used_memory", 0) or 0)  # a proxy's INFO may lack it: then no ceiling applies
            self.memory_full = limit > 0 and used >= self.memory_ceiling * limit
        return self.memory_full

    # -- a trace out -----------------------------------------------------------------------------

    async def lookup(self, event_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The event's path per tenant: accepted, stage timestamps, each sink's delivery or dead letter,
        and every stage that did not pass it on."""
        try:  # bounded: a hash holds at most max_fields facts and its `#more` count
            raw = await self.client.hgetall(self.key(event_id))
        except (RedisError, OSError) as exc:
            raise TransientError(f"trace index unavailable: {exc}") from exc
        more = int(raw.pop(MORE.encode(), 0))
        tenants: dict[str, dict[str, Any]] = {}
        first_path: dict[str, tuple[Any, ...]] = {}
        for value in raw.values():
            fact = unpack(value)
            if tenant is not None and fact["tenant"] != tenant:
                continue
            path = tenants.setdefault(
                fact["tenant"], {"accepted": None, "stages": {}, "sinks": {}, "dropped": [], "more_facts": more}
            )
            kind = fact["kind"]
            if kind == "accepted":  # the first copy's, whose path the stamps show; later copies counted
                copies = (path["accepted"] or {}).get("copies", 0) + 1
                order = ("ingest_ts", "partition", "offset")  # ties on ingest_ts: the lower partition, offset
                if path["accepted"] is None or [fact[k] for k in order] < [path["accepted"][k] for k in order]:
                    path["accepted"] = {k: fact[k] for k in ("ingest_ts", "topic", "partition", "offset")}
                path["accepted"]["copies"] = copies
            elif kind == "path":  # a hash written before the stamps moved into the sink fact (trace_ttl_s)
                _first_path(path, first_path, fact)
            elif kind == "sink":  # the first delivery to the sink; later ones (a duplicate) counted
                if "stages" in fact:
                    _first_path(path, first_path, fact)
                known = path["sinks"].get(fact["sink"])
                delivery = {
                    "status": "delivered",
                    **{k: fact[k] for k in ("acked_ts", "attempts", "idempotency_key", "source")},
                }
                if known is None or known["status"] != "delivered":
                    path["sinks"][fact["sink"]] = {**delivery, "deliveries": 1}
                else:
                    deliveries = known["deliveries"] + 1
                    if (delivery["acked_ts"], delivery["source"]) < (known["acked_ts"], known["source"]):
                        known.update(delivery)
                    known["deliveries"] = deliveries
            else:
                _add_outcome(path, fact)
        for path in tenants.values():
            if not path["stages"]:  # not delivered anywhere: the stamps a dead letter carried, if any
                for step in path["dropped"] + list(path["sinks"].values()):
                    path["stages"] = step.pop("stages", None) or path["stages"]
            for step in path["dropped"] + list(path["sinks"].values()):
                step.pop("stages", None)
            path["stages"] = dict(
                sorted(path["stages"].items(), key=lambda kv: (_rank(kv[0]), kv[1]))  # pipeline order
            )
            if path["accepted"] is None and "collector" in path["stages"]:
                path["accepted"] = {"ingest_ts": path["stages"]["collector"], "copies": 1}
            path["dropped"].sort(key=lambda d: d["at"] or 0)
            path["sinks"] = dict(sorted(path["sinks"].items()))
        return {"event_id": event_id, "found": bool(tenants), "tenants": dict(sorted(tenants.items()))}

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.client.aclose()


def _rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _first_path(path: dict[str, Any], first_path: dict[str, tuple[Any, ...]], fact: dict[str, Any]) -> None:
    """The stage stamps of the tenant's first delivery (by ack time, then source) are the path shown."""
    order_key = (fact.get("acked_ts") or 0, fact.get("source") or "")  # a `path` from before per-delivery facts: as is
    if fact["tenant"] not in first_path or order_key < first_path[fact["tenant"]]:
        first_path[fact["tenant"]] = order_key
        path["stages"] = fact["stages"]


def _add_outcome(path: dict[str, Any], fact: dict[str, Any]) -> None:
    note = dict(fact.get("note") or {})
    stage, outcome = fact["stage"], fact["outcome"]
    step = {"stage": stage, "outcome": outcome, "text": describe(outcome), "at": fact["at"], "source": fact["source"]}
    claim = note.pop("claim", None)
    if claim is not None:
        step["first_copy"] = claim
    step.update(note)
    spec_name, _, sink = stage.partition(".")
    if spec_name == pipeline.SENDER.name and sink:
        known = path["sinks"].get(sink)
        if known is None or known["status"] != "delivered":  # a delivery outranks an earlier letter
            path["sinks"][sink] = {"status": "dead_lettered" if outcome == "dlq" else outcome, **step}
        return
    path["dropped"].append(step)
