"""Alerts page through Sentry: a real sentry-sdk sends to a local envelope endpoint; each outage
episode produces exactly one event with a stable fingerprint, and no secret or payload in it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import sentry_sdk

from shared.alerts import Alerter, OutageClock
from shared.sentry import init_sentry


class EnvelopeSink(BaseHTTPRequestHandler):
    events: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        lines = body.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                EnvelopeSink.events.append(json.loads(payload))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_an_outage_pages_once_per_episode_with_a_stable_fingerprint():
    server = HTTPServer(("127.0.0.1", 0), EnvelopeSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        init_sentry(f"http://publickey@127.0.0.1:{server.server_port}/1", "deduplicator", "test")
        clock = OutageClock(Alerter("deduplicator"), "dedupe_store_unreachable", "the dedupe store", alert_after_s=0.05)
        for _ in range(2):  # two episodes
            for _ in range(5):
                clock.failed(ConnectionError("redis://:hunter2@db:6379 refused; payload={'x': 1}"))
                time.sleep(0.03)
            clock.ok()
        sentry_sdk.flush(timeout=5)
        events = EnvelopeSink.events
        assert len(events) == 2, events  # once per episode, not once per retry
        assert all(e["fingerprint"] == ["hifi", "dedupe_store_unreachable", "deduplicator"] for e in events)
        assert events[0]["tags"]["service"] == "deduplicator" and events[0]["level"] == "error"
        assert "hunter2" not in json.dumps(events), "URL credentials must not reach Sentry"
    finally:
        sentry_sdk.init(dsn=None)
        server.shutdown()
