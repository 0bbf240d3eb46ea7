"""`hifi trace` for a person: the path `TraceIndex.lookup` (shared/trace.py) assembled, one line per step."""

from __future__ import annotations

import time
from typing import Any

from shared import pipeline


def _clock(ms: float | None) -> str:
    if not ms:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{int(ms % 1000):03d}"


def render(trace: dict[str, Any]) -> str:
    """The trace for a person: one line per step, times with the delay since acceptance."""
    if not trace["found"]:
        return (
            f"event {trace['event_id']}: not found (never accepted, older than the trace retention, "
            "or not yet tallied: try again in a second)"
        )
    lines = []
    for tenant, path in trace["tenants"].items():
        lines.append(f"event {trace['event_id']} of tenant {tenant}")
        accepted = path["accepted"] or {}
        start = accepted.get("ingest_ts")

        def since(ms: float | None, start: float | None = start) -> str:
            return f"{_clock(ms)}  ({ms - start:+.0f} ms)" if ms and start else _clock(ms)

        where = f"  -> {accepted['topic']}[{accepted['partition']}]@{accepted['offset']}" if "topic" in accepted else ""
        if accepted.get("copies", 1) > 1:
            where += f"  ({accepted['copies']} copies accepted; the path is the first's)"
        lines.append(f"  accepted by the collector  {_clock(start)}{where}")
        for stage, at in path["stages"].items():
            if stage != pipeline.COLLECTOR.name:
                lines.append(f"  {stage:<25} {since(at)}")
        for step in path["dropped"]:
            line = f"  {step['stage']:<25} {since(step['at'])}  {step['text']}"
            if "first_copy" in step:
                line += f" of the message at {step['first_copy']} (this copy: {step['source']})"
            if step["outcome"] == "dlq":
                line += f": {step.get('reason')}: {step.get('error')}"
            lines.append(line)
        for sink, step in path["sinks"].items():
            if step["status"] == "delivered":
                lines.append(
                    f"  sink {sink:<20} {since(step['acked_ts'])}  delivered, attempts {step['attempts']}, "
                    f"idempotency key {step['idempotency_key']}"
                    + (f" ({step['deliveries']} deliveries; the first shown)" if step.get("deliveries", 1) > 1 else "")
                )
            else:
                line = f"  sink {sink:<20} {since(step['at'])}  {step['text']} at {step['stage']}"
                if step["outcome"] == "dlq":
                    line += f" (attempts {step.get('attempts')}): {step.get('reason')}: {step.get('error')}"
                lines.append(line)
        if path.get("more_facts"):
            lines.append(f"  ({path['more_facts']} more facts about this id were counted, not kept)")
    return "\n".join(lines)
