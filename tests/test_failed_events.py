"""Schemas on the real pipeline: a schema rolled out, good events delivered, bad ones quarantined with
their pointers (never lost to the ledger), a warn tenant's delivered flagged; the schema fixed, the
failed events replayed arrive once; a second replay re-submits nothing, and one `--from-start` is dropped by
the deduplicator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from shared.quarantine import FailedEvents
from shared.topics import Topics
from tests.helpers import post, tenant_block, wait_for, write_webhook_config

TOKEN = "read-token-failed-view-4411"
SECRET_TITLE = "t-secret-title-990"

PLAY = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["payload"],
    "properties": {
        "payload": {
            "type": "object",
            "required": ["title_id"],
            "properties": {"title_id": {"type": "string", "pattern": "^t-"}, "position_s": {"minimum": 0}},
        }
    },
}


def write_config(path: Path, hook_port: int, play: dict[str, Any], pause: bool) -> None:
    types = {"play": play, **({"pause": {"type": "object"}} if pause else {})}
    tenants = (
        tenant_block("acme", "key-acme", ["hook"])
        + f"    schemas: {json.dumps({'mode': 'enforce', 'unknown_types': 'quarantine', 'types': types})}\n"
        + tenant_block("globex", "key-globex", ["hook"])
        + f"    schemas: {json.dumps({'mode': 'warn', 'types': {'play': play}})}\n"
    )
    audit = "audit: {bucket_s: 2, settle_s: 4, canary_interval_s: 1, dlq_check_s: 1}\n"
    write_webhook_config(path, hook_port, tenants=tenants, sections=audit)


def get_json(url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


async def auditor_metrics_show_quarantined(url: str) -> None:
    async def settled() -> bool:  # the auditor's gauges follow its ledger on its next settle pass
        text = await asyncio.to_thread(metrics_text, url)
        return metric(text, "hifi_audit_quarantined_events", tenant="acme", type="play") == 8

    await wait_for(settled, 10, "the auditor's quarantine gauges")
    text = await asyncio.to_thread(metrics_text, url)
    by_rule = "hifi_audit_quarantined_by_rule"
    assert metric(text, by_rule, tenant="acme", type="play", rule="pattern") == 4
    assert metric(text, by_rule, tenant="acme", type="play", rule="minimum") == 8
    assert metric(text, by_rule, tenant="acme", type="(unknown)", rule="unknown_type") == 2
    assert metric(text, "hifi_audit_quarantined_events", tenant="acme", type="(unknown)") == 2


def hifi_failed(settings_env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "failed", *args],
        env={**os.environ, **settings_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_schema_quarantines_violations_and_a_replay_after_the_fix_delivers_them_once(
    tmp_path, namespace, port_base, settings_for, start_pipeline, kafka
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    config = tmp_path / "hifi.yaml"
    write_config(config, hook.port, PLAY, pause=False)
    settings = settings_for(config, read_token=TOKEN, redact_fields="title_id")
    pipeline = await start_pipeline(settings, auditor=True)
    auditor = pipeline.services["auditor"]
    dedupe = pipeline.services["deduplicator"]
    try:
        acme, globex = EventFactory(producer_id=f"{namespace}-a"), EventFactory(producer_id=f"{namespace}-g")
        good = [dict(acme.make(), type="play") for _ in range(30)]
        for e in good:
            e["payload"]["title_id"] = "t-1"
        bad = [dict(acme.make(), type="play") for _ in range(8)]
        for i, e in enumerate(bad):
            e["payload"]["title_id"] = SECRET_TITLE.replace("t-", "x-") if i % 2 else "t-2"
            e["payload"]["position_s"] = -1
        unknown = [dict(acme.make(), type="pause") for _ in range(2)]
        for e in unknown:
            e["payload"]["title_id"] = "t-3"
        warned = [dict(globex.make(), type="play") for _ in range(5)]  # no title_id: delivered in warn mode, flagged
        assert (await post(pipeline.collector_url, "key-acme", good[:15] + bad + unknown + good[15:]))[0] == 200
        assert (await post(pipeline.collector_url, "key-globex", warned))[0] == 200
        # an SDK re-send of a bad event: the copy is a duplicate, not a second quarantine
        assert (await post(pipeline.collector_url, "key-acme", bad[:1]))[0] == 200

        real = lambda: [e for e in hook.received if not e.get("canary")]  # noqa: E731
        await wait_for(lambda: len(real()) >= 35, 120, "good and warned events", pipeline)
        failed = FailedEvents(kafka.bootstrap, Topics(namespace), ["acme", "globex"])
        await wait_for(lambda: failed.read("acme"), 30, "quarantined events")
        await wait_for(lambda: len(hook.received) > 35 and any(e.get("canary") for e in hook.received), 30, "canary")
        records = await failed.read("acme")
        assert sorted(r["event_id"] for r in records) == sorted(e["event_id"] for e in bad + unknown)
        by_id = {r["event_id"]: r for r in records}
        first_bad = by_id[bad[1]["event_id"]]
        assert first_bad["event"]["payload"] == bad[1]["payload"]
        assert {(v["pointer"], v["rule"]) for v in first_bad["violations"]} == {
            ("/payload/position_s", "minimum"),
            ("/payload/title_id", "pattern"),
        }
        assert [(v["pointer"], v["rule"]) for v in by_id[bad[0]["event_id"]]["violations"]] == [
            ("/payload/position_s", "minimum")
        ]
        assert [v["rule"] for v in by_id[unknown[0]["event_id"]]["violations"]] == ["unknown_type"]
        assert all(r["received_ts"] <= r["quarantined_ts"] for r in records)
        delivered = Counter(e["event_id"] for e in real())
        assert set(delivered) == {e["event_id"] for e in good + warned} and set(delivered.values()) == {1}
        flagged = [e for e in real() if e["tenant"] == "globex"]
        assert all(e["schema_violations"][0]["rule"] == "required" for e in flagged)
        assert not any("schema_violations" in e for e in real() if e["tenant"] == "acme")

        # /metrics per tenant, type and rule; the web view needs the token and redacts
        text = await asyncio.to_thread(metrics_text, dedupe.url("/metrics"))
        assert metric(text, "hifi_events_quarantined_total", tenant="acme", type="play") == 8
        assert metric(text, "hifi_events_quarantined_total", tenant="acme", type="(unknown)") == 2
        labels = {"tenant": "acme", "type": "play", "mode": "enforce"}
        assert metric(text, "hifi_schema_violations_total", rule="pattern", **labels) == 4
        assert metric(text, "hifi_schema_violations_total", rule="minimum", **labels) == 8
        assert get_json(dedupe.url("/failed?tenant=acme"), token=None)[0] == 401
        assert get_json(dedupe.url("/failed?tenant=acme"), token="wrong")[0] == 401
        status, view = get_json(dedupe.url("/failed?tenant=acme&type=play"))
        assert status == 200 and view["counts"] == {"play": 8, "pause": 2} and len(view["failed"]) == 8
        assert SECRET_TITLE.replace("t-", "x-") not in json.dumps(view)
        assert {r["event"]["payload"]["title_id"] for r in view["failed"]} == {"[redacted]"}

        def settled() -> dict[str, Any]:
            return get_json(auditor.url("/audit"))[1]

        await wait_for(
            lambda: settled()["stage_totals"].get("deduplicator", {}).get("quarantined") == 10, 30, "tallies"
        )
        await wait_for(lambda: settled()["buckets_settled"] >= 3, 30, "settled buckets")
        summary = settled()
        assert summary["lost_by_stage"] == {} and summary["loss"] == [] and summary["overdue"] == [], summary
        # the auditor's count per type and rule: an event breaking two rules counts once under each
        assert summary["quarantined"] == {
            "acme": {
                "play": {"events": 8, "rules": {"minimum": 8, "pattern": 4}},
                "(unknown)": {"events": 2, "rules": {"unknown_type": 2}},
            }
        }, summary["quarantined"]
        await auditor_metrics_show_quarantined(auditor.url("/metrics"))
        # the same breakdown per event-time bucket, summed over the buckets
        per_type: Counter[str] = Counter()
        for by_type in summary["quarantined_by_bucket"]["acme"].values():
            per_type.update({event_type: counts["events"] for event_type, counts in by_type.items()})
        assert per_type == {"play": 8, "(unknown)": 2}, summary["quarantined_by_bucket"]

        # The fix: the pattern allows x- titles, negative positions are fine, pause has a schema.
        fixed = json.loads(json.dumps(PLAY))
        fixed["properties"]["payload"]["properties"] = {"title_id": {"type": "string", "pattern": "^[tx]-"}}
        write_config(config, hook.port, fixed, pause=True)
        assert pipeline.stop("deduplicator") == 0
        pipeline.start("deduplicator")
        await asyncio.to_thread(pipeline.wait_ready, 60.0, ["deduplicator"])

        env = settings.as_env()
        listed = await asyncio.to_thread(hifi_failed, env, "list", "--tenant", "acme")
        assert "10 failed events" in listed and "pause" in listed
        out = await asyncio.to_thread(hifi_failed, env, "replay", "--tenant", "acme", "--rate", "0")
        assert "replayed 10 failed events" in out
        await wait_for(lambda: len(real()) >= 45, 60, "the replayed events", pipeline)

        dups = {"stage": "deduplicator", "tenant": "acme"}
        text = await asyncio.to_thread(metrics_text, dedupe.url("/metrics"))
        before = metric(text, "hifi_events_deduplicated_total", **dups)
        # a second run resumes at its committed progress: nothing left; --from-start re-submits on purpose
        assert "replayed 0" in await asyncio.to_thread(hifi_failed, env, "replay", "--tenant", "acme", "--rate", "0")
        listed = await asyncio.to_thread(hifi_failed, env, "list", "--tenant", "acme")
        assert listed.count(" replayed") == 10 and " pending" not in listed, listed
        again = await asyncio.to_thread(hifi_failed, env, "replay", "--tenant", "acme", "--rate", "0", "--from-start")
        assert "replayed 10" in again

        async def second_replay_dropped() -> bool:
            text = await asyncio.to_thread(metrics_text, dedupe.url("/metrics"))
            return metric(text, "hifi_events_deduplicated_total", **dups) >= before + 10

        await wait_for(second_replay_dropped, 60, "the second replay reaching the deduplicator", pipeline)
        await asyncio.sleep(2.0)  # a copy would arrive right behind
        delivered = Counter(e["event_id"] for e in real())
        assert set(delivered) == {e["event_id"] for e in good + warned + bad + unknown}
        assert set(delivered.values()) == {1}, [k for k, n in delivered.items() if n > 1]
        assert len(await failed.read("acme")) == 10  # nothing was quarantined again

        mark = settled()["buckets_settled"]
        await wait_for(lambda: settled()["buckets_settled"] >= mark + 4, 40, "the replays' buckets settled")
        summary = settled()
        assert summary["lost_by_stage"] == {} and summary["loss"] == [] and summary["overdue"] == [], summary
    finally:
        await asyncio.to_thread(pipeline.stop_all)
        await hook.stop()
