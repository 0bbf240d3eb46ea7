"""The auditor against ground truth: lag from receipts matches what the sink saw, every delivery is
counted, and events deleted between two stages are reported lost, exactly that many, at that stage."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from hypothesis import given
from hypothesis import strategies as st

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from services.auditor.ledger import LossLedger, OffsetRanges
from shared.audit import Run, Tally, split_tally
from shared.codec import unpack
from shared.topics import Topics
from tests.helpers import SentryReceiver, post, tenant_block, wait_for

API_KEY = "acme-live-key-5f2c9d"
SECRET_VALUE = "private-payload-value-7731"


def audit_summary(pipeline: Any) -> dict[str, Any]:
    with urllib.request.urlopen(pipeline.services["auditor"].url("/audit"), timeout=5) as resp:
        return json.loads(resp.read())


def write_config(path: Any, hook_port: int, canary_s: float, quiet_port: int | None = None) -> None:
    sinks = f'  hook: {{type: webhook, url: "http://127.0.0.1:{hook_port}/in"}}\n'
    if quiet_port is not None:  # a sink that does not want canaries
        sinks += f'  quiet: {{type: webhook, url: "http://127.0.0.1:{quiet_port}/in", drop_canaries: true}}\n'
    path.write_text(
        "tenants:\n"
        + tenant_block("acme", API_KEY, ["hook", "quiet"] if quiet_port else ["hook"])
        + "sinks:\n"
        + sinks
        + f"audit: {{bucket_s: 2, settle_s: 4, canary_interval_s: {canary_s}, dlq_check_s: 1}}\n"
    )


def make_events(factory: EventFactory, n: int) -> list[dict[str, Any]]:
    events = [factory.make() for _ in range(n)]
    for e in events:
        e["payload"]["note"] = SECRET_VALUE
    return events


# -- the ledger on its own -----------------------------------------------------------------------


def tally(stage: str, first: int, runs: list[list[Any]], partition: int = 0) -> dict[str, Any]:
    return {"stage": stage, "topic": f"in.{stage}", "partition": partition, "first": first, "runs": runs}


def test_ledger_counts_a_replayed_offset_once_and_places_loss_at_the_first_short_hop():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 100, "accepted", 10]]})
    ledger.add_tally(tally("enricher", 0, [["acme", 100, "out", 10]]))
    ledger.add_tally(tally("deduplicator", 0, [["acme", 100, "out", 5], ["acme", 100, "dup", 1]]))
    # a crash replayed offsets 3..5 and went on to 7: only 6 and 7 are new
    ledger.add_tally(tally("deduplicator", 3, [["acme", 100, "out", 3], ["acme", 100, "out", 2]]))
    ledger.add_tally(tally("router", 0, [["acme", 100, "out", 7]]))
    ledger.add_tally(tally("sender.hook", 0, [["acme", 100, "delivered", 7]]))
    assert ledger.replayed == 3
    assert ledger.due(100 + 10 + 29) == [] and ledger.due(100 + 10 + 30) == [("acme", 100)]
    (report,) = ledger.reconcile("acme", 100)
    # accepted 10 = delivered 7 + dup 1 + lost 2; enricher passed on 10, the deduplicator read 8
    assert (report.lost, report.stage, report.status) == (2, "deduplicator", "unconfirmed")
    assert ledger.pending() == [report]
    report.status = "lost"  # the auditor confirms it when the deduplicator has no backlog to hold them
    assert ledger.lost_by_stage() == {"deduplicator": 2}
    assert report.detail == "enricher passed on 10, deduplicator read 8"
    # the two turn up late: the bucket is reconciled again and the loss is gone, counted as late
    late = ledger.add_tally(tally("deduplicator", 8, [["acme", 100, "out", 2]]))
    ledger.add_tally(tally("router", 7, [["acme", 100, "out", 2]]))
    ledger.add_tally(tally("sender.hook", 7, [["acme", 100, "delivered", 2]]))
    assert late == [("acme", 100)]
    assert ledger.reconcile("acme", 100) == []
    report = ledger.reports[("acme", "hook", 100)]
    assert (report.lost, report.late, report.status) == (0, 6, "recovered")
    assert ledger.lost_by_stage() == {}


def test_ledger_reports_surplus_not_loss_for_copies_a_replay_made():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 4]]})
    ledger.add_tally(tally("enricher", 0, [["acme", 0, "out", 4]]))
    # the enricher's replay wrote two more copies at new offsets; the deduplicator drops them
    ledger.add_tally(tally("deduplicator", 0, [["acme", 0, "out", 4], ["acme", 0, "dup", 2]]))
    ledger.add_tally(tally("router", 0, [["acme", 0, "out", 4]]))
    ledger.add_tally(tally("sender.hook", 0, [["acme", 0, "delivered", 4]]))
    assert ledger.reconcile("acme", 0) == []
    assert ledger.surplus == {("acme", "hook", 0): 2}


def quarantined_row(offset: int, event_type: str | None, rules: list[str]) -> list[Any]:
    note: dict[str, Any] = {"ingest_ts": 1.0, "stages": {}}
    if event_type is not None:  # None: a deduplicator from before the breakdown
        note.update(event_type=event_type, rules=rules)
    return [offset, f"e{offset}", "quarantined", "acme", note]


def test_ledger_counts_quarantined_events_per_type_and_rule_each_offset_once():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    rows = [
        quarantined_row(0, "play", ["minimum", "pattern"]),
        quarantined_row(1, "play", ["minimum"]),
        quarantined_row(2, "(unknown)", ["unknown_type"]),
    ]
    part = tally("deduplicator", 0, [["acme", 0, "quarantined", 3]])
    ledger.add_tally({**part, "events": rows})
    ledger.add_tally({**part, "events": rows[1:]})  # a crash replayed two of them: counted once
    old = tally("deduplicator", 3, [["acme", 0, "quarantined", 1]])
    ledger.add_tally({**old, "events": [quarantined_row(3, None, [])]})
    assert ledger.quarantined() == {
        "acme": {
            "play": {"events": 2, "rules": {"minimum": 2, "pattern": 1}},
            "(unknown)": {"events": 1, "rules": {"unknown_type": 1}},
            "(no breakdown)": {"events": 1, "rules": {}},
        }
    }


def test_quarantine_counts_of_a_tenant_stay_bounded_with_an_other_bucket():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30, max_quarantine_labels=3)
    rows = [quarantined_row(i, f"t{i}", [f"r{i}", "required"]) for i in range(6)]
    ledger.add_tally({**tally("deduplicator", 0, [["acme", 0, "quarantined", 6]]), "events": rows})
    counts = ledger.quarantined()["acme"]
    assert list(counts) == ["t0", "t1", "t2", "(other)"]
    assert counts["(other)"] == {"events": 3, "rules": {"r3": 1, "required": 3, "r4": 1, "(other)": 1}}
    assert sum(c["events"] for c in counts.values()) == 6


def test_quarantine_counts_per_bucket_show_when_violations_started():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30, max_quarantine_labels=2)
    # one tally over two buckets: offsets 0-1 (bucket 0: one passed, one quarantined), 2-4 (bucket 10)
    runs = [["acme", 0, "out", 1], ["acme", 0, "quarantined", 1], ["acme", 10, "quarantined", 3]]
    rows = [
        quarantined_row(1, "play", ["minimum"]),
        quarantined_row(2, "play", ["pattern", "minimum"]),
        quarantined_row(3, "pause", ["required"]),
        quarantined_row(4, "seek", ["type"]),  # past the cap of 2 types in its bucket
    ]
    ledger.add_tally({**tally("deduplicator", 0, runs), "events": rows})
    ledger.add_tally({**tally("deduplicator", 2, runs[2:]), "events": rows[1:2]})  # replayed: counted once
    assert ledger.quarantined_by_bucket() == {
        "acme": {
            0: {"play": {"events": 1, "rules": {"minimum": 1}}},
            10: {
                "play": {"events": 1, "rules": {"pattern": 1, "minimum": 1}},
                "pause": {"events": 1, "rules": {"required": 1}},
                "(other)": {"events": 1, "rules": {"type": 1}},
            },
        }
    }
    # a loss report of a bucket carries that bucket's breakdown
    ledger.add_tally({"stage": "collector", "runs": [["acme", 10, "accepted", 4]]})
    ledger.add_tally(tally("enricher", 0, [["acme", 10, "out", 4]]))
    (report,) = ledger.reconcile("acme", 10)
    assert report.to_json()["quarantined"] == ledger.quarantined_by_bucket()["acme"][10]
    assert ledger.quarantined()["acme"]["play"] == {"events": 2, "rules": {"minimum": 2, "pattern": 1}}
    ledger.forget_before(20)
    assert ledger.quarantined_by_bucket() == {"acme": {0: {"play": {"events": 1, "rules": {"minimum": 1}}}}}


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=40), st.integers(1, 6))
def test_offset_ranges_count_each_offset_once_in_any_order(batches, max_ranges):
    ranges = OffsetRanges(max_ranges=1000)
    seen: set[int] = set()
    for start, n in batches:
        new = ranges.add(start, start + n)
        assert sum(hi - lo for lo, hi in new) == len(set(range(start, start + n)) - seen)
        seen |= set(range(start, start + n))
        covered = [o for lo, hi in ranges.ranges for o in range(lo, hi)]
        assert covered == sorted(seen), "ranges are disjoint, sorted and exactly the offsets counted"
        assert all(a[1] < b[0] for a, b in zip(ranges.ranges, ranges.ranges[1:], strict=False))
    bounded = OffsetRanges(max_ranges=max_ranges)
    for start, n in batches:
        bounded.add(start, start + n)
        assert len(bounded.ranges) <= max_ranges


def test_ledger_counts_a_resent_tally_that_lands_after_later_ones():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 10]]})
    ledger.add_tally(tally("enricher", 0, [["acme", 0, "out", 10]]))
    ledger.add_tally(tally("deduplicator", 5, [["acme", 0, "out", 5]]))
    ledger.add_tally(tally("deduplicator", 0, [["acme", 0, "out", 5]]))  # re-sent, landed late
    ledger.add_tally(tally("deduplicator", 3, [["acme", 0, "out", 4]]))  # a crash replay: 3..6 again
    ledger.add_tally(tally("router", 0, [["acme", 0, "out", 10]]))
    ledger.add_tally(tally("sender.hook", 0, [["acme", 0, "delivered", 10]]))
    assert ledger.totals["deduplicator"] == {"out": 10} and ledger.replayed == 4
    assert ledger.reconcile("acme", 0) == []


def test_ledger_finds_a_loss_that_a_surplus_at_another_hop_would_hide():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 10]]})
    ledger.add_tally(tally("enricher", 0, [["acme", 0, "out", 10]]))
    ledger.add_tally(tally("deduplicator", 0, [["acme", 0, "out", 10]]))
    ledger.add_tally(tally("router", 0, [["acme", 0, "out", 12]]))  # 2 copies a deduplicator replay wrote
    ledger.add_tally(tally("sender.hook", 0, [["acme", 0, "delivered", 9], ["acme", 0, "skipped", 2]]))
    (report,) = ledger.reconcile("acme", 0)
    assert (report.lost, report.stage, report.detail) == (1, "sender.hook", "router passed on 12, sender.hook read 11")
    assert ledger.surplus == {("acme", "hook", 0): 2}


def test_ledger_lists_offsets_between_covered_ranges_until_a_tally_fills_them():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally(tally("router", 0, [["acme", 0, "out", 6]]))
    ledger.add_tally(tally("router", 7, [["acme", 0, "out", 3]]))
    ledger.add_tally(tally("router", 12, [["acme", 0, "out", 1]]))
    assert ledger.gaps() == [("router", "in.router", 0, 6, 7), ("router", "in.router", 0, 10, 12)]
    ledger.add_tally(tally("router", 6, [["acme", 0, "out", 1]]))  # re-sent, landed late
    assert ledger.gaps() == [("router", "in.router", 0, 10, 12)]


# -- on the running pipeline ---------------------------------------------------------------------


async def test_lag_and_counts_match_what_the_sink_received(
    tmp_path, namespace, port_base, settings_for, start_pipeline
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    quiet = WebhookReceiver(port=port_base + 18)
    await quiet.start()
    config = tmp_path / "hifi.yaml"
    write_config(config, hook.port, canary_s=1, quiet_port=quiet.port)
    pipeline = await start_pipeline(settings_for(config), auditor=True)
    try:
        factory = EventFactory(producer_id=namespace)
        for _ in range(10):
            assert (await post(pipeline.collector_url, API_KEY, make_events(factory, 20)))[0] == 200
            await asyncio.sleep(0.1)
        real = lambda: [e for e in hook.received if not e.get("canary")]  # noqa: E731
        await wait_for(lambda: len(real()) >= 200, 60, "200 deliveries", pipeline)
        await wait_for(lambda: len([e for e in hook.received if e.get("canary")]) >= 2, 20, "canaries", pipeline)

        def receipts_caught_up() -> bool:
            m = audit_summary(pipeline)["sinks"].get("hook", {}).get("acme")
            return m is not None and m["delivered"] == len(hook.received)

        await wait_for(receipts_caught_up, 20, "receipts for every delivery", pipeline)
        summary = audit_summary(pipeline)
        metrics = summary["sinks"]["hook"]["acme"]
        assert metrics["canaries"] == len([e for e in hook.received if e.get("canary")]) >= 2
        # ground truth: the moment the sink received each event, minus its ingest time
        truth = sorted(arrived - e["ingest_ts"] for e, arrived in zip(hook.received, hook.arrival_ms, strict=True))
        # With an even count the median lies anywhere between the two middle values, which can be far
        # apart: a batch's events share one arrival time, so latencies come in clusters.
        low_p50, high_p50 = truth[(len(truth) - 1) // 2], truth[len(truth) // 2]
        truth_max = truth[-1]
        # receipts are stamped after the sink's answer, so they read a little higher, never lower
        assert low_p50 - 2 <= metrics["lag_1m"]["p50_ms"] <= high_p50 + max(25, high_p50 * 0.25), (
            (low_p50, high_p50),
            metrics,
        )
        assert metrics["lag_1m"]["max_ms"] >= truth_max - 2
        assert metrics["lag_1m"]["count"] == len(hook.received)
        # On time is the sink's truth, not a speed target: a loaded machine makes events late, and the
        # auditor must say so. Receipts are stamped a little after the sink's answer, so an event that
        # arrived just inside the SLA may count as late, never the other way round.
        sla = metrics["sla_ms"]
        on_time_truth = sum(lag <= sla for lag in truth) / len(truth)
        on_time_clear = sum(lag <= sla - 50 for lag in truth) / len(truth)
        assert on_time_clear - 1e-9 <= metrics["on_time_5m"] <= on_time_truth + 1e-9, (on_time_truth, metrics)
        assert metrics["lost"] == 0, metrics
        await wait_for(lambda: audit_summary(pipeline)["buckets_settled"] >= 2, 30, "settled buckets", pipeline)
        assert audit_summary(pipeline)["lost_by_stage"] == {}
        # The sink that drops canaries got none, yet their trip to its sender was measured.
        await wait_for(lambda: len(quiet.received) >= 200, 30, "the quiet sink", pipeline)
        assert not [e for e in quiet.received if e.get("canary")]
        quiet_metrics = audit_summary(pipeline)["sinks"]["quiet"]["acme"]
        assert quiet_metrics["canaries"] >= 2 and quiet_metrics["lost"] == 0
    finally:
        # Services first: canaries keep coming, and a sender whose sink is gone cannot drain on SIGTERM.
        await asyncio.to_thread(pipeline.stop_all)
        await hook.stop()
        await quiet.stop()


async def test_events_deleted_between_stages_are_reported_lost_at_that_stage(
    tmp_path, namespace, port_base, kafka, settings_for, start_pipeline
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    sentry = SentryReceiver()
    config = tmp_path / "hifi.yaml"
    write_config(config, hook.port, canary_s=0)
    pipeline = await start_pipeline(settings_for(config, sentry_dsn=sentry.dsn), auditor=True)
    enriched = Topics(namespace).enriched
    tps = [TopicPartition(enriched, p) for p in range(4)]
    reader = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap)
    await reader.start()
    try:
        factory = EventFactory(producer_id=namespace)
        assert (await post(pipeline.collector_url, API_KEY, make_events(factory, 40)))[0] == 200
        await wait_for(lambda: len(hook.received) >= 40, 60, "the first 40", pipeline)

        # Hold the deduplicator back, let the enricher pass 80 more on, then delete one partition's share.
        assert pipeline.stop("deduplicator") == 0
        before = await reader.end_offsets(tps)
        assert (await post(pipeline.collector_url, API_KEY, make_events(factory, 80)))[0] == 200
        await wait_for(lambda: pipeline.stats()["enricher"]["out"] >= 120, 30, "the enricher", pipeline)
        after = await reader.end_offsets(tps)
        victim = max(tps, key=lambda tp: after[tp] - before[tp])
        deleted = after[victim] - before[victim]
        assert deleted > 0
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
        await admin.start()
        try:
            await admin.delete_records({victim: RecordsToDelete(after[victim])})
        finally:
            await admin.close()
        pipeline.start("deduplicator")
        await asyncio.to_thread(pipeline.wait_ready, 60.0, ["deduplicator"])

        await wait_for(lambda: len(hook.received) >= 120 - deleted, 60, "the rest", pipeline)

        def settled_loss() -> int:
            return sum(r["lost"] for r in audit_summary(pipeline)["loss"])

        await wait_for(lambda: settled_loss() >= deleted, 40, f"{deleted} reported lost", pipeline)
        await asyncio.sleep(3.0)  # nothing more turns up
        summary = audit_summary(pipeline)
        assert len(hook.received) == 120 - deleted
        assert settled_loss() == deleted
        assert {r["stage"] for r in summary["loss"]} == {"deduplicator"}
        assert all("enricher passed on" in r["detail"] for r in summary["loss"])
        assert summary["lost_by_stage"] == {"deduplicator": deleted}

        await wait_for(lambda: sentry.alerts("loss_detected"), 15, "the loss alert")
        await asyncio.sleep(2.0)
        (alert,) = sentry.alerts("loss_detected")  # exactly one, however many buckets
        assert alert["fingerprint"] == ["hifi", "loss_detected", "auditor", "hook"]
        assert alert["level"] == "error" and alert["tags"]["service"] == "auditor"
        dumped = json.dumps(alert)
        assert API_KEY not in dumped and SECRET_VALUE not in dumped
    finally:
        await reader.stop()
        await hook.stop()
        sentry.close()


def test_quarantine_counts_per_bucket_keep_the_rows_of_a_split_tally():
    # a deduplicator's tally of 2 runs in 2 buckets, 6 quarantined rows, split under a small record budget:
    # a piece's rows need not ride with the runs that cover their offsets
    rows = [
        [
            n,
            f"e{n}",
            "quarantined",
            "acme",
            {"event_type": "play", "rules": ["x" * 50], "ingest_ts": 1_000 + 10_000 * (n // 3)},
        ]
        for n in range(6)
    ]
    whole = Tally(
        stage="deduplicator",
        topic="in",
        partition=0,
        first=0,
        runs=[Run("acme", 0, "quarantined", 3), Run("acme", 10, "quarantined", 3)],
        events=rows,
    )
    pieces = split_tally(whole, budget=200)
    assert len(pieces) > 2
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    for piece in pieces:
        ledger.add_tally(unpack(piece))
    assert ledger.quarantined()["acme"]["play"]["events"] == 6
    per_bucket = {start: counts["play"]["events"] for start, counts in ledger.quarantined_by_bucket()["acme"].items()}
    assert per_bucket == {0: 3, 10: 3}  # the fault: {0: 1, 10: 1}, 4 rows counted tenant-wide only


def test_quarantine_counts_per_bucket_share_the_tenant_wide_labels():
    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30, max_quarantine_labels=100)
    for n in range(1_000):  # 1,000 types over an hour of 10 s buckets
        runs = [["acme", (n % 360) * 10, "quarantined", 1]]
        ledger.add_tally({**tally("deduplicator", n, runs), "events": [quarantined_row(n, f"type-{n}", ["minimum"])]})
    by_bucket = ledger.quarantined_by_bucket()["acme"]
    labels = {event_type for counts in by_bucket.values() for event_type in counts}
    assert len(labels) <= 101, len(labels)  # the fault: 1,000, each bucket admitting its own 100
    assert labels == set(ledger.quarantined()["acme"])
    assert sum(c["events"] for counts in by_bucket.values() for c in counts.values()) == 1_000
