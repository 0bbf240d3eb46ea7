"""What stages tell the auditor, on two topics (see `Topics.tallies` and `Topics.receipts`).

A **tally** counts one batch of one stage (`batch_tallies`): runs of `[tenant, bucket, outcome, n]` in the source
partition's offset order, starting at offset `first`. The auditor counts each offset once, in any
order: a batch replayed after a crash is counted once, and a tally re-sent late still counts. The
collector (HTTP, no source offsets) and the auditor's canaries tally `accepted` without offsets.

A **receipt** lists the events one sender batch delivered: `[event_id, tenant, ingest_ts, attempts,
canary]` plus the sink and the acknowledgement time, from which the auditor measures lag and the
on-time SLI.

Outcomes: accepted, out, dup, dlq, unrouted, delivered, skipped, canary_dropped.
Buckets are event time: `ingest_ts` rounded down to `bucket_s` seconds (epoch seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka.structs import ConsumerRecord

from shared.codec import pack
from shared.dlq import DeadLetter
from shared.event import now_ms
from shared.publish import Output
from shared.step import Record


def bucket_of(at_ms: float, bucket_s: int) -> int:
    return int(at_ms // 1000 // bucket_s * bucket_s)


def accepted_tally(stage: str, tenant: str, bucket: int, count: int) -> bytes:
    return pack({"stage": stage, "runs": [[tenant, bucket, "accepted", count]], "at": now_ms()})


def receipt(sink: str, delivered_ts: float, rows: list[list[Any]]) -> bytes:
    """rows: [event_id, tenant, ingest_ts, attempts, canary]."""
    return pack({"sink": sink, "delivered_ts": delivered_ts, "events": rows})


def batch_tallies(
    stage: str,
    topic: str,
    bucket_s: int,
    messages: Sequence[ConsumerRecord],  # type: ignore[type-arg]
    records: Sequence[Record],
    dead: Sequence[DeadLetter],
) -> list[Output]:
    """A stage's tally of one batch, per source partition: runs of [tenant, bucket, outcome, count] in offset
    order. `records` are the decoded messages (their outcome), `dead` the dead-lettered ones."""
    by_message = {id(r.message): r for r in records}
    dead_ids = {id(letter.message) for letter in dead}
    parts: dict[tuple[str, int], dict[str, Any]] = {}
    for msg in messages:
        record = by_message.get(id(msg))
        if record is not None:
            tenant = record.event.tenant
            at_ms = record.event.ingest_ts or (msg.timestamp or 0)
        else:  # undecodable: no tenant to charge it to
            tenant, at_ms = "?", (msg.timestamp or 0)
        outcome = "dlq" if id(msg) in dead_ids else (record.outcome if record is not None else "dlq")
        bucket = int(at_ms // 1000 // bucket_s * bucket_s)
        part = parts.get((msg.topic, msg.partition))
        if part is None:
            part = parts[(msg.topic, msg.partition)] = {
                "stage": stage,
                "topic": msg.topic,
                "partition": msg.partition,
                "first": msg.offset,
                "runs": [],
            }
        runs = part["runs"]
        if runs and runs[-1][0] == tenant and runs[-1][1] == bucket and runs[-1][2] == outcome:
            runs[-1][3] += 1
        else:
            runs.append([tenant, bucket, outcome, 1])
    at = now_ms()
    return [Output(topic, stage.encode(), pack({**part, "at": at})) for part in parts.values()]
