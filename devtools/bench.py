"""`hifi bench`: open-loop load through the whole pipeline, measured honestly.

- Batches are scheduled at fixed intended times; each event carries its intended send time and
  latency is measured from it to the sink's receipt, so a stall anywhere (the generator included)
  shows up in the numbers instead of slowing the load down (no coordinated omission).
- End-to-end latency goes into an HDR histogram; per-stage lag comes from the stage stamps.
- CPU seconds and peak RSS per process (services, the broker, Redis, and the harness itself: the load
  generator, and the receivers in a process of their own, which share the machine they measure) come
  from /proc.
- `--system raw` runs the limit reference: the same collector and topics, but each middle stage and
  the sender replaced by a bare aiokafka relay (consume -> produce/POST/append -> commit), no processing.
- `Shape` is what the pipeline carries: `production` (the default: 2 tenants each subscribed to a
  webhook and a file sink, the auditor with canaries, 200 devices, 5 % client re-sends, 0.5-1 KB
  events with a user agent and an IP) or `minimal` (one tenant, one webhook, no auditor). Every
  system gets the same sinks and re-sends; ground truth is what the bench's own receivers saw.

This module runs the ladder of rates (`main`, behind `hifi bench`); the rest lives beside it:
bench_load (shapes, events, the open-loop client), bench_measure (the sinks' ground truth, CPU/RSS,
the drain, the auditor's figures), bench_receivers (the sinks' own process), bench_systems (one run of
hifi, hifi-contracts, raw or quix) and bench_report (pass/fail, the ceiling bisection, the tables,
latest.json's headline, BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.bench_load import SHAPES
from devtools.bench_report import (
    COMMON_RATE,
    format_auditor,
    format_costs,
    format_headline,
    format_table,
    headline,
    midpoint,
    passes,
    write_doc,
)
from devtools.bench_systems import BenchEnv, run_once
from devtools.kafka import DEFAULT_HOME, KAFKA_VERSION, LocalKafka
from devtools.redis import LocalRedis

WARMUP_RATE = 2000.0


def ladder(run: Callable[[float], bool], rates: list[float], step: bool, refine: int) -> float | None:
    """Run `rates` in order; with `step`, stop at the first that fails, bisect `refine` times between it and
    the last pass (the same for every system), and, if the ladder stopped below it, run the common rate too,
    so every system has a p95 at the rate the targets compare (it does not count toward the ceiling).
    Returns the ceiling: the highest rate that passed."""
    ceiling: float | None = None
    failed: float | None = None
    ran: list[float] = []
    for rate in rates:
        ran.append(rate)
        if run(rate):
            ceiling = rate
        elif step:
            failed = rate
            break
    for _ in range(refine if step else 0):
        rate = midpoint(ceiling, failed)
        if rate is None:
            break
        ran.append(rate)
        if run(rate):
            ceiling = rate
        else:
            failed = rate
    if step and COMMON_RATE not in ran:
        run(COMMON_RATE)
    return ceiling


def main(
    rates: list[float],
    duration: float,
    batch: int,
    systems: list[str],
    step: bool,
    json_out: str | None,
    doc: str | None = None,
    dedupe: str = "rocksdb",
    refine: int = 2,
    warmup_s: float = 20.0,
    shape_name: str = "production",
    kafka_port: int = 19292,
    redis_url: str = "redis://127.0.0.1:6391/0",
    port_base: int = 18700,
    second_worker: bool = False,
    run_warmup_s: float = 15.0,
) -> int:
    """Run every system over `rates` (with `step`, a doubling ladder bisected `refine` times past its last
    pass), print the tables and write them to `doc` and `json_out`. Exit status 1 if any run lost an
    accepted event or, where the system dedupes, delivered one twice."""
    # SIGTERM stops a bench like Ctrl-C: the running pipeline, the broker and Redis are stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    shape = SHAPES[shape_name]
    kafka = LocalKafka(port=kafka_port, data_root=DEFAULT_HOME.parent / "bench" / f"kafka-{kafka_port}")
    kafka.wipe()
    kafka.start()
    # A server of its own: one shared with a test run on this machine would be stopped by that run's end.
    redis = LocalRedis(url=redis_url)
    started_redis = redis.ensure()
    env = BenchEnv(kafka, redis, DEFAULT_HOME.parent / "bench", port_base=port_base)
    results: list[dict[str, Any]] = []
    ceilings: dict[str, float] = {}

    def run(system: str, rate: float, workers: int = 1) -> bool:
        each = f", {workers} workers per stage" if workers > 1 else ""
        print(f"bench {system} ({shape.name} shape{each}) at {rate:g} events/s for {duration:g}s ...", flush=True)
        result = asyncio.run(run_once(env, system, rate, duration, batch, dedupe, shape, workers, run_warmup_s))
        print(json.dumps(result), flush=True)
        results.append(result)
        return passes(result)

    try:
        if warmup_s > 0:
            # A fresh broker's JVM is still compiling its hot paths: a 10,000 events/s run in its first
            # minute fails where the same run after the ladder's lower rates passes. Warm it up with the
            # raw relays, unreported, so the first system measured does not pay for it.
            print(
                f"warm-up: the raw relays at {WARMUP_RATE:g} events/s for {warmup_s:g}s (not reported) ...", flush=True
            )
            asyncio.run(run_once(env, "raw", WARMUP_RATE, warmup_s, batch, shape=shape))
        for system in systems:
            ceiling = ladder(lambda rate, system=system: run(system, rate), rates, step, refine)
            if ceiling is not None:
                ceilings[system] = ceiling
        if second_worker and "hifi" in ceilings:
            run("hifi", ceilings["hifi"], workers=2)
    finally:
        kafka.stop()
        if started_redis:
            redis.stop()
    if not step:
        ceilings = {}  # one fixed rate passing is not a ceiling search
    table = format_table(results)
    costs = format_costs(results)
    audit = format_auditor(results)
    head = headline(results, ceilings, shape)
    print(table)
    print(costs)
    print(audit)
    print("ceilings (achieved >= 99 % of offered and p95 < 1 s):", ceilings)
    print(format_headline(head))
    if doc:
        command = (
            f"hifi bench --shape {shape.name} {'--step' if step else ''} {'--second-worker' if second_worker else ''} "
            + " ".join(f"--rate {r:g}" for r in ([] if step else rates))
            + f" --duration {duration:g} --run-warmup {run_warmup_s:g} "
            + " ".join(f"--system {s}" for s in systems)
        )
        tables = f"{table}\nCost per process:\n\n{costs}" + (
            f"\nThe auditor beside the sinks:\n\n{audit}" if audit else ""
        )
        write_doc(Path(doc), tables, ceilings, " ".join(command.split()), format_headline(head))
    if json_out:
        summary = {
            **head,
            "machine": {"cores": os.cpu_count(), "kafka": KAFKA_VERSION, "shared": True},
            "results": results,
            "ceilings_eps": ceilings,
        }
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(summary, indent=1))
    return 0 if all(r["missing"] == 0 and (r["duplicates"] == 0 or not r.get("dedupes", True)) for r in results) else 1
