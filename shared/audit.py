"""What stages tell the auditor, on two topics (see `Topics.tallies` and `Topics.receipts`).

A **tally** counts one batch of one stage: runs of `[tenant, bucket, outcome, n]` in the source
partition's offset order, starting at offset `first`. The auditor counts each offset once, in any
order: a batch replayed after a crash is counted once, and a tally re-sent late still counts. The
collector (HTTP, no source offsets) and the auditor's canaries tally `accepted` without offsets.

A **receipt** lists the events one sender batch delivered: `[event_id, tenant, ingest_ts, attempts,
canary]` plus the sink and the acknowledgement time, from which the auditor measures lag and the
on-time SLI. Its `trace` holds, per event in the same order, `[idempotency_key, stages, source]` (the
stage timestamps and the sink topic's `topic:partition:offset`), for `hifi trace` (shared/trace.py).

A stage's tally also lists the events it did not pass on (`events`: `[offset, event_id, outcome,
tenant, note]`; a dead letter's note has its reason, error code (`error_code`: never the error's text)
and attempts), and the collector's names where each accepted event was written (`accepted`).

Outcomes: accepted, out, dup, dlq, unrouted, delivered, skipped, canary_dropped, quarantined (the deduplicator's:
broke the tenant's schema); the router's
`filtered:<sink>,<sink>`: routed, but those sinks' filters or consent took it out (`filtered_outcome`);
and for `hifi replay` traffic replayed / replay_skipped (kept out of the live loss ledger).
Buckets are event time: `ingest_ts` rounded down to `bucket_s` seconds (epoch seconds).

Records: msgspec Structs (`Tally` of `Run`s and `EventRow`s, `Receipt` of `ReceiptRow`s) that encode to the
same msgpack maps and arrays, byte for byte, as the dicts and lists written before them, so old and new
writers and readers mix in a rolling upgrade (tests/test_audit_wire.py).

Size: a record over Kafka's max request size (1 MB) would be dead-lettered and its counts lost, so a
tally or receipt over `RECORD_BUDGET` is split into several, each complete for what it lists: a tally's
runs split at a run boundary with `first` moved on (the ledger counts offsets, so the parts add up to
the whole), and a part may carry only `events` (runs `[]`); a receipt splits its `events` and `trace` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord

from shared.codec import pack
from shared.dlq import DeadLetter
from shared.errors import InvalidEvent
from shared.event import now_ms
from shared.outcome import PASSED, Outcome
from shared.publish import Output
from shared.step import Record

FILTERED = "filtered:"
RECORD_BUDGET = 512 * 1024  # bytes per tally or receipt value: half of Kafka's default max request size


# -- wire records: the same msgpack maps and arrays as the dicts and lists written before them --------------


class Run(msgspec.Struct, array_like=True):
    """`[tenant, bucket, outcome, count]`: consecutive source offsets with the same tenant, bucket and outcome."""

    tenant: str
    bucket: int
    outcome: str
    count: int


class EventRow(msgspec.Struct, array_like=True):
    """`[offset, event_id, outcome, tenant, note]`: an event a stage did not pass on, for `hifi trace`."""

    offset: int
    event_id: str
    outcome: str
    tenant: str
    note: dict[str, Any] | None = None


class Accepted(msgspec.Struct):
    """Where the collector wrote the events an accepted tally counts: `events` are `[event_id, partition, offset]`."""

    topic: str
    ingest_ts: float
    events: list[list[Any]]


class Tally(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A stage's tally of one batch of one source partition, or an `accepted` tally (no topic, partition, first).

    Field order is the wire's: a stage's tally is {stage, topic, partition, first, runs, events?, at}, an
    accepted one {stage, runs, at, accepted?}. `events` are read row by row (`event_rows`) so that one
    malformed row costs that row, never the tally's counts."""

    stage: str
    topic: str | None = None
    partition: int | None = None
    first: int | None = None
    runs: list[Run]  # always written, even empty: readers before these records index it
    events: list[Any] = []
    at: float | None = None
    accepted: Accepted | None = None

    @property
    def count(self) -> int:
        return sum(run.count for run in self.runs)

    def event_rows(self) -> list[EventRow]:
        """The readable rows of `events` (a row from a buggy or future writer that does not fit is skipped)."""
        rows = []
        for row in self.events:
            try:
                rows.append(msgspec.convert(row, EventRow))
            except msgspec.ValidationError:
                continue
        return rows


