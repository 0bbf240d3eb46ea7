"""Per-event cost of the stage codec on realistic 1 KB events: `python -m devtools.codec_bench` (from the repo root).

The events are the bench's production shape (devtools/bench_load.py: page views padded to 512-1024 bytes
of JSON, with a user agent and an IP) as they leave the enricher: parsed user agent, a geo record, the
collector's and the enricher's stamps. Each round times `decode_event` and `encode_event` over all of
them, today's and the frozen one before issue 16 (tests/event_wire_v1.py), interleaved in one process so
both see the same machine; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from devtools.bench_load import SHAPES, make_events
from services.enricher.app import user_agent_fields
from shared.codec import decode_event, encode_event
from shared.event import Event, EventValidator, Limits
from tests import event_wire_v1 as v1

GEO = {"country": "DE", "city": "Berlin", "lat": 52.52, "lon": 13.405}


def enriched_events(count: int, seed: int = 16) -> list[Event]:
    """`count` events as the enricher writes them (what the deduplicator, router and senders decode)."""
    rng = random.Random(seed)
    validator = EventValidator(Limits())
    shape = SHAPES["production"]
    events = []
    for first in range(0, count, 20):  # the bench posts batches of 20
        for item in make_events(shape, rng, f"b{first}", first, min(20, count - first), 1.764e12 + first):
            event = validator.validate(item, "bench0")
            event.ingest_ts = item["ts"] + 3.0
            event.stages["collector"] = event.ingest_ts
            event.enrichment["ua"] = user_agent_fields(event.context["user_agent"])
            event.enrichment["geo"] = GEO
            event.stages["enricher"] = event.ingest_ts + 2.5
            events.append(event)
    return events


def per_item_us(fn: Callable[[Any], Any], items: Sequence[Any]) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - started) / len(items) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    events = enriched_events(args.events)
    blobs = [encode_event(e) for e in events]
    assert blobs == [v1.encode_event(v1.decode_event(b)) for b in blobs], "today's bytes differ from before"
    old_events = [v1.decode_event(b) for b in blobs]
    cases: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "decode_event before": (v1.decode_event, blobs),
        "decode_event now": (decode_event, blobs),
        "encode_event before": (v1.encode_event, old_events),
        "encode_event now": (encode_event, events),
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, items) in cases.items():
            timings[name].append(per_item_us(fn, items))
    size = statistics.mean(map(len, blobs))
    print(f"{len(blobs)} events, {size:.0f} bytes of msgpack on average; median of {args.rounds} rounds")
    for name, runs in timings.items():
        print(f"  {name:22} {statistics.median(runs):6.2f} µs/event  (range {min(runs):.2f} to {max(runs):.2f})")


if __name__ == "__main__":
    main()
