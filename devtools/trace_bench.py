"""The trace index's cost per event against a real Redis: `python -m devtools.trace_bench --url redis://...`.

What the auditor does per event for `hifi trace` (shared/trace.py): a collector tally lists it as accepted,
two senders' receipts (hook, files) each carry its trace row, 5 % of events are re-sent and the
deduplicator's tally lists the copy as a dup; the facts are written with `write_pending` after every reader
batch. Reported per 1,000 events: the auditor process's CPU (time.process_time, adding facts and writing
them) and Redis's (INFO cpu used_cpu_sys + used_cpu_user, before and after); and per event the memory its
hashes take (INFO memory used_memory). `--baseline FILE` loads another version of shared/trace.py (e.g.
`git show main:shared/trace.py > /tmp/trace_main.py`) and alternates the two in one process run; the medians
of `--repeat` runs are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import redis.asyncio as aioredis

from shared import trace
from shared.audit import accepted_tally, decode_receipt, decode_tally, receipt
from shared.codec import pack

SINKS = ("hook", "files")
STAGES = ("collector", "enricher", "deduplicator", "router")


@dataclass(frozen=True)
class Batch:
    """One collector request's records as the auditor decodes them: its tally, the dedupe tally, the receipts."""

    tallies: list[Any]
    receipts: list[Any]


def make_batches(events: int, batch: int, dup_share: float = 0.05) -> list[Batch]:
    out = []
    run = uuid.uuid4().hex[:8]  # fresh ids each run: an earlier run's hashes must not be what is measured
    for first in range(0, events, batch):
        ids = [f"{run}-load-{first + i}" for i in range(batch)]
        tenant = "tenant-a" if first // batch % 2 else "tenant-b"
        ingest = 1_764_150_000_000.0 + first
        where = {"topic": "hifi.raw", "ingest_ts": ingest, "events": [[e, i % 6, first + i] for i, e in enumerate(ids)]}
        tallies = [decode_tally(accepted_tally("collector", tenant, 1_764_150_000, batch, where))]
        dups = [[first + i, e, "dup", tenant, {"claim": f"hifi.enriched:{i % 6}:{first + i - 1}"}]
                for i, e in enumerate(ids) if i % round(1 / dup_share) == 0]  # fmt: skip
        runs = [[tenant, 1_764_150_000, "out", batch - len(dups)]]
        dedupe = {"stage": "deduplicator", "topic": "hifi.enriched", "partition": first % 6, "first": first,
                  "runs": runs, "events": dups, "at": ingest + 40}  # fmt: skip
        tallies.append(decode_tally(pack(dedupe)))
        receipts = []
        for sink in SINKS:
            rows = [[e, tenant, ingest, 1, False] for e in ids]
            stages = {s: ingest + 10.0 * k for k, s in enumerate(STAGES)}
            rows_trace = [
                [f"{sink}:{tenant}:{e}", stages, f"hifi.out.{sink}:{i % 6}:{first + i}"] for i, e in enumerate(ids)
            ]
            receipts.append(decode_receipt(receipt(sink, ingest + 80, rows, rows_trace)))
        out.append(Batch(tallies, receipts))
    return out


def redis_cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def run_once(
    module: ModuleType, url: str, batches: list[Batch], per_write: int
) -> tuple[float, float, float, float]:
    """(auditor CPU-s, of which adding facts, Redis CPU-s, Redis memory bytes) for writing `batches` through
    `module`'s index."""
    index = module.TraceIndex(url, f"bench-{uuid.uuid4().hex[:6]}", ttl_s=120)
    probe = aioredis.from_url(url)
    try:
        await index.client.ping()
        await index._memory_full()  # asked once now, not inside the measured run's first write
        before, memory = redis_cpu(await probe.info("cpu")), int((await probe.info("memory"))["used_memory"])
        adding = 0.0
        started = time.process_time()
        for n, batch in enumerate(batches, 1):
            t0 = time.process_time()
            for tally in batch.tallies:
                index.add_tally(tally)
            for value in batch.receipts:
                index.add_receipt(value)
            adding += time.process_time() - t0
            if n % per_write == 0 or n == len(batches):
                await index.write_pending()
        spent = time.process_time() - started
        assert not index.pending and index.dropped == 0, (len(index.pending), index.dropped)
        memory = int((await probe.info("memory"))["used_memory"]) - memory
        return spent, adding, redis_cpu(await probe.info("cpu")) - before, memory
    finally:
        async for keys in _batched(index.client.scan_iter(match=f"{index.prefix}*", count=1000)):
            await index.client.unlink(*keys)  # the run's hashes only: the server may be someone's dev Redis
        await index.close()
        await probe.aclose()


async def _batched(keys: Any, size: int = 1000) -> Any:
    chunk: list[bytes] = []
    async for key in keys:
        chunk.append(key)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("trace_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def main(args: argparse.Namespace) -> None:
    versions = {"current": trace}
    if args.baseline:
        versions = {"baseline": load(Path(args.baseline)), **versions}
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in versions}
    for _ in range(args.repeat):
        for name, module in versions.items():
            batches = make_batches(args.events, args.batch)
            results[name].append(await run_once(module, args.url, batches, args.per_write))
    k = args.events / 1000
    print(f"{args.events} events, batches of {args.batch}, write_pending every {args.per_write} batches, "
          f"{args.repeat} runs each: median CPU-s per 1,000 events")  # fmt: skip
    for name, runs in results.items():
        spent, adding, server, memory = (statistics.median(r[i] for r in runs) / k for i in range(4))
        print(
            f"  {name:9s} auditor {spent:.4f} (adding facts {adding:.4f}, writing {spent - adding:.4f})"
            f"  redis {server:.4f}; Redis memory {memory / 1000:.0f} B/event"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a Redis to write (and then delete) the run's hashes in")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=200, help="events per collector request")
    parser.add_argument("--per-write", type=int, default=2, help="collector batches per write_pending")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", help="another shared/trace.py to compare, in the same process run")
    asyncio.run(main(parser.parse_args()))
