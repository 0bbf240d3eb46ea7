"""The peer for `hifi bench --system quix`: the same pipeline written with Quix Streams.

Run by the bench in its own virtualenv (quixstreams pins versions Hifi's own dependencies conflict
with), so this file imports nothing from Hifi. Same topics and hops as Hifi after the collector:
raw -> enrich (ua-parser) -> dedupe by event_id (Quix state, RocksDB) -> route -> webhook sink, and
with FILE_PATH also -> a JSON-lines file sink (fsynced per batch, like Hifi's), stage `deliver-files`.
Quix sinks write at each checkpoint, so the commit interval is set low (0.1 s) in the peer's favour.

usage: python quix_peer.py STAGE NAMESPACE BOOTSTRAP SINK_URL STATE_DIR [FILE_PATH]
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import urllib.request
from functools import lru_cache
from typing import Any

import msgpack
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch
from ua_parser import parse as parse_user_agent


@lru_cache(maxsize=4096)
def ua_fields(ua: str) -> dict[str, Any]:
    r = parse_user_agent(ua)
    return {"browser": r.user_agent.family if r.user_agent else None, "os": r.os.family if r.os else None}


def enrich(value: bytes) -> bytes:
    event = msgpack.unpackb(value)
    ua = (event.get("context") or {}).get("user_agent")
    if ua:
        event.setdefault("enrichment", {})["ua"] = ua_fields(ua)
    event.setdefault("stages", {})["enricher"] = time.time() * 1000
    return msgpack.packb(event)


def dedupe(value: bytes, state: Any) -> bool:
    event = msgpack.unpackb(value)
    key = f"{event['tenant']}:{event['event_id']}"
    if state.get(key):
        return False
    state.set(key, 1)
    return True


def stamp(stage: str):
    def apply(value: bytes) -> bytes:
        event = msgpack.unpackb(value)
        event.setdefault("stages", {})[stage] = time.time() * 1000
        return msgpack.packb(event)

    return apply


class WebhookSink(BatchingSink):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def write(self, batch: SinkBatch) -> None:
        events = [msgpack.unpackb(item.value) for item in batch]
        body = json.dumps({"events": events}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()


class FileSink(BatchingSink):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, batch: SinkBatch) -> None:
        lines = "".join(json.dumps(msgpack.unpackb(item.value), separators=(",", ":")) + "\n" for item in batch)
        with open(self.path, "ab") as fh:
            fh.write(lines.encode())
            fh.flush()
            os.fsync(fh.fileno())


def main(stage: str, namespace: str, bootstrap: str, sink_url: str, state_dir: str, file_path: str = "") -> None:
    app = Application(
        broker_address=bootstrap,
        consumer_group=f"{namespace}-quix-{stage}",
        auto_offset_reset="earliest",
        commit_interval=0.1,
        state_dir=state_dir,
        processing_guarantee="at-least-once",
        producer_extra_config={"linger.ms": 2, "enable.idempotence": True},
        consumer_extra_config={"fetch.wait.max.ms": 10},
    )
    hops = {
        "enrich": ("hifi.raw", "hifi.enriched"),
        "dedupe": ("hifi.enriched", "hifi.unique"),
        "route": ("hifi.unique", "hifi.sink.hook"),
        "deliver": ("hifi.sink.hook", None),
        "deliver-files": ("hifi.sink.files", None),
    }
    source, target = hops[stage]
    topic = app.topic(f"{namespace}.{source}", value_deserializer="bytes", key_deserializer="bytes")
    sdf = app.dataframe(topic)
    if stage == "enrich":
        sdf = sdf.apply(enrich)
    elif stage == "dedupe":
        sdf = sdf.filter(dedupe, stateful=True).apply(stamp("deduplicator"))
    elif stage == "route":
        sdf = sdf.apply(stamp("router"))
        if file_path:  # every tenant is subscribed to both sinks
            sdf.to_topic(app.topic(f"{namespace}.hifi.sink.files", value_serializer="bytes", key_serializer="bytes"))
    if stage == "deliver-files":
        sdf.sink(FileSink(file_path))
    elif target is None:
        sdf.sink(WebhookSink(sink_url))
    else:
        sdf.to_topic(app.topic(f"{namespace}.{target}", value_serializer="bytes", key_serializer="bytes"))
    # The collector policy Hifi's services run under (shared/gc_policy.py; this virtualenv cannot import it).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, *gc.get_threshold()[1:])
    app.run()


if __name__ == "__main__":
    main(*sys.argv[1:7])
