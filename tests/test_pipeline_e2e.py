"""End to end on the real broker and Redis: several tenants and sinks, client retries, malformed events."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import msgpack
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from devtools.traffic import EventFactory
from devtools.webhook import WebhookReceiver
from tests.helpers import (
    post,
    read_file_sink,
    read_kafka_topic,
    read_redis_stream,
    tenant_block,
    wait_for,
)

IPHONE_UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1"


def make_geo_db(path: Path) -> None:
    writer = MMDBWriter(ip_version=4, database_type="GeoLite2-City")
    writer.insert_network(
        IPSet(["10.0.0.0/8"]), {"country": {"iso_code": "NL"}, "city": {"names": {"en": "Amsterdam"}}}
    )
    writer.insert_network(IPSet(["192.0.2.0/24"]), {"country": {"iso_code": "US"}})
    writer.to_db_file(str(path))


async def test_every_valid_event_arrives_exactly_once_at_each_subscribed_sink(
    tmp_path, namespace, port_base, settings_for, start_pipeline, redis_client, kafka
):
    hook = WebhookReceiver(port=port_base + 19)
    spare = WebhookReceiver(port=port_base + 18)
    await hook.start()
    await spare.start()
    geo_db = tmp_path / "geo.mmdb"
    make_geo_db(geo_db)
    files_dir = tmp_path / "files"
    stream = f"{namespace}:events"
    mirror_topic = f"{namespace}.mirror"
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n"
        + tenant_block("acme", "key-acme", ["hook", "files", "stream", "mirror"], {"plan": "gold"})
        + tenant_block("globex", "key-globex", ["hook", "files"])
        + tenant_block("initech", "key-initech", [])
        + f"""sinks:
  hook: {{type: webhook, url: "http://127.0.0.1:{hook.port}/in"}}
  spare: {{type: webhook, url: "http://127.0.0.1:{spare.port}/in"}}
  files: {{type: file, path: "{files_dir}", rotate_bytes: 20000}}
  stream: {{type: redis_stream, stream: "{stream}"}}
  mirror: {{type: kafka, topic: "{mirror_topic}"}}
enrich:
  geoip_db: "{geo_db}"
