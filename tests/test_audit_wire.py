"""Tallies and receipts as typed records (shared/audit.py) in a rolling upgrade: the new writers give the
same bytes as the dict-built ones before them (tests/audit_v1.py, frozen), so an old auditor reads new
records as before; and the new readers count old records as the old reader did."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

import shared.audit
import tests.audit_v1 as v1
from services.auditor.ledger import LossLedger
from shared.audit import Receipt, Tally, decode_receipt, decode_tally
from shared.codec import unpack
from shared.dlq import DeadLetter
from shared.errors import InvalidEvent
from shared.event import Event
from shared.outcome import Outcome
from shared.step import Record

AT = 1_700_000_000_123.5


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers stamp `at` with now_ms(): one fixed instant, so their bytes can be compared."""
    monkeypatch.setattr(shared.audit, "now_ms", lambda: AT)
    monkeypatch.setattr(v1, "now_ms", lambda: AT)


def batch(partition: int = 0) -> tuple[list[Any], list[Record], list[DeadLetter]]:
    """Passed, duplicate, quarantined, filtered and dead-lettered events over two tenants, and one undecodable."""
    outcomes = [Outcome.OUT, Outcome.OUT, Outcome.DUP, Outcome.QUARANTINED, "filtered:hook", Outcome.OUT, "dlq"]
    messages, records, dead = [], [], []
    for offset, outcome in enumerate(outcomes):
        message = ConsumerRecord("in", partition, 40 + offset, 0, 0, b"k", b"v", None, 1, 1, [])
        messages.append(message)
        tenant = "acme" if offset < 5 else "globex"
        event = Event(f"e{offset}", "play", 1.0, tenant, ingest_ts=1000.0 + offset * 4000, stages={"collector": 1.0})
        note = {"event_type": "play", "rules": ["minimum"]} if outcome == Outcome.QUARANTINED else None
        records.append(Record(event, message, outcome=Outcome.OUT if outcome == "dlq" else outcome, note=note))
        if outcome == "dlq":
            dead.append(DeadLetter(message, InvalidEvent("bad", "no"), attempts=3))
    messages.append(ConsumerRecord("in", partition, 47, 5000, 0, b"k", b"?", None, 1, 1, []))  # undecodable
    return messages, records, dead


def test_a_stages_tallies_are_the_bytes_the_old_writer_gave():
    messages, records, dead = batch()
    messages += batch(partition=1)[0][:2]
    new = shared.audit.batch_tallies("deduplicator", "tallies", 2, messages, records, dead)
    old = v1.batch_tallies("deduplicator", "tallies", 2, messages, records, dead)
    assert [(o.topic, o.key, o.value) for o in new] == [(o.topic, o.key, o.value) for o in old]
    assert len(new) == 2 and "events" in unpack(new[0].value) and "events" not in unpack(new[1].value)


@pytest.mark.parametrize("budget", [100, 300, 10_000])
def test_split_tallies_are_the_bytes_the_old_writer_gave(budget: int):
    messages, records, dead = batch()
    part = decode_tally(shared.audit.batch_tallies("deduplicator", "t", 2, messages, records, dead)[0].value)
    new = shared.audit.split_tally(part, budget)
    old = v1.split_tally(unpack(v1.batch_tallies("deduplicator", "t", 2, messages, records, dead)[0].value), budget)
    assert new == old and (len(new) > 1) == (budget < 10_000)


def test_accepted_tallies_and_receipts_are_the_bytes_the_old_writer_gave():
    where = {"topic": "ns.hifi.raw", "ingest_ts": 5000.25, "events": [[f"e{i}", i % 3, 100 + i] for i in range(40)]}
    for args in (("canary", "acme", 10, 1), ("collector", "acme", 10, 40, where)):
        assert shared.audit.accepted_tally(*args) == v1.accepted_tally(*args)
    assert shared.audit.accepted_tallies("collector", "acme", 10, 40, where, 300) == v1.accepted_tallies(
        "collector", "acme", 10, 40, where, 300
    )
    rows = [[f"e{i}", "acme", 1000.0 + i, 1 + i % 2, i == 3] for i in range(20)]
    trace = [[f"hook:acme:e{i}", {"collector": 1.0}, f"ns.hifi.out.hook:0:{i}"] for i in range(20)]
    for args in (("hook", 9000.5, rows, trace), ("hook", 9000.5, rows, None)):
        assert shared.audit.receipt(*args) == v1.receipt(*args)
        assert shared.audit.receipts(*args, budget=400) == v1.receipts(*args, budget=400)


def test_the_new_reader_counts_old_tallies_and_receipts_as_the_old_reader_did():
    messages, records, dead = batch()
    old_values = [o.value for o in v1.batch_tallies("deduplicator", "t", 2, messages, records, dead)]
    old_values += v1.accepted_tallies("collector", "acme", 0, 7, {"topic": "raw", "ingest_ts": 1.0, "events": []})
    as_records, as_dicts = LossLedger(lambda t: ("hook",), 2, 4), LossLedger(lambda t: ("hook",), 2, 4)
    for value in old_values:
        tally = decode_tally(value)
        assert isinstance(tally, Tally)
        as_records.add_tally(tally)
        as_dicts.add_tally(unpack(value))  # the dict the old reader had, validated at the ledger's edge
    assert (
        as_records.totals
        == as_dicts.totals
        == {
            "deduplicator": {"out": 3, "dup": 1, "quarantined": 1, "filtered:hook": 1, "dlq": 2},
            "collector": {"accepted": 7},
        }
    )
    per_bucket = lambda ledger: {k: {s: dict(c) for s, c in b.counts.items()} for k, b in ledger.buckets.items()}  # noqa: E731
    assert per_bucket(as_records) == per_bucket(as_dicts) and ("?", 4) in as_records.buckets  # the undecodable
    assert as_records.quarantined() == {"acme": {"play": {"events": 1, "rules": {"minimum": 1}}}}
    (old_tally,) = [t for t in map(decode_tally, old_values) if t.events]
    rows = old_tally.event_rows()
    assert [(r.offset, r.outcome) for r in rows] == [
        (42, "dup"),
        (43, "quarantined"),
        (44, "filtered:hook"),
        (46, "dlq"),
    ]
    assert rows[-1].note is not None and rows[-1].note["error"] == "InvalidEvent" and rows[-1].note["attempts"] == 3

    old_receipt = decode_receipt(v1.receipt("hook", 9.5, [["e1", "acme", 1.0, 2, True, "a later field"]]))
    assert isinstance(old_receipt, Receipt) and old_receipt.trace is None
    assert (old_receipt.events[0].event_id, old_receipt.events[0].canary, old_receipt.events[0].attempts) == (
        "e1",
        True,
        2,
    )
