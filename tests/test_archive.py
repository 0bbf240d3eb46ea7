"""The S3 archive (a real s3proxy) and `hifi replay`, on the sink alone and on the real pipeline."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
import pytest

from devtools.s3 import LocalS3
from devtools.traffic import EventFactory
from services.sender.archive import ArchiveSink
from services.sender.sinks import Source
from shared.archive import decode_object, make_store, parse_key
from shared.config import SinkConfig
from shared.event import Event
from tests.helpers import post, read_file_sink, tenant_block, wait_for

HOUR_MS = 3_600_000.0


def archive_config(s3_server: LocalS3, bucket: str, **options: Any) -> SinkConfig:
    return SinkConfig("archive", "s3_archive", {"bucket": bucket, "endpoint": s3_server.endpoint, **options})


async def archived(config: SinkConfig) -> list[Event]:
    store = make_store(config)
    events: list[Event] = []
    for meta in await obstore.list(store).collect_async():
        if parse_key(meta["path"]) is None:  # s3proxy's filesystem backend lists its directories too
            continue
        events += decode_object(bytes(await (await obstore.get_async(store, meta["path"])).bytes_async()))
    return events


def make_events(n: int, ingest_ts: float, tenant: str = "acme") -> list[Event]:
    return [Event(f"e{i}", "play", 1.0, tenant, {"i": i}, device_id=f"d{i}", ingest_ts=ingest_ts) for i in range(n)]


async def test_archive_reupload_after_a_crash_between_put_and_commit_archives_each_event_once(s3_server, bucket):
    """A sender dies after its PUTs and before its commit: the successor re-reads the batch from the committed
    offset, with other batch boundaries, and must neither duplicate nor drop an event."""
    config = archive_config(s3_server, bucket)
    hour = datetime(2026, 11, 30, 7, tzinfo=UTC).timestamp() * 1000
    # two tenants and two hours in one batch: four objects
    batch = make_events(6, hour + 10) + make_events(6, hour + HOUR_MS + 10, "globex")
    for i, event in enumerate(batch):
        event.event_id = f"e{i}"
    first = ArchiveSink(config)
    await first.start()
    await first.deliver_batch(batch[:8], Source("in", 0, list(range(8))))
    # killed here: nothing committed. The successor reads 0..11 in two other batches.
    successor = ArchiveSink(config)
    await successor.start()
    await successor.deliver_batch(batch[:5], Source("in", 0, list(range(5))))
    await successor.deliver_batch(batch[5:], Source("in", 0, list(range(5, 12))))
    got = Counter(e.event_id for e in await archived(config))
    assert got == Counter({f"e{i}": 1 for i in range(12)}), got
    assert successor.events_skipped == 8
    # partitioned by tenant and hour
    keys = sorted(m["path"] for m in await obstore.list(make_store(config)).collect_async() if parse_key(m["path"]))
    assert keys[0].startswith("tenant=acme/dt=2026-11-30/hour=07/in-0-"), keys
    assert any(k.startswith("tenant=globex/dt=2026-11-30/hour=08/") for k in keys), keys


async def test_archive_bad_credentials_page_as_misconfigured(s3_server, bucket, monkeypatch):
    from shared.errors import SinkMisconfigured

    monkeypatch.setenv("HIFI_ARCHIVE_SECRET_ACCESS_KEY", "wrong")
    sink = ArchiveSink(archive_config(s3_server, bucket))
    await sink.start()
    with pytest.raises(SinkMisconfigured):
        await sink.deliver_batch(make_events(1, 1.0), Source("in", 0, [0]))


# -- on the real pipeline ------------------------------------------------------------------------------------


def write_config(
    path: Path, s3: LocalS3, bucket: str, files: dict[str, Path], subscribed: list[str], batching: str = "batch_max: 25"
) -> None:
    sinks = "".join(f'  {name}: {{type: file, path: "{d}"}}\n' for name, d in files.items())
    path.write_text(
        "tenants:\n"
        + tenant_block("acme", "key-acme", subscribed)
        + "sinks:\n"
        + sinks
        + f'  archive: {{type: s3_archive, bucket: "{bucket}", endpoint: "{s3.endpoint}", {batching}}}\n'
        + "audit: {bucket_s: 1, settle_s: 3, canary_interval_s: 1, dlq_check_s: 1}\n"
    )


async def send(pipeline: Any, factory: EventFactory, n: int, pause_s: float = 0.0) -> list[str]:
    ids: list[str] = []
    for _ in range(n // 20):
        batch = [factory.make() for _ in range(20)]
        status, _ = await post(pipeline.collector_url, "key-acme", batch)
        assert status == 200
        ids += [e["event_id"] for e in batch]
        await asyncio.sleep(pause_s)
    return ids


def customer_ids(directory: Path) -> Counter[str]:
    return Counter(r["event_id"] for r in read_file_sink(directory) if not r.get("canary"))


async def test_archive_sender_killed_after_put_before_commit_restarts_without_duplicates(
    tmp_path, s3_server, bucket, settings_for, start_pipeline
):
    config_path = tmp_path / "hifi.yaml"
    files = {"files": tmp_path / "files"}
    write_config(config_path, s3_server, bucket, files, ["files"])
    pipeline = await start_pipeline(settings_for(config_path))
    archive = archive_config(s3_server, bucket)
    # The archive's sender, restarted with the hook: it exits (as kill -9) right after its 3rd PUT.
    await asyncio.to_thread(pipeline.stop, "sender.archive")
    pipeline.services["sender.archive"].env = {"HIFI_TEST_ARCHIVE_CRASH_AFTER_PUTS": "3"}
    pipeline.start("sender.archive")
    ids = await send(pipeline, EventFactory(producer_id=f"{bucket}-a"), 200)
    process = pipeline.services["sender.archive"].process
    await wait_for(lambda: process.poll() is not None, 90, "the archive sender's crash", pipeline)
    assert process.returncode == 137, pipeline.tail("sender.archive")
    pipeline.services["sender.archive"].env = {}
    pipeline.start("sender.archive")

    async def all_archived() -> bool:
        return len(await archived(archive)) >= len(ids)

    await wait_for(all_archived, 90, "every event archived", pipeline)
    await wait_for(lambda: len(customer_ids(files["files"])) >= len(ids), 30, "the file sink", pipeline)
    await asyncio.sleep(2)  # a duplicate from the re-read batch would land right behind
    got = Counter(e.event_id for e in await archived(archive))
    assert got == Counter(dict.fromkeys(ids, 1)), {k: v for k, v in got.items() if v != 1}


def metric(pipeline: Any, label: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(pipeline.services[label].url("/metrics"), timeout=5) as resp:
        text = resp.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(part in line for part in want.split(",")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def audit(pipeline: Any) -> dict[str, Any]:
    with urllib.request.urlopen(pipeline.services["auditor"].url("/audit"), timeout=5) as resp:
        return json.loads(resp.read())


def hifi_replay(settings: Any, *args: str) -> str:
    env = {**os.environ, **settings.as_env()}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "replay", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_replay_reaches_a_sink_added_later_once_skips_a_sink_that_has_them_and_force_resends(
    tmp_path, s3_server, bucket, settings_for, start_pipeline
):
    config_path = tmp_path / "hifi.yaml"
    files = {"old": tmp_path / "old"}
    # The archive's sender fetches on for 4 s while its batch is short: five posts 0.5 s apart make one or two
    # batches, so at most two objects per source partition (4), not one per post and partition (15 measured).
    write_config(config_path, s3_server, bucket, files, ["old"], "batch_max: 5000, linger_s: 4")
    settings = settings_for(config_path)
    since = datetime.now(UTC) - timedelta(minutes=1)
    pipeline = await start_pipeline(settings)
    ids = await send(pipeline, EventFactory(producer_id=f"{bucket}-r"), 100, pause_s=0.5)
    archive = archive_config(s3_server, bucket)

    async def all_archived() -> bool:
        return len({e.event_id for e in await archived(archive)} & set(ids)) == len(ids)

    await wait_for(all_archived, 90, "every event archived", pipeline)
    objects = [m for m in await obstore.list(make_store(archive)).collect_async() if parse_key(m["path"])]
    assert len(objects) <= 2 * settings.partitions, [m["path"] for m in objects]
    await wait_for(lambda: len(customer_ids(files["old"])) >= len(ids), 30, "the old sink", pipeline)
    await asyncio.to_thread(pipeline.stop_all)

    # A sink added afterwards for the tenant: its past events reach it only by a replay.
    files["new"] = tmp_path / "new"
    write_config(config_path, s3_server, bucket, files, ["old", "new"])
    pipeline = await start_pipeline(settings, auditor=True)
    until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    out = hifi_replay(settings, "--tenant", "acme", "--since", since.isoformat(), "--until", until, "--to-sink", "new")
    assert f"replayed {len(ids)} events" in out, out
    await wait_for(lambda: len(customer_ids(files["new"])) >= len(ids), 60, "the new sink", pipeline)
    await wait_for(
        lambda: metric(pipeline, "sender.new", "hifi_replayed_events_total", outcome="replayed") >= len(ids), 20
    )
    # replayed again: the ledger already has every event
    hifi_replay(settings, "--tenant", "acme", "--since", since.isoformat(), "--until", until, "--to-sink", "new")
    hifi_replay(settings, "--tenant", "acme", "--since", since.isoformat(), "--until", until, "--to-sink", "old")
    for label in ("sender.new", "sender.old"):
        await wait_for(
            lambda label=label: (
                metric(pipeline, label, "hifi_replayed_events_total", outcome="replay_skipped") >= len(ids)
            ),
            60,
            f"{label} skipping the replay",
        )
    assert customer_ids(files["new"]) == Counter(dict.fromkeys(ids, 1))
    assert customer_ids(files["old"]) == Counter(dict.fromkeys(ids, 1))
    # --force: sent again, whatever the ledger says
    hifi_replay(
        settings, "--tenant", "acme", "--since", since.isoformat(), "--until", until, "--to-sink", "old", "--force"
    )
    await wait_for(
        lambda: (
            len(customer_ids(files["old"]).keys()) == len(ids)
            and sum(customer_ids(files["old"]).values()) >= 2 * len(ids)
        ),
        60,
        "the forced replay",
        pipeline,
    )
    assert customer_ids(files["old"]) == Counter(dict.fromkeys(ids, 2))
    # The replays are no live traffic: the auditor's loss ledger settles without loss (or surplus).
    settled = audit(pipeline)["buckets_settled"]
    await wait_for(lambda: audit(pipeline)["buckets_settled"] >= settled + 3, 30, "settled buckets", pipeline)
    summary = audit(pipeline)
    # Known gap (not the replays'): the auditor applies today's subscriptions to the buckets before `new` was
    # added, where the router never routed to it, so those events read as lost at sender.new; nothing else may.
    assert summary["lost_by_stage"] in ({}, {"sender.new": len(ids)}), summary["lost_by_stage"]
    assert not summary["surplus"], summary["surplus"]


def test_ledger_keeps_replayed_events_out_of_the_live_reconciliation():
    """Replays in a sender's input neither count as deliveries nor hide the events its live input lost."""
    from services.auditor.ledger import LossLedger

    def tally(stage: str, first: int, runs: list[list[Any]]) -> dict[str, Any]:
        return {"stage": stage, "topic": f"in.{stage}", "partition": 0, "first": first, "runs": runs}

    ledger = LossLedger(lambda tenant: ("hook",), bucket_s=10, settle_s=30)
    ledger.add_tally({"stage": "collector", "runs": [["acme", 0, "accepted", 10]]})
    for stage in ("enricher", "deduplicator", "router"):
        ledger.add_tally(tally(stage, 0, [["acme", 0, "out", 10]]))
    # the sender's live input lost 2; 5 replayed events (3 new to the sink, 2 it had) came after them
    ledger.add_tally(
        tally(
            "sender.hook",
            0,
            [["acme", 0, "delivered", 8], ["acme", 0, "replayed", 3], ["acme", 0, "replay_skipped", 2]],
        )
    )
    (report,) = ledger.reconcile("acme", 0)
    assert (report.lost, report.stage, report.detail) == (2, "sender.hook", "router passed on 10, sender.hook read 8")
    assert ledger.totals["sender.hook"]["replayed"] == 3
    assert not ledger.surplus


async def test_replay_refuses_what_it_cannot_do(tmp_path, s3_server, bucket, settings_for):
    from shared.config import HifiConfig
    from shared.replay import ReplayError, parse_time, replay

    config_path = tmp_path / "hifi.yaml"
    write_config(config_path, s3_server, bucket, {"files": tmp_path / "files"}, ["files"])
    config, settings = HifiConfig.load(config_path), settings_for(config_path)
    assert config.subscribers("acme") == ("files", "archive")  # every tenant's events reach the archive
    since, until = parse_time("2026-11-30T07:00"), parse_time("1796025600")
    assert since == datetime(2026, 11, 30, 7, tzinfo=UTC) and until == since + timedelta(hours=1)
    for sink, start, end, reason in [
        ("nope", since, until, "unknown sink"),
        ("archive", since, until, "the archive itself"),
        ("files", until, since, "empty range"),
    ]:
        with pytest.raises(ReplayError, match=reason):
            await replay(settings, config, "acme", start, end, sink)
    with pytest.raises(ReplayError, match="not a time"):
        parse_time("yesterday")