class ReceiptRow(msgspec.Struct, array_like=True):
    """`[event_id, tenant, ingest_ts, attempts, canary]`: one delivered event (trailing extras are ignored)."""

    event_id: str
    tenant: str
    ingest_ts: float
    attempts: int
    canary: bool = False


class Receipt(msgspec.Struct, omit_defaults=True):
    """One sender batch's deliveries: {sink, delivered_ts, events, trace?}; `trace` rows are
    `[idempotency_key, stages, source]`, read loosely (a malformed one costs the trace, never the SLI)."""

    sink: str
    delivered_ts: float
    events: list[ReceiptRow]
    trace: list[Any] | None = None


_tally_decoder = msgspec.msgpack.Decoder(Tally)
_receipt_decoder = msgspec.msgpack.Decoder(Receipt)


def decode_tally(data: bytes) -> Tally:
    return _tally_decoder.decode(data)


def decode_receipt(data: bytes) -> Receipt:
    return _receipt_decoder.decode(data)


def as_tally(value: Tally | dict[str, Any]) -> Tally:
    """A tally as a record; a dict (a tool's or a test's) is validated into one."""
    return value if isinstance(value, Tally) else msgspec.convert(value, Tally)


def as_receipt(value: Receipt | dict[str, Any]) -> Receipt:
    return value if isinstance(value, Receipt) else msgspec.convert(value, Receipt)


def filtered_outcome(sinks: list[str]) -> str:
    """The router's outcome for an event that some of its tenant's sinks filtered out (sink names have no ',')."""
    return FILTERED + ",".join(sorted(sinks))


def filtered_sinks(outcome: str) -> frozenset[str]:
    """The sinks a router outcome filtered the event from (none for any other outcome)."""
    return frozenset(outcome[len(FILTERED) :].split(",")) if outcome.startswith(FILTERED) else frozenset()


