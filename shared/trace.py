"""Where is my event? An index of each event's path, from the tallies and receipts stages already write.

The pipeline partitions by `tenant:device`, which an event id alone does not give, and a trace must not
read an hour of topics. So the auditor, which reads every tally and receipt anyway, writes what they say
about each event into one small Redis hash per event id (`hifi:<namespace>:trace:<event_id>`, TTL
`audit.trace_ttl_s`); `hifi trace` and the auditor's `/trace/<event_id>` read it back in one round trip.

What the facts come from:
- the collector's tally: when it accepted the event, and where (raw topic, partition, offset);
- a sender's receipt: the event's stage timestamps, the sink's ack time, attempts, idempotency key;
- any stage's tally: the events it did not pass on, with their outcome (`dup`, `dlq`, `unrouted`, ...)
  and a note (the deduplicator: which message holds the claim; dead letters: reason and attempts).

A new outcome needs one line in OUTCOMES (its text); without it the trace shows its name.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import pipeline
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


# KEYS: one hash per event; ARGV: ttl ms, then each key's field count, then every field and value in order.
# One script call per chunk of events: redis-py builds and parses a command in Python (~40 us each), and
# an HSET plus a PEXPIRE per event cost the auditor about 100 us of CPU per event.
WRITE_FACTS = """
local ttl = ARGV[1]
local at = #KEYS + 2
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i + 1])
  redis.call('HSET', key, unpack(ARGV, at, at + 2 * n - 1))
  redis.call('PEXPIRE', key, ttl)
  at = at + 2 * n
end
return #KEYS
"""
CHUNK = 500  # events per script call: Redis runs a script alone, so keep each short


class TraceIndex:
    """Writes facts about events into one Redis hash per event id, and reads a trace back."""

    def __init__(self, redis_url: str, namespace: str, ttl_s: float = 3600.0, max_pending: int = 200_000) -> None:
        self.client = aioredis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.prefix = f"hifi:{namespace}:trace:"
        self.ttl_ms = int(ttl_s * 1000)
        self.max_pending = max_pending
        self.pending: dict[str, dict[str, bytes]] = {}
        self.written = 0
        self.dropped = 0  # facts given up while Redis was away and the buffer was full
        self.backoff = Backoff(base_s=0.5, ceiling_s=30.0)
        self.failures = 0
        self.retry_at = 0.0  # monotonic: while Redis fails, the auditor's reading does not wait on it
        self._warned_at = 0.0
        self._write = self.client.register_script(WRITE_FACTS)

    def key(self, event_id: str) -> str:
        return f"{self.prefix}{event_id}"

    def _put(self, event_id: str, field: str, fact: dict[str, Any]) -> None:
        entry = self.pending.get(event_id)
        if entry is None:
            if len(self.pending) >= self.max_pending:
                self.dropped += 1
                return
            entry = self.pending[event_id] = {}
        entry[field] = pack(fact)

    # -- facts in --------------------------------------------------------------------------------

    def add_tally(self, tally: dict[str, Any]) -> None:
        stage = tally.get("stage", "?")
        accepted = tally.get("accepted")
        if accepted:  # the collector: where each accepted event was written
            tenant = tally["runs"][0][0]
            for event_id, partition, offset in accepted["events"]:
                self._put(
                    event_id,
                    f"accepted|{tenant}|{partition}:{offset}",  # each copy: a re-sent event is accepted again
                    {
                        "kind": "accepted",
                        "tenant": tenant,
                        "ingest_ts": accepted["ingest_ts"],
                        "topic": accepted["topic"],
                        "partition": partition,
                        "offset": offset,
                    },
                )
        for offset, event_id, outcome, tenant, note in tally.get("events", ()):
            source = f"{tally.get('topic')}:{tally.get('partition')}:{offset}"
            self._put(
                event_id,
                f"outcome|{tenant}|{stage}|{source}",
                {"kind": "outcome", "tenant": tenant, "stage": stage, "outcome": outcome, "at": tally.get("at"),
                 "source": source, "note": note},
            )  # fmt: skip

    def add_receipt(self, receipt: dict[str, Any]) -> None:
        traced = receipt.get("trace")
        if not traced:  # a receipt from a sender before traces: lag only
            return
        sink = receipt["sink"]
        for row, (key, stages, source) in zip(receipt["events"], traced, strict=False):
            event_id, tenant, ingest_ts, attempts = row[0], row[1], row[2], row[3]
            self._put(event_id, f"path|{tenant}", {"kind": "path", "tenant": tenant, "stages": stages})
            self._put(
                event_id,
                f"sink|{tenant}|{sink}",
                {"kind": "sink", "tenant": tenant, "sink": sink, "acked_ts": receipt["delivered_ts"],
                 "attempts": attempts, "idempotency_key": key, "source": source, "ingest_ts": ingest_ts},
            )  # fmt: skip

    async def flush(self) -> int:
        """Write what was added since the last flush, pipelined; kept for the next flush if Redis fails."""
        if not self.pending or self.ttl_ms <= 0:
            self.pending = {}
            return 0
        if time.monotonic() < self.retry_at:
            return 0
        batch, self.pending = self.pending, {}
        items = list(batch.items())
        try:
            for start in range(0, len(items), CHUNK):
                chunk = items[start : start + CHUNK]
                args: list[Any] = [self.ttl_ms, *(len(fields) for _, fields in chunk)]
                for _, fields in chunk:
                    for field, value in fields.items():
                        args += (field, value)
                await self._write(keys=[self.key(event_id) for event_id, _ in chunk], args=args, client=self.client)
        except (RedisError, OSError) as exc:  # a chunk written before the failure is written again: HSET is idempotent
            for event_id, fields in batch.items():  # keep them (bounded) for the next attempt
                for field, value in fields.items():
                    if event_id in self.pending or len(self.pending) < self.max_pending:
                        self.pending.setdefault(event_id, {}).setdefault(field, value)
                    else:
                        self.dropped += 1
            self.failures += 1
            now = time.monotonic()
            self.retry_at = now + self.backoff.delay(self.failures)
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("trace index: Redis write failed, %d events buffered: %r", len(self.pending), exc)
            return 0
        self.failures = 0
        self.written += len(batch)
        return len(batch)

    # -- a trace out -----------------------------------------------------------------------------

    async def lookup(self, event_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The event's path per tenant: accepted, stage timestamps, each sink's delivery or dead letter,
        and every stage that did not pass it on."""
        try:
            raw = await self.client.hgetall(self.key(event_id))
        except (RedisError, OSError) as exc:
            raise TransientError(f"trace index unavailable: {exc}") from exc
        tenants: dict[str, dict[str, Any]] = {}
        for value in raw.values():
            fact = unpack(value)
            if tenant is not None and fact["tenant"] != tenant:
                continue
            path = tenants.setdefault(fact["tenant"], {"accepted": None, "stages": {}, "sinks": {}, "dropped": []})
            kind = fact["kind"]
            if kind == "accepted":  # the first copy's, whose path the stamps show; later copies counted
                copies = (path["accepted"] or {}).get("copies", 0) + 1
                if path["accepted"] is None or fact["ingest_ts"] < path["accepted"]["ingest_ts"]:
                    path["accepted"] = {k: fact[k] for k in ("ingest_ts", "topic", "partition", "offset")}
                path["accepted"]["copies"] = copies
            elif kind == "path":
                path["stages"] = fact["stages"]
            elif kind == "sink":
                path["sinks"][fact["sink"]] = {
                    "status": "delivered",
                    **{k: fact[k] for k in ("acked_ts", "attempts", "idempotency_key", "source")},
                }
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
        await self.client.aclose()


