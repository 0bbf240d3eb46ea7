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
tenant, note]`), and the collector's names where each accepted event was written (`accepted`).

Outcomes: accepted, out, dup, dlq, unrouted, delivered, skipped, canary_dropped, quarantined (the deduplicator's:
broke the tenant's schema); the router's
`filtered:<sink>,<sink>`: routed, but those sinks' filters or consent took it out (`filtered_outcome`);
and for `hifi replay` traffic replayed / replay_skipped (kept out of the live loss ledger).
Buckets are event time: `ingest_ts` rounded down to `bucket_s` seconds (epoch seconds).
"""

from __future__ import annotations

from typing import Any

from shared.codec import pack
from shared.event import now_ms

FILTERED = "filtered:"


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
    tally: dict[str, Any] = {"stage": stage, "runs": [[tenant, bucket, "accepted", count]], "at": now_ms()}
    if accepted is not None:
        tally["accepted"] = accepted
    return pack(tally)


def receipt(sink: str, delivered_ts: float, rows: list[list[Any]], trace: list[list[Any]] | None = None) -> bytes:
    """rows: [event_id, tenant, ingest_ts, attempts, canary]; trace: [idempotency_key, stages, source] each."""
    value: dict[str, Any] = {"sink": sink, "delivered_ts": delivered_ts, "events": rows}
    if trace is not None:
        value["trace"] = trace
    return pack(value)