def bucket_of(at_ms: float, bucket_s: int) -> int:
    return int(at_ms // 1000 // bucket_s * bucket_s)


def accepted_tally(stage: str, tenant: str, bucket: int, count: int, accepted: dict[str, Any] | None = None) -> bytes:
    """`accepted`: {topic, ingest_ts, events: [[event_id, partition, offset]]}, where each was written."""
    where = None if accepted is None else Accepted(accepted["topic"], accepted["ingest_ts"], accepted["events"])
    return pack(Tally(stage=stage, runs=[Run(tenant, bucket, Outcome.ACCEPTED, count)], at=now_ms(), accepted=where))


def accepted_tallies(
    stage: str, tenant: str, bucket: int, count: int, accepted: dict[str, Any], budget: int = RECORD_BUDGET
) -> list[bytes]:
    """`accepted_tally`, split under `budget`: each part counts the events it lists (the first also any
    unlisted rest), so the parts' counts add up to `count`."""
    value = accepted_tally(stage, tenant, bucket, count, accepted)
    events = accepted["events"]
    if len(value) <= budget or len(events) < 2:
        return [value]
    half = len(events) // 2
    right = min(count, len(events) - half)
    return [
        *accepted_tallies(stage, tenant, bucket, count - right, {**accepted, "events": events[:half]}, budget),
        *accepted_tallies(stage, tenant, bucket, right, {**accepted, "events": events[half:]}, budget),
    ]


def receipts(
    sink: str,
    delivered_ts: float,
    rows: list[list[Any]],
    trace: list[list[Any]] | None = None,
    budget: int = RECORD_BUDGET,
) -> list[bytes]:
    """`receipt`, split under `budget` into receipts of consecutive rows (each with its rows' trace)."""
    value = receipt(sink, delivered_ts, rows, trace)
    if len(value) <= budget or len(rows) < 2:
        return [value]
    half = len(rows) // 2
    return [
        *receipts(sink, delivered_ts, rows[:half], None if trace is None else trace[:half], budget),
        *receipts(sink, delivered_ts, rows[half:], None if trace is None else trace[half:], budget),
    ]


def split_tally(part: Tally, budget: int = RECORD_BUDGET) -> list[bytes]:
    """A stage's tally of one partition, split under `budget`: runs at a run boundary (the right part's `first`
    moves past the left's counts), events in halves; the ledger's offsets and counts add up to the whole."""
    value = pack(part)
    runs, events = part.runs, part.events
    if len(value) <= budget or (len(runs) < 2 and len(events) < 2):
        return [value]
    half = len(events) // 2
    if len(runs) >= 2:
        cut = len(runs) // 2
        first = (part.first or 0) + sum(run.count for run in runs[:cut])
        left = msgspec.structs.replace(part, runs=runs[:cut], events=events[:half])
        right = msgspec.structs.replace(part, runs=runs[cut:], first=first, events=events[half:])
    else:  # one run: it stays left; the right part only lists events (an empty range to the ledger)
        left = msgspec.structs.replace(part, events=events[:half])
        right = msgspec.structs.replace(part, runs=[], events=events[half:])
    return [*split_tally(left, budget), *split_tally(right, budget)]


def receipt(sink: str, delivered_ts: float, rows: list[list[Any]], trace: list[list[Any]] | None = None) -> bytes:
    """rows: [event_id, tenant, ingest_ts, attempts, canary]; trace: [idempotency_key, stages, source] each."""
    return pack(Receipt(sink, delivered_ts, [ReceiptRow(*row) for row in rows], trace))


def batch_tallies(
    stage: str,
    topic: str,
    bucket_s: int,
    messages: Sequence[ConsumerRecord],  # type: ignore[type-arg]
    records: Sequence[Record],
    dead: Sequence[DeadLetter],
) -> list[Output]:
    """A stage's tally of one batch, per source partition: runs of [tenant, bucket, outcome, count] in offset
    order, and the events it did not pass on (`events`, for `hifi trace`: they are few, and the auditor
    indexes them). `records` are the decoded messages (their outcome), `dead` the dead-lettered ones."""
    by_message = {id(r.message): r for r in records}
    dead_ids = {id(letter.message): letter for letter in dead}
    parts: dict[tuple[str, int], Tally] = {}
    for msg in messages:
        record = by_message.get(id(msg))
        if record is not None:
            tenant = record.event.tenant
            at_ms = record.event.ingest_ts or (msg.timestamp or 0)
        else:  # undecodable: no tenant to charge it to
            tenant, at_ms = "?", (msg.timestamp or 0)
        outcome = dead_letter_outcome(record) if id(msg) in dead_ids else (record.outcome if record else Outcome.DLQ)
        bucket = int(at_ms // 1000 // bucket_s * bucket_s)
        part = parts.get((msg.topic, msg.partition))
        if part is None:
            part = parts[(msg.topic, msg.partition)] = Tally(
                stage=stage, topic=msg.topic, partition=msg.partition, first=msg.offset, runs=[]
            )
        runs = part.runs
        if runs and runs[-1].tenant == tenant and runs[-1].bucket == bucket and runs[-1].outcome == outcome:
            runs[-1].count += 1
        else:
            runs.append(Run(tenant, bucket, outcome, 1))
        if record is not None and outcome not in PASSED:  # for `hifi trace` (shared/trace.py)
            note = trace_note(record, dead_ids.get(id(msg)))
            part.events.append(EventRow(msg.offset, record.event.event_id, outcome, tenant, note))
    at = now_ms()
    key = stage.encode()
    outputs = []
    for part in parts.values():
        part.at = at
        outputs += [Output(topic, key, value) for value in split_tally(part)]
    return outputs


def dead_letter_outcome(record: Record | None) -> str:
    """A dead letter's outcome: `dlq`, unless the handler marked the event as replay traffic (`replay_dlq`,
    which the ledger keeps out of the live reconciliation, as it does replayed deliveries)."""
    return Outcome.REPLAY_DLQ if record is not None and record.outcome == Outcome.REPLAY_DLQ else Outcome.DLQ


def trace_note(record: Record, letter: DeadLetter | None) -> dict[str, Any]:
    """What a tally says about one event the stage did not pass on: the stage's note, its stamps so far,
    and for a dead letter why."""
    note = {**(record.note or {}), "ingest_ts": record.event.ingest_ts, "stages": record.event.stages}
    if letter is not None:
        error = letter.error
        note["reason"] = error.reason if isinstance(error, InvalidEvent) else type(error).__name__
        note["error"] = error_code(error)
        note["attempts"] = letter.attempts
    return note


def error_code(error: BaseException) -> str:
    """What a tally and the trace index say about an error: its class, HTTP status or SQLSTATE, never its text,
    which can quote the event's data (the full text stays in the dead letter)."""
    seen: object = error
    visited: set[int] = set()
    while isinstance(seen, BaseException) and id(seen) not in visited:  # a chain may loop back on itself
        visited.add(id(seen))  # the first cause down the chain that carries a code
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            return f"status {status}"
        sqlstate = getattr(seen, "sqlstate", None)
        if sqlstate:
            return f"sqlstate {sqlstate}"
        cause = getattr(seen, "cause", None)  # a third-party error's `cause` may be anything
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return type(error).__name__
