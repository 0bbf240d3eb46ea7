"""`hifi trace` and the dashboard's search on the real pipeline: a delivered event shows every stage and
each sink's ack, a copy shows it was dropped as a duplicate of the first copy's message, a refused
event shows its dead letter; the auditor's ledger counts none of them lost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from selenium.webdriver.common.by import By

from shared.audit import accepted_tally, receipt
from shared.codec import unpack
from shared.redis_window import RedisKeyWindow
from shared.topics import Topics
from shared.trace import TraceIndex
from shared.trace_render import render
from tests.helpers import post, tenant_block, wait_for
from tests.test_dashboard import chromium

TOKEN = "trace-read-token-4417"
HIFI = str(Path(sys.executable).parent / "hifi")


def trace_api(pipeline: Any, event_id: str, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(pipeline.services["auditor"].url(f"/trace/{event_id}"))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def run_hifi(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HIFI, *args], env=env, capture_output=True, text=True, timeout=30)


def audit_summary(pipeline: Any) -> dict[str, Any]:
    request = urllib.request.Request(pipeline.services["auditor"].url("/audit"))
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


async def read_message(bootstrap: str, source: str) -> dict[str, Any]:
    """The event at `topic:partition:offset`."""
    topic, partition, offset = source.rsplit(":", 2)
    tp = TopicPartition(topic, int(partition))
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, int(offset))
        records = (await consumer.getmany(tp, timeout_ms=5000, max_records=1)).get(tp, [])
        assert records and records[0].offset == int(offset), source
        return unpack(records[0].value)
    finally:
        await consumer.stop()


def event(event_id: str, device: str) -> dict[str, Any]:
    return {"event_id": event_id, "type": "play", "ts": time.time() * 1000, "device_id": device}


async def test_trace_delivered_duplicate_and_dead_lettered(
    tmp_path, namespace, port_base, settings_for, start_pipeline
):
    from devtools.webhook import WebhookReceiver

    hook = WebhookReceiver(port=port_base + 18, reject_event=lambda event_id: event_id.startswith("refused-"))
    await hook.start()
    files = tmp_path / "files"
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", "k", ["hook", "files"])
        + "sinks:\n"
        + f'  hook: {{type: webhook, url: "http://127.0.0.1:{hook.port}/in", max_attempts_per_event: 2}}\n'
        + f'  files: {{type: file, path: "{files}"}}\n'
        + "audit: {bucket_s: 2, settle_s: 4, canary_interval_s: 0}\n"
    )
    settings = settings_for(config, read_token=TOKEN)
    pipeline = await start_pipeline(settings, auditor=True)
    index = TraceIndex(settings.trace_index_url, namespace)
    try:
        assert (await post(pipeline.collector_url, "k", [event("ok-1", "d1"), event("copy-1", "d2")]))[0] == 200
        await wait_for(lambda: len(hook.received) >= 2, 60, "first delivery", pipeline)
        # The same event again (an SDK retry): the deduplicator drops it; and one the webhook refuses.
        assert (await post(pipeline.collector_url, "k", [event("copy-1", "d2"), event("refused-1", "d3")]))[0] == 200

        async def traced(event_id: str, *facts: str) -> dict[str, Any]:
            found: dict[str, Any] = {}

            async def has_all() -> bool:
                nonlocal found
                found = (await index.lookup(event_id))["tenants"].get("acme", {})
                return all(_has(found, fact) for fact in facts)

            deadline = time.monotonic() + 60
            while not await has_all():
                assert time.monotonic() < deadline, (
                    event_id,
                    facts,
                    found,
                    audit_summary(pipeline),
                    pipeline.tail("auditor"),
                )
                await asyncio.sleep(0.2)
            return found

        # Tallies and receipts are two topics the auditor reads side by side: wait for every fact asserted.
        delivered = await traced("ok-1", "accepted", "sink:hook", "sink:files")
        assert list(delivered["stages"]) == ["collector", "enricher", "deduplicator", "router"]
        times = list(delivered["stages"].values())
        assert times == sorted(times) and 0 <= times[0] - delivered["accepted"]["ingest_ts"] < 1000
        assert delivered["accepted"]["topic"] == Topics(namespace).raw
        for sink in ("hook", "files"):
            ack = delivered["sinks"][sink]
            assert ack["status"] == "delivered" and ack["attempts"] >= 1, ack
            assert ack["acked_ts"] >= times[-1]
            assert ack["idempotency_key"] == f"{sink}:acme:ok-1"
        assert delivered["dropped"] == []

        copy = await traced("copy-1", "sink:hook", "dropped:dup")
        (dropped,) = copy["dropped"]
        assert dropped["stage"] == "deduplicator" and dropped["outcome"] == "dup"
        first = await read_message(settings.broker, dropped["first_copy"])  # the message holding the claim
        assert first["event_id"] == "copy-1" and first["stages"]["collector"] == copy["stages"]["collector"]
        assert dropped["ingest_ts"] > first["ingest_ts"]  # the dropped copy is the later one
        assert dropped["source"] != dropped["first_copy"]
        assert [e["event_id"] for e in hook.received].count("copy-1") == 1
        # Its path is the first copy's, timed from the first acceptance; the later copy is counted.
        assert copy["accepted"]["copies"] == 2
        assert 0 <= copy["stages"]["collector"] - copy["accepted"]["ingest_ts"] < 1000

        refused = await traced("refused-1", "sink:hook", "sink:files")
        assert refused["sinks"]["files"]["status"] == "delivered"
        letter = refused["sinks"]["hook"]
        assert letter["status"] == "dead_lettered" and letter["stage"] == "sender.hook", letter
        assert "400" in letter["error"] and letter["reason"], letter

        # From the command line, human-readable and as JSON; and its answer time for a recent event.
        env = {**os.environ, **settings.as_env()}
        shown = await asyncio.to_thread(run_hifi, env, "trace", "refused-1", "--tenant", "acme")
        assert shown.returncode == 0, shown.stderr
        assert "dead-lettered" in shown.stdout and "sender.hook" in shown.stdout and "delivered" in shown.stdout
        as_json = await asyncio.to_thread(run_hifi, env, "trace", "copy-1", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["tenants"]["acme"]["dropped"][0]["first_copy"] == dropped["first_copy"]
        missing = await asyncio.to_thread(run_hifi, env, "trace", "never-sent")
        assert missing.returncode == 1 and "not found" in missing.stdout

        started = time.perf_counter()
        answer = await index.lookup("ok-1", tenant="acme")
        took_ms = (time.perf_counter() - started) * 1000
        print(f"\ntrace of an event from the last hour: {took_ms:.1f} ms\n{render(answer)}")
        print(shown.stdout, render(await index.lookup("copy-1")), sep="\n")

        # The auditor's endpoint is token-protected like /audit and gives the same path.
        assert trace_api(pipeline, "ok-1", token=None)[0] == 401
        status, body = trace_api(pipeline, "ok-1")
        assert status == 200 and body["tenants"]["acme"]["sinks"] == delivered["sinks"]

        # Nothing of this is loss: the dropped copy and the dead letter are accounted for.
        def settled() -> bool:
            totals = audit_summary(pipeline)["stage_totals"]
            return totals.get("sender.hook", {}).get("dlq") == 1 and totals.get("deduplicator", {}).get("dup") == 1

        await wait_for(settled, 30, "tallies", pipeline)
        await asyncio.sleep(settings_s := 7)  # past bucket_s + settle_s: every bucket reconciled
        summary = audit_summary(pipeline)
        assert summary["loss"] == [] and summary["lost_by_stage"] == {}, (settings_s, summary["loss"])

        await search_in_dashboard(pipeline, "copy-1", "refused-1")
    finally:
        await index.close()
        await hook.stop()


def _has(found: dict[str, Any], fact: str) -> bool:
    kind, _, name = fact.partition(":")
    if kind == "accepted":  # the collector's own fact (its tally), not the stand-in a collector stamp gives
        return "topic" in (found.get("accepted") or {})
    if kind == "sink":
        return name in found.get("sinks", {})
    return any(d["outcome"] == name for d in found.get("dropped", []))


async def search_in_dashboard(pipeline: Any, duplicate: str, refused: str) -> None:
    """The dashboard's search box asks /trace with the session's token and draws the same path."""
    browser = await asyncio.to_thread(chromium)
    try:
        url = pipeline.services["auditor"].url("/dashboard")
        await asyncio.to_thread(browser.get, pipeline.services["auditor"].url("/health"))  # same origin, no prompt
        browser.execute_script("sessionStorage.setItem('hifiToken', arguments[0])", TOKEN)
        await asyncio.to_thread(browser.get, url)
        for event_id in (duplicate, refused):
            box = browser.find_element(By.ID, "trace-id")
            box.clear()
            box.send_keys(event_id)
            browser.find_element(By.ID, "trace-go").click()
            deadline = time.monotonic() + 20
            while browser.execute_script("return document.body.dataset.traced") != event_id:
                assert time.monotonic() < deadline, browser.page_source[:3000]
                await asyncio.sleep(0.2)
            _, api = await asyncio.to_thread(trace_api, pipeline, event_id)
            rendered = browser.execute_script("return window.lastTrace")
            assert rendered["tenants"] == api["tenants"]
            rows = browser.find_elements(By.CSS_SELECTOR, "#trace tr[data-step]")
            steps = {row.get_attribute("data-step"): row.text for row in rows}
            for stage in ("collector", "enricher", "deduplicator", "router"):
                assert f"acme/{stage}" in steps, steps
            assert "delivered" in steps["acme/sink/files"]
            if event_id == duplicate:
                assert "delivered" in steps["acme/sink/hook"]
                drop = steps["acme/dropped/deduplicator/dup"]
                assert "duplicate" in drop and api["tenants"]["acme"]["dropped"][0]["first_copy"] in drop
            else:
                assert "dead-lettered" in steps["acme/sink/hook"] and "400" in steps["acme/sink/hook"]
    finally:
        await asyncio.to_thread(browser.quit)


async def test_trace_index_reads_back_what_tallies_and_receipts_say(redis_server, namespace):
    """Facts in the formats the stages write; a stage's new outcome shows by its name until OUTCOMES names it."""
    index = TraceIndex(redis_server.url, namespace, ttl_s=120)
    try:
        index.add_tally(
            unpack(
                accepted_tally(
                    "collector", "acme", 0, 1, {"topic": "raw", "ingest_ts": 1000.0, "events": [["e1", 2, 7]]}
                )
            )
        )
        stages = {"router": 1030.0, "collector": 1001.0, "enricher": 1010.0, "deduplicator": 1020.0}
        index.add_receipt(
            unpack(receipt("hook", 1100.0, [["e1", "acme", 1000.0, 2, False]], [["hook:acme:e1", stages, "s:1:4"]]))
        )
        tally = {"stage": "filter", "topic": "unique", "partition": 1, "first": 9, "runs": [], "at": 1050.0}
        index.add_tally({**tally, "events": [[9, "e1", "filtered", "acme", {"rule": "no-bots"}]]})
        assert await index.write_pending() == 1
        found = await index.lookup("e1")
        path = found["tenants"]["acme"]
        assert path["accepted"] == {"ingest_ts": 1000.0, "topic": "raw", "partition": 2, "offset": 7, "copies": 1}
        assert list(path["stages"]) == ["collector", "enricher", "deduplicator", "router"]  # pipeline order
        assert path["sinks"]["hook"] == {
            "status": "delivered",
            "acked_ts": 1100.0,
            "attempts": 2,
            "idempotency_key": "hook:acme:e1",
            "source": "s:1:4",
            "deliveries": 1,
        }
        (step,) = path["dropped"]
        assert step["text"] == "filtered" and step["rule"] == "no-bots" and step["source"] == "unique:1:9"
        assert "filtered" in render(found) and "attempts 2" in render(found)
        assert (await index.lookup("e1", tenant="globex"))["found"] is False
        assert 0 < await index.client.pttl(index.key("e1")) <= 120_000
        print(f"\ntrace index: {await index.client.memory_usage(index.key('e1'))} bytes for an event with 3 facts")
    finally:
        await index.close()


