"""How the bench judges and reports runs: pass/fail and the ceiling bisection, the tables, the headline
of docs/bench/latest.json and the section of docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devtools.bench_load import Shape
from devtools.bench_measure import DRAIN_IDLE_S, DRAIN_MAX_S, SLA_MS
from devtools.docsection import latest_run, rewrite_section


def midpoint(passed: float | None, failed: float | None, grain: float = 500.0) -> float | None:
    """A rate between the last one that passed and the first that failed, on a 500 events/s grain;
    None when there is nothing left between them (or nothing passed)."""
    if passed is None or failed is None:
        return None
    rate = round((passed + failed) / 2 / grain) * grain
    return rate if passed < rate < failed else None


def passes(result: dict[str, Any]) -> bool:
    """A run counts toward the ceiling: it kept up (99 % of the offered rate), p95 under the SLA, nothing exited."""
    return (
        result["achieved_eps"] >= 0.99 * result["rate_eps"] and result["p95_ms"] < SLA_MS and not result.get("exited")
    )


def format_table(results: list[dict[str, Any]]) -> str:
    """The main markdown table, one row per run (systems in the order run, rates ascending), and a note
    under it for every run whose figures need one (undrained, voided, saturated, passed-through re-sends)."""
    rows = [
        "| system | shape | rate | achieved | accepted | resent | missing | dup | p50 | p95 | p99 | p99.9 | max "
        "| on time (1 s) | CPU-s/1k | warm-up p95, on time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    systems = list(dict.fromkeys(r["system"] for r in results))
    for r in sorted(results, key=lambda r: (systems.index(r["system"]), r["rate_eps"])):  # bisected rates in place
        rows.append(
            f"| {r['system']} | {r.get('shape', 'minimal')} | {r['rate_eps']:g} | {r['achieved_eps']:g} "
            f"| {r['accepted']} | {r.get('resent', 0)} | {r['missing']} | {r['duplicates']} | {r['p50_ms']} "
            f"| {r['p95_ms']} | {r['p99_ms']} | {r['p999_ms']} | {r['max_ms']} | {r['on_time_ratio'] * 100:.3f} % "
            f"| {r.get('cpu_s_per_1k_total', '')} | {_warmup(r)} |"
        )
    for r in results:
        if r.get("missing") and not r.get("drained", True):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s: {r['missing']} accepted events were not delivered "
                f"when the bench stopped waiting ({DRAIN_IDLE_S:g} s without progress, or {DRAIN_MAX_S:g} s)"
            )
        if r.get("exited"):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s does not count: "
                f"{', '.join(r['exited'])} exited during the run"
            )
        if r.get("unacknowledged"):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s: {r['unacknowledged']} deliveries (over the sinks) of "
                "events whose collector answer the client never got (its 30 s timeout): the collector was saturated"
            )
        if r.get("dedupes") is False and r.get("duplicates"):
            rows.append(
                f"\n{r['system']} at {r['rate_eps']:g} events/s: {r['duplicates']} duplicates are the client's "
                f"{r.get('resent', 0)} re-sent events passed through to {len(r.get('sinks', {})) or 1} sinks "
                "(the raw relays do not dedupe; not a failure)"
            )
    return "\n".join(rows) + "\n"


def _warmup(result: dict[str, Any]) -> str:
    if result.get("warmup_p95_ms") is None:
        return "none"
    return f"{result['warmup_p95_ms']} ms, {result['warmup_on_time_ratio'] * 100:.3f} % ({result['warmup_s']:g} s)"


def format_costs(results: list[dict[str, Any]]) -> str:
    """CPU seconds per 1,000 events and peak RSS per process, one line per run."""
    rows = [
        "| system | rate | CPU-s/1k total | CPU-s/1k per process | peak RSS MiB per process |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cpu = ", ".join(f"{k} {v:g}" for k, v in r.get("cpu_s_per_1k", {}).items())
        rss = ", ".join(f"{k} {v:g}" for k, v in r.get("peak_rss_mib", {}).items())
        rows.append(f"| {r['system']} | {r['rate_eps']:g} | {r.get('cpu_s_per_1k_total', '')} | {cpu} | {rss} |")
    return "\n".join(rows) + "\n"


def format_auditor(results: list[dict[str, Any]]) -> str:
    """The auditor's own figures beside the sinks' ground truth (Hifi runs with the auditor only)."""
    rows = [
        "| rate | auditor delivered | sinks delivered | auditor lost | sinks missing | auditor p95 "
        "| sinks p95 (whole run) | p95 differs by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r.get("auditor")
        if not a:
            continue
        truth = sum(s["delivered"] + s.get("unacknowledged", 0) for s in r["sinks"].values())
        rows.append(
            f"| {r['rate_eps']:g} | {a['delivered']} | {truth} | {a['lost']} | {r['missing']} | {a['p95_ms']} "
            f"| {r.get('whole_run_p95_ms', r['p95_ms'])} | {a['differs_by']['p95_ms']} |"
        )
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


COMMON_RATE = 2000.0  # the issue's rate for p95/p99 targets and for comparing latency across systems


def headline(results: list[dict[str, Any]], ceilings: dict[str, float], shape: Shape | None = None) -> dict[str, Any]:
    """The numbers docs/bench/latest.json promises at its top level, and the ratios to the references.

    Hifi at the common rate (2,000 events/s), its loss over every rate it ran, the three ceilings, the
    peer's p95 at the same rate, pipeline/limit and pipeline/peer ratios for ceiling, p95 and total CPU
    per event, and each target of docs/BENCHMARKS.md with whether this run met it.
    """

    def at(system: str, rate: float) -> dict[str, Any]:
        return next((r for r in results if r["system"] == system and r["rate_eps"] == rate), {})

    hifi, raw, quix = at("hifi", COMMON_RATE), at("raw", COMMON_RATE), at("quix", COMMON_RATE)
    mine = [r for r in results if r["system"] == "hifi"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    ceiling, limit, peer = ceilings.get("hifi"), ceilings.get("raw"), ceilings.get("quix")
    contracts = at("hifi-contracts", COMMON_RATE)
    ratios = {
        "contracts_p95_vs_hifi": ratio(contracts.get("p95_ms"), hifi.get("p95_ms")),
        "contracts_cpu_vs_hifi": ratio(contracts.get("cpu_s_per_1k_total"), hifi.get("cpu_s_per_1k_total")),
        "ceiling_vs_limit": ratio(ceiling, limit),
        "ceiling_vs_peer": ratio(ceiling, peer),
        "p95_vs_limit": ratio(hifi.get("p95_ms"), raw.get("p95_ms")),
        "p95_vs_peer": ratio(hifi.get("p95_ms"), quix.get("p95_ms")),
        "cpu_vs_limit": ratio(hifi.get("cpu_s_per_1k_total"), raw.get("cpu_s_per_1k_total")),
    }

    def target(name: str, value: float | None, ok: bool) -> dict[str, Any]:
        return {"target": name, "measured": value, "met": None if value is None else ok}

    on_time = hifi.get("on_time_ratio")
    targets = [
        target("p95 <= 1.5 x raw at 2,000 events/s", ratios["p95_vs_limit"], (ratios["p95_vs_limit"] or 0) <= 1.5),
        target("on time >= 99.99 % at 2,000 events/s", on_time, (on_time or 0) >= 0.9999),
        target("ceiling >= 0.7 x raw", ratios["ceiling_vs_limit"], (ratios["ceiling_vs_limit"] or 0) >= 0.7),
        target("CPU per event <= 1.2 x raw", ratios["cpu_vs_limit"], (ratios["cpu_vs_limit"] or 0) <= 1.2),
        target("ceiling ahead of Quix", ratios["ceiling_vs_peer"], (ratios["ceiling_vs_peer"] or 0) > 1),
        target("p95 ahead of Quix", ratios["p95_vs_peer"], (ratios["p95_vs_peer"] or 2) < 1),
    ]
    return {
        "rate_eps": COMMON_RATE,
        "shape": shape.to_json() if shape else None,
        "p50_ms": hifi.get("p50_ms"),
        "p95_ms": hifi.get("p95_ms"),
        "p99_ms": hifi.get("p99_ms"),
        "p999_ms": hifi.get("p999_ms"),
        "on_time_ratio": on_time,
        "missing": sum(r["missing"] for r in mine) if mine else None,
        "duplicates": sum(r["duplicates"] for r in mine) if mine else None,
        "ceiling_eps": ceiling,
        "limit_ceiling_eps": limit,
        "peer_ceiling_eps": peer,
        "limit_p95_ms": raw.get("p95_ms"),
        "peer_p95_ms": quix.get("p95_ms"),
        "cpu_s_per_1k_total": hifi.get("cpu_s_per_1k_total"),
        "limit_cpu_s_per_1k_total": raw.get("cpu_s_per_1k_total"),
        "peer_cpu_s_per_1k_total": quix.get("cpu_s_per_1k_total"),
        "limit_duplicates": raw.get("duplicates"),
        "auditor": hifi.get("auditor"),
        "planning_eps_per_core": planning(hifi),
        "second_worker": second_worker(results),
        "ratios": ratios,
        "targets": targets,
    }


# Not Hifi's stages: the broker, Redis and the load generator with its receivers.
NOT_STAGES = ("harness", "kafka-", "redis")


def planning(result: dict[str, Any]) -> dict[str, int]:
    """Events/s one core carries per stage process: 1,000 / its CPU-s per 1,000 events at this run's rate.

    Valid only from a run that kept up (a saturated stage's CPU is shared by fewer accepted events)."""
    return {
        name: round(1000 / cost)
        for name, cost in result.get("cpu_s_per_1k", {}).items()
        if cost > 0 and not name.startswith(NOT_STAGES)
    }


def second_worker(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a second worker per stage costs: CPU-s per 1,000 events of each stage with one worker and with
    two (both processes summed), at the rate of the 2-worker run (`--second-worker`: Hifi's ceiling)."""
    two = next((r for r in results if r["system"] == "hifi-x2"), None)
    one = two and next((r for r in results if r["system"] == "hifi" and r["rate_eps"] == two["rate_eps"]), None)
    if two is None or one is None:
        return None
    stages: dict[str, dict[str, float | None]] = {}
    for name, cost in one["cpu_s_per_1k"].items():
        if name.startswith(NOT_STAGES):
            continue
        both = sum(v for label, v in two["cpu_s_per_1k"].items() if label.split("#")[0] == name)
        stages[name] = {"one": cost, "two": round(both, 3), "ratio": round(both / cost, 2) if cost else None}
    return {
        "rate_eps": two["rate_eps"],
        "stages": stages,
        "total": {"one": one["cpu_s_per_1k_total"], "two": two["cpu_s_per_1k_total"]},
        "p95_ms": {"one": one["p95_ms"], "two": two["p95_ms"]},
    }


def format_headline(head: dict[str, Any]) -> str:
    """The headline of `headline` in prose: shape, Hifi at the common rate, the ratios, planning, targets."""
    r = head["ratios"]
    shape = head.get("shape") or {}
    met = "; ".join(
        f"{t['target']}: {t['measured']} ({'met' if t['met'] else 'not measured' if t['met'] is None else 'MISSED'})"
        for t in head.get("targets", [])
    )
    return (
        f"Shape: {shape.get('name')} ({shape.get('tenants')} tenants x {shape.get('sinks_per_tenant')} sinks, "
        f"auditor {'on' if shape.get('auditor') else 'off'}, re-sends {shape.get('resend_ratio')}, "
        f"payload {shape.get('payload_bytes')} B).\n"
        f"At {head['rate_eps']:g} events/s Hifi: p50 {head['p50_ms']} ms, p95 {head['p95_ms']} ms, "
        f"p99 {head['p99_ms']} ms, p99.9 {head.get('p999_ms')} ms, on time {head['on_time_ratio']}; missing "
        f"{head['missing']}, duplicates {head['duplicates']} over every rate. Peer p95 {head['peer_p95_ms']} ms, "
        f"limit p95 {head['limit_p95_ms']} ms. CPU-s per 1,000 events (all processes but the harness): Hifi "
        f"{head.get('cpu_s_per_1k_total')}, limit {head.get('limit_cpu_s_per_1k_total')}, peer "
        f"{head.get('peer_cpu_s_per_1k_total')}.\n"
        f"Ratios: ceiling Hifi/limit {r['ceiling_vs_limit']}, Hifi/peer {r['ceiling_vs_peer']}; "
        f"p95 at {head['rate_eps']:g} events/s Hifi/limit {r['p95_vs_limit']}, Hifi/peer {r['p95_vs_peer']}; "
        f"CPU per event Hifi/limit {r.get('cpu_vs_limit')} "
        "(below 1 is better for p95 and CPU, above 1 for the ceiling).\n"
        f"Planning, events/s per core per stage: {head.get('planning_eps_per_core')}.\n"
        f"A second worker per stage (CPU-s per 1,000 events, one worker vs two): {head.get('second_worker')}.\n"
        f"Targets: {met}."
    )


def write_doc(doc: Path, table: str, ceilings: dict[str, float], command: str, summary: str = "") -> None:
    """Rewrite the results section of docs/BENCHMARKS.md (between the bench markers): machine, tables,
    ceilings and the headline."""
    section = (
        f"{latest_run(command)}; broker, Redis, every process and the load generator on "
        f"one machine, shared with other work while it ran (absolute times are noisy; compare ratios). "
        f"Latencies in ms.\n\n{table}\nCeilings (achieved >= 99 % of offered and p95 < 1 s): "
        f"{', '.join(f'{k} {v:g} events/s' for k, v in ceilings.items()) or 'none reached'}.\n"
        f"{summary + chr(10) if summary else ''}"
    )
    rewrite_section(doc, "bench", section)