def _rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


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


def _clock(ms: float | None) -> str:
    if not ms:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{int(ms % 1000):03d}"


def render(trace: dict[str, Any]) -> str:
    """The trace for a person: one line per step, times with the delay since acceptance."""
    if not trace["found"]:
        return (
            f"event {trace['event_id']}: not found (never accepted, older than the trace retention, "
            "or not yet tallied: try again in a second)"
        )
    lines = []
    for tenant, path in trace["tenants"].items():
        lines.append(f"event {trace['event_id']} of tenant {tenant}")
        accepted = path["accepted"] or {}
        start = accepted.get("ingest_ts")

        def since(ms: float | None, start: float | None = start) -> str:
            return f"{_clock(ms)}  ({ms - start:+.0f} ms)" if ms and start else _clock(ms)

        where = f"  -> {accepted['topic']}[{accepted['partition']}]@{accepted['offset']}" if "topic" in accepted else ""
        if accepted.get("copies", 1) > 1:
            where += f"  ({accepted['copies']} copies accepted; the path is the first's)"
        lines.append(f"  accepted by the collector  {_clock(start)}{where}")
        for stage, at in path["stages"].items():
            if stage != pipeline.COLLECTOR.name:
                lines.append(f"  {stage:<25} {since(at)}")
        for step in path["dropped"]:
            line = f"  {step['stage']:<25} {since(step['at'])}  {step['text']}"
            if "first_copy" in step:
                line += f" of the message at {step['first_copy']} (this copy: {step['source']})"
            if step["outcome"] == "dlq":
                line += f": {step.get('reason')}: {step.get('error')}"
            lines.append(line)
        for sink, step in path["sinks"].items():
            if step["status"] == "delivered":
                lines.append(
                    f"  sink {sink:<20} {since(step['acked_ts'])}  delivered, attempts {step['attempts']}, "
                    f"idempotency key {step['idempotency_key']}"
                )
            else:
                line = f"  sink {sink:<20} {since(step['at'])}  {step['text']} at {step['stage']}"
                if step["outcome"] == "dlq":
                    line += f" (attempts {step.get('attempts')}): {step.get('reason')}: {step.get('error')}"
                lines.append(line)
    return "\n".join(lines)