async def test_trace_index_keeps_facts_while_redis_is_away(redis_server, namespace):
    """A Redis outage neither stalls the auditor (it backs off) nor loses the facts it buffered (bounded)."""
    index = TraceIndex("redis://127.0.0.1:1/0", namespace, ttl_s=60, max_pending=2)
    try:
        for event_id in ("a", "b", "c"):
            index.add_receipt(unpack(receipt("hook", 5.0, [[event_id, "acme", 1.0, 1, False]], [["k", {}, "s:0:0"]])))
        assert index.dropped == 1 and len(index.pending) == 2  # bounded: the third event's one fact
        assert await index.write_pending() == 0 and len(index.pending) == 2 and index.retry_at > time.monotonic() - 1
        assert await index.write_pending() == 0  # backing off: no second wait on a dead Redis
        await index.client.aclose()
        index.client = aioredis.from_url(redis_server.url)
        index.retry_at = 0.0
        assert await index.write_pending() == 2 and (await index.lookup("a"))["found"]
    finally:
        await index.close()


async def test_redis_window_names_the_claim_holder_without_another_round_trip(redis_server, namespace):
    window = RedisKeyWindow(redis_server.url, f"hifi:{namespace}:trace-test:", 60)
    try:
        assert await window.claim(["acme:e1"], ["enriched:0:5"], [None]) == [True]
        assert await window.claim(["acme:e1"], ["enriched:0:9"], [None]) == [False]
        await window.client.aclose()  # what claim saw is enough: no connection needed
        window.client = aioredis.from_url("redis://127.0.0.1:1/0")
        assert await window.holders(["acme:e1"], [None]) == ["enriched:0:5"]
        window.client = aioredis.from_url(redis_server.url)
        window._holders = {}
        assert await window.holders(["acme:e1", "acme:e2"], [None, None]) == ["enriched:0:5", None]  # asked
    finally:
        await window.close()