"""
    )
    pipeline = await start_pipeline(settings_for(config))
    url = pipeline.collector_url
    try:
        sent: dict[str, list[dict]] = {"acme": [], "globex": [], "initech": []}
        keys = {"acme": "key-acme", "globex": "key-globex", "initech": "key-initech"}
        factories = {t: EventFactory(producer_id=f"{namespace}-{t}") for t in sent}
        rejected_reasons: Counter[str] = Counter()
        for round_ in range(10):
            for tenant in sent:
                batch = [factories[tenant].make() for _ in range(20)]
                batch[0]["context"] = {"user_agent": IPHONE_UA, "ip": "10.1.2.3"}
                batch[1]["context"] = {"ip": "not-an-ip"}  # enrichment fails; the event must still arrive
                malformed = [
                    {"type": "play", "ts": 1},  # no event_id
                    {"event_id": f"bad-{round_}-ts", "type": "play", "ts": "yesterday"},
                    {"event_id": f"bad-{round_}-payload", "type": "play", "ts": 1, "payload": [1, 2]},
                    {"event_id": f"bad-{round_}-long", "type": "play", "ts": 1, "payload": {"x": "y" * 9000}},
                    "just a string",
                ]
                status, body = await post(url, keys[tenant], batch + malformed)
                assert status == 200, body
                assert body["accepted"] == [e["event_id"] for e in batch]
                assert [r["index"] for r in body["rejected"]] == list(range(20, 25))
                rejected_reasons.update(r["reason"] for r in body["rejected"])
                sent[tenant].extend(batch)
                if round_ % 3 == 0:  # a client retry of the same batch: duplicates the pipeline must drop
                    status, body = await post(url, keys[tenant], batch)
                    assert status == 200 and len(body["accepted"]) == 20
        assert rejected_reasons == {"missing_field": 30, "wrong_type": 60, "string_too_long": 30, "not_an_object": 30}

        # msgpack can carry NaN: only that event is rejected, its batch-mates are accepted.
        batch = [factories["globex"].make() for _ in range(3)]
        nan_event = {"event_id": "nan-1", "type": "play", "ts": 1, "payload": {"x": math.nan}}
        status, body = await post(url, "key-globex", msgpack.packb([*batch, nan_event]), "application/msgpack")
        assert status == 200 and body["accepted"] == [e["event_id"] for e in batch]
        assert body["rejected"] == [
            {"index": 3, "event_id": "nan-1", "reason": "wrong_type", "detail": "NaN and Infinity are not allowed"}
        ]
        sent["globex"].extend(batch)

        # Requests that are refused as a whole.
        assert (await post(url, "wrong-key", [factories["acme"].make()]))[0] == 401
        assert (await post(url, "key-acme", b"{not json"))[0] == 400
        assert (await post(url, "key-acme", b'[{"event_id": "n", "type": "t", "ts": NaN}]'))[0] == 400
        assert (await post(url, "key-acme", b"<xml/>", "application/xml"))[0] == 415
        assert (await post(url, "key-acme", [{"type": "x"}]))[0] == 422

        want = {
            "hook": {f"hook:{t}:{e['event_id']}" for t in ("acme", "globex") for e in sent[t]},
            "files": {f"files:{t}:{e['event_id']}" for t in ("acme", "globex") for e in sent[t]},
            "stream": {f"stream:acme:{e['event_id']}" for e in sent["acme"]},
            "mirror": {f"mirror:acme:{e['event_id']}" for e in sent["acme"]},
        }
        await wait_for(lambda: len(hook.received) >= len(want["hook"]), 90, "the webhook sink")
        await wait_for(lambda: len(read_file_sink(files_dir)) >= len(want["files"]), 60, "the file sink")

        async def stream_done() -> bool:
            return len(await read_redis_stream(redis_client, stream)) >= len(want["stream"])

        await wait_for(stream_done, 60, "the redis stream sink")
        mirrored = await read_kafka_topic(kafka.bootstrap, mirror_topic, len(want["mirror"]), timeout=60)

        got = {
            "hook": hook.received,
            "files": read_file_sink(files_dir),
            "stream": await read_redis_stream(redis_client, stream),
            "mirror": mirrored,
        }
        for sink, records in got.items():
            counts = Counter(r["idempotency_key"] for r in records)
            assert set(counts) == want[sink], f"{sink}: missing {len(want[sink] - set(counts))}"
            dupes = {k: n for k, n in counts.items() if n > 1}
            assert not dupes, f"{sink} got duplicates: {list(dupes)[:5]}"
        assert spare.received == [] and spare.requests == 0
        assert all(r["tenant"] != "initech" for recs in got.values() for r in recs)
        assert len(list(files_dir.glob("events-*.jsonl"))) >= 1, "the file sink should have rotated"

        # Enriched on the way: user agent, geo by IP (from the generated MaxMind db), tenant metadata.
        by_id = {r["event_id"]: r for r in got["hook"]}
        first_acme = by_id[sent["acme"][0]["event_id"]]
        assert first_acme["enrichment"]["ua"]["os"] == "iOS"
        assert first_acme["enrichment"]["geo"] == {"country": "NL", "city": "Amsterdam"}
        assert first_acme["enrichment"]["tenant"] == {"plan": "gold"}
        bad_ip = by_id[sent["acme"][1]["event_id"]]
        assert bad_ip["enrichment"]["errors"][0].startswith("geo: ValueError")
        assert set(first_acme["stages"]) == {"collector", "enricher", "deduplicator", "router"}
        assert first_acme["payload"] == sent["acme"][0]["payload"]
        # Per device, order is kept end to end (one key -> one partition at every stage).
        for device in {e["device_id"] for e in sent["acme"]}:
            seqs = [r["payload"]["seq"] for r in got["mirror"] if r["device_id"] == device]
            assert seqs == sorted(seqs), f"device {device} out of order: {seqs}"
    finally:
        await hook.stop()
        await spare.stop()
