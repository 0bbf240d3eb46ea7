"""The collector's CPU per request minus the network: `python -m devtools.collector_bench [--against REV]`.

A request is a 20-event JSON body of ~1 KB page views made as the bench's load makes them (production shape),
encoded as its client encodes them. Timed: `parse_body`, `EventValidator.validate` of each item, and the whole
path up to the producer (`build_records`: validate, stamp, encode, key). With `--against REV`, the validator and
`parse_body` of that git revision run interleaved with the worktree's, in the same process. Medians of rounds,
in CPU time (the machine is shared).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import msgspec

from devtools.bench_load import SHAPES, make_events
from services.collector import admission
from services.collector.app import build_records
from shared import event as event_module
from shared.event import Limits

EVENTS_PER_REQUEST = 20
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:131.0) Gecko/20100101 Firefox/131.0"


def bodies(count: int, seed: int = 16) -> list[bytes]:
    rng = random.Random(seed)
    shape = SHAPES["production"]
    now = time.time() * 1000.0
    return [
        msgspec.json.encode(make_events(shape, rng, f"r{r}", r * EVENTS_PER_REQUEST, EVENTS_PER_REQUEST, now))
        for r in range(count)
    ]


def revision_module(rev: str, path: str, name: str) -> ModuleType:
    """`path` as it was at git revision `rev`, imported as module `name` (its imports resolve to today's)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(name, file.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def paths(event_mod: ModuleType, admission_mod: ModuleType) -> dict[str, Callable[[list[bytes]], None]]:
    limits = Limits()
    validator = event_mod.EventValidator(limits)
    holder = SimpleNamespace(config=SimpleNamespace(limits=limits))
    parse_body = admission_mod.Admission.parse_body
    parsed: list[list[Any]] = []

    def parse(batch: list[bytes]) -> None:
        for body in batch:
            parse_body(holder, "application/json", body)

    def validate(batch: list[bytes]) -> None:
        if not parsed:  # parsed once, untimed
            parsed.extend(parse_body(holder, "application/json", body) for body in batch)
            return
        for items in parsed:
            for item in items:
                validator.validate(item, "bench0")

    def whole(batch: list[bytes]) -> None:
        for body in batch:
            items = parse_body(holder, "application/json", body)
            events, _, rejected = build_records(validator, "raw", "bench0", items, USER_AGENT, "10.0.0.1", 1.0)
            assert len(events) == EVENTS_PER_REQUEST and not rejected, rejected

    return {"parse_body": parse, "validate": validate, "whole request": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="also time this git revision's validator and parse_body")
    parser.add_argument("--requests", type=int, default=1000, help="requests per round (20 events each)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    batch = bodies(args.requests)
    size = statistics.median(len(b) for b in batch) / EVENTS_PER_REQUEST
    print(f"{args.requests} requests x {EVENTS_PER_REQUEST} events, median {size:.0f} B/event as JSON")
    systems = {"worktree": paths(event_module, admission)}
    if args.against:
        systems[args.against] = paths(
            revision_module(args.against, "shared/event.py", "_old_event"),
            revision_module(args.against, "services/collector/admission.py", "_old_admission"),
        )
    for step in ("parse_body", "validate", "whole request"):
        times: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, steps in systems.items():  # interleaved: drift on a shared machine hits both alike
                if step == "validate" and _ == 0:
                    steps["validate"](batch)  # parses
                gc.collect()
                gc.disable()  # a collection triggered by one system's garbage would be billed to the other
                started = time.process_time()  # CPU: 5 engineers share 2 cores, wall time counts their work
                steps[step](batch)
                times[name].append(time.process_time() - started)
                gc.enable()
        for name, spent in times.items():
            per_request = statistics.median(spent) / args.requests * 1e6
            print(
                f"{step:14s} {name:10s} {per_request:8.1f} µs/request {per_request / EVENTS_PER_REQUEST:7.2f} µs/event"
            )


if __name__ == "__main__":
    main()
