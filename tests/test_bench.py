"""The benchmark harness itself, briefly: it measures what it claims to (no timing thresholds here;
targets live in `make bench` and docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from devtools import bench_measure
from devtools.bench_load import SHAPES, make_events
from devtools.bench_measure import SLA_MS, BenchSink, cpu_seconds, drain, local_progress, peak_rss_mib
from devtools.bench_report import format_table, headline, midpoint, passes
from devtools.bench_systems import BenchEnv, run_once, write_config


@pytest.mark.parametrize("system", ["hifi", "hifi-contracts", "raw"])
async def test_bench_run_of_the_production_shape_measures_every_event_at_every_sink(
    system, kafka, redis_server, tmp_path, port_base
):
    env = BenchEnv(kafka, redis_server, tmp_path / "bench", port_base=port_base)
    result = await run_once(env, system, rate=300, duration=4, batch=20, shape=SHAPES["production"], warmup_s=2)
    assert result["shape"] == "production"
    # refused_requests says why a request was not accepted whole (a status or a client error), if any was
    assert result["accepted"] == 1800, result["refused_requests"]  # the 2 s warm-up's 600 events included
    assert result["measured"] == 1200  # the 4 s measured window's: the latencies' denominator
    assert result["resent"] == 80  # 4 of 90 batches re-sent (warm-up included)
    assert result["offered"] == 1880
    assert set(result["sinks"]) == {"hook", "files"}
    for name, sink in result["sinks"].items():  # ground truth at each sink, not one sink standing for both
        # the warm-up's events must arrive once, like the measured ones
        assert (sink["delivered"], sink["missing"], sink["unacknowledged"]) == (1800, 0, 0), (name, result["exited"])
    if system.startswith("hifi"):
        assert result["duplicates"] == 0  # dedupe dropped the re-sends
    else:
        assert result["duplicates"] == 80 * 2 and result["dedupes"] is False  # passed through to both sinks
    assert result["warmup_s"] == 2 and result["warmup_p95_ms"] > 0 and 0 <= result["warmup_on_time_ratio"] <= 1
    assert result["whole_run_p95_ms"] >= min(result["p95_ms"], result["warmup_p95_ms"])
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["p999_ms"] <= result["max_ms"]
    # On a loaded machine a short run may be all late: check the share agrees with the latencies instead.
    assert 0 <= result["on_time_ratio"] <= 1
    if result["p50_ms"] < SLA_MS * 0.99:
        assert result["on_time_ratio"] >= 0.5
    elif result["p50_ms"] > SLA_MS * 1.01:
        assert result["on_time_ratio"] <= 0.5
    assert "collector" in result["cpu_s_per_1k"] and any(k.startswith("kafka") for k in result["cpu_s_per_1k"])
    assert result["cpu_s_per_1k_total"] > result["cpu_s_per_1k"]["collector"] > 0
    assert all(v > 0 for v in result["peak_rss_mib"].values())
    assert result["exited"] == [] and result["drained"] is True
    if system.startswith("hifi"):
        assert set(result["stage_p95_ms"]) == {"enricher", "deduplicator", "router", "sender"}
        assert {"enricher", "deduplicator", "router", "sender.hook", "sender.files", "auditor"} <= set(
            result["cpu_s_per_1k"]
        )
        audit = result["auditor"]  # its own receipts, beside the sinks' ground truth
        assert audit["canaries_sent"] > 0
        assert audit["delivered"] == 2 * 1800 and audit["lost"] == 0
        assert audit["differs_by"]["delivered"] == 0 and audit["p95_ms"] is not None
        # Each consuming stage's batches, read from its /metrics: they hold every event it read.
        shapes = result["batches"]
        assert {"enricher", "deduplicator", "router", "sender.hook", "sender.files"} <= set(shapes)
        for label in ("enricher", "sender.hook", "sender.files"):
            shape = shapes[label]
            assert shape["events"] in range(1800, 1921), (label, shape)  # re-sends and canaries too
            assert shape["handle_ms"] > 0 and shape["produce_ms"] > 0
    else:
        assert "auditor" not in result and sum(k.startswith("raw") for k in result["cpu_s_per_1k"]) == 5
        assert result["batches"] == {}  # the relays have no /metrics


def test_production_events_are_realistic_and_keyed_by_200_devices():
    import json
    import random

    shape = SHAPES["production"]
    events = make_events(shape, random.Random(1), "run-0", 0, 400, 1.0)
    sizes = [len(json.dumps(e, separators=(",", ":"))) for e in events]
    assert 512 <= min(sizes) and max(sizes) <= 1024
    assert max(sizes) - min(sizes) > 200  # spread over the range, not one size
    assert len({e["device_id"] for e in events}) == 200
    assert all(e["context"]["user_agent"] and e["context"]["ip"] for e in events)
    minimal = make_events(SHAPES["minimal"], random.Random(1), "run-0", 0, 20, 1.0)
    assert all("context" not in e for e in minimal)


@pytest.mark.parametrize("name", ["production", "minimal"])
def test_each_shape_writes_a_config_hifi_accepts(name, tmp_path):
    from shared.config import HifiConfig

    shape = SHAPES[name]
    write_config(tmp_path / "c.yaml", shape, "rocksdb", "http://127.0.0.1:1/in", tmp_path / "files")
    config = HifiConfig.load(tmp_path / "c.yaml")
    assert len(config.tenants) == shape.tenants
    assert all(config.subscribers(t) == shape.sinks for t in config.tenants)
    assert shape.to_json()["sinks_per_tenant"] == (2 if name == "production" else 1)


def test_headline_holds_the_promised_keys_and_ratios():
    def row(system: str, rate: float, p95: int, missing: int = 0) -> dict:
        return {
            "system": system,
            "rate_eps": rate,
            "p50_ms": p95 // 2,
            "p95_ms": p95,
            "p99_ms": p95 * 2,
            "on_time_ratio": 1.0,
            "missing": missing,
            "duplicates": 0,
            "cpu_s_per_1k_total": p95 / 100,
        }

    results = [row("hifi", 2000.0, 40), row("hifi", 5000.0, 90, missing=3), row("raw", 2000.0, 20)]
    results[0]["cpu_s_per_1k"] = {"collector": 0.1, "router": 0.04, "kafka-1": 0.3, "harness": 0.2, "redis": 0.01}
    results.append(row("quix", 2000.0, 160))
    results.append(row("hifi-contracts", 2000.0, 50))  # schemas and per-sink rules on: priced against hifi
    head = headline(results, {"hifi": 5000.0, "raw": 10000.0, "quix": 5000.0}, SHAPES["production"])
    for key in ("rate_eps", "p50_ms", "p95_ms", "p99_ms", "on_time_ratio", "missing", "duplicates"):
        assert key in head
    assert (head["p95_ms"], head["p99_ms"], head["missing"]) == (40, 80, 3)  # at 2,000; loss over every rate
    assert (head["ceiling_eps"], head["limit_ceiling_eps"], head["peer_ceiling_eps"], head["peer_p95_ms"]) == (
        5000.0,
        10000.0,
        5000.0,
        160,
    )
    assert head["ratios"] == {
        "contracts_p95_vs_hifi": 1.25,
        "contracts_cpu_vs_hifi": 1.25,
        "ceiling_vs_limit": 0.5,
        "ceiling_vs_peer": 1.0,
        "p95_vs_limit": 2.0,
        "p95_vs_peer": 0.25,
        "cpu_vs_limit": 2.0,
    }
    assert (head["cpu_s_per_1k_total"], head["limit_cpu_s_per_1k_total"]) == (0.4, 0.2)
    shape = head["shape"]
    assert (shape["auditor"], shape["tenants"], shape["sinks_per_tenant"]) == (True, 2, 2)
    assert (shape["resend_ratio"], shape["payload_bytes"]) == (0.05, [512, 1024])
    met = {t["target"]: t["met"] for t in head["targets"]}
    assert met["p95 ahead of Quix"] is True and met["ceiling >= 0.7 x raw"] is False
    assert met["CPU per event <= 1.2 x raw"] is False and met["on time >= 99.99 % at 2,000 events/s"] is True
    assert head["planning_eps_per_core"] == {"collector": 10_000, "router": 25_000}  # Hifi's stages only
    assert headline([], {})["ceiling_eps"] is None  # nothing ran: no made-up numbers


def test_ceiling_search_bisects_between_the_last_pass_and_the_first_fail():
    assert midpoint(5000, 10000) == 7500
    assert midpoint(7500, 10000) == 9000  # 8,750 on the 500 events/s grain
    assert midpoint(5000, 7500) == 6000
    assert midpoint(5000, 5500) is None  # adjacent on the grain: the ceiling is found
    assert midpoint(None, 500) is None  # nothing passed: no ceiling to refine
    assert midpoint(5000, None) is None  # nothing failed


def test_a_process_gone_during_a_run_voids_the_run_instead_of_crashing_the_bench():
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_seconds(gone.pid) is None and peak_rss_mib(gone.pid) is None
    ok = {"system": "hifi", "rate_eps": 1000.0, "achieved_eps": 1000.0, "p95_ms": 20, "exited": []}
    assert passes(ok)
    void = {**ok, "exited": ["redis"]}
    assert not passes(void)
    row = dict(accepted=1, missing=0, duplicates=0, p50_ms=1, p99_ms=1, p999_ms=1, max_ms=1, on_time_ratio=1.0)
    assert "redis exited during the run" in format_table([{**void, **row}])


def test_a_runs_warm_up_events_count_as_copies_but_not_in_its_measured_latencies():
    from devtools.bench_receivers import truth_from_wire, truth_to_wire

    sink = BenchSink(port=0)
    now = 1_000_000.0

    def event(event_id: str, late_ms: float, warmup: bool) -> dict[str, object]:
        payload: dict[str, object] = {"intended_ms": now - late_ms}
        if warmup:
            payload["warmup"] = True
        return {"event_id": event_id, "payload": payload, "stages": {}}

    # A slow start: the warm-up's events late, the measured window's on time; one warm-up event twice.
    sink.record([event("w1", 5000, True), event("w2", 40, True), event("w1", 5000, True)], now)
    sink.record([event("m1", 100, False), event("m2", 300, False)], now)
    truth = truth_from_wire(truth_to_wire(sink))  # as the receivers' process hands it back
    assert truth.seen == {"w1": 2, "w2": 1, "m1": 1, "m2": 1}  # integrity covers the warm-up
    assert truth.histogram.get_total_count() == 2 and truth.on_time == 2
    assert truth.histogram.get_max_value() < 310  # the warm-up's 5 s is not in the measured window
    assert truth.warmup_histogram.get_total_count() == 2 and truth.warmup_on_time == 1
    assert truth.warmup_histogram.get_max_value() >= 4990


async def test_drain_waits_while_a_backlog_arrives_and_gives_up_when_it_stops(monkeypatch):
    import asyncio

    monkeypatch.setattr(bench_measure, "DRAIN_IDLE_S", 1.0)
    sink = BenchSink(port=0)
    accepted = {f"e{i}" for i in range(6)}

    async def late_backlog(ids: list[str]) -> None:
        for event_id in ids:  # slower than nothing, faster than the idle limit
            await asyncio.sleep(0.6)
            sink.seen[event_id] = 1

    feeding = asyncio.create_task(late_backlog(sorted(accepted)))
    assert await drain(local_progress([sink], accepted)) is True  # 3.6 s in all, longer than the idle limit
    await feeding
    assert await drain(local_progress([sink], accepted | {"never"})) is False


@pytest.mark.slow
async def test_a_second_worker_per_stage_runs_in_the_stages_groups_and_is_priced(
    kafka, redis_server, tmp_path, port_base
):
    """`--second-worker`: every stage after the collector runs 2 processes; each is measured, none delivers twice."""
    env = BenchEnv(kafka, redis_server, tmp_path / "bench", port_base=port_base)
    result = await run_once(env, "hifi", rate=200, duration=4, batch=20, shape=SHAPES["minimal"], workers=2)
    assert result["system"] == "hifi-x2" and result["workers"] == 2
    assert (result["accepted"], result["missing"], result["duplicates"]) == (800, 0, 0), result["exited"]
    cpu = result["cpu_s_per_1k"]
    assert {"enricher#2", "deduplicator#2", "router#2", "sender.hook#2"} <= set(cpu)
    assert "collector#2" not in cpu and "harness-sinks" in cpu
    assert result["exited"] == []


def test_the_second_worker_figure_sums_both_processes_of_a_stage_against_one_at_the_same_rate():
    from devtools.bench_report import second_worker

    one = {"system": "hifi", "rate_eps": 1500.0, "cpu_s_per_1k_total": 0.8, "p95_ms": 300,
           "cpu_s_per_1k": {"router": 0.05, "kafka-1": 0.2, "harness": 0.1, "harness-sinks": 0.05}}  # fmt: skip
    two = {"system": "hifi-x2", "rate_eps": 1500.0, "cpu_s_per_1k_total": 0.9, "p95_ms": 400,
           "cpu_s_per_1k": {"router": 0.04, "router#2": 0.03, "kafka-1": 0.2, "harness": 0.1}}  # fmt: skip
    other_rate = {**one, "rate_eps": 2000.0, "cpu_s_per_1k": {"router": 9.0}}
    figure = second_worker([other_rate, one, two])
    assert figure is not None
    assert figure["stages"] == {"router": {"one": 0.05, "two": 0.07, "ratio": 1.4}}
    assert figure["total"] == {"one": 0.8, "two": 0.9} and figure["p95_ms"] == {"one": 300, "two": 400}
    assert second_worker([one]) is None


@pytest.mark.parametrize(
    "passes_below, ran, ceiling",
    [
        # passes up to 1000: the ladder stops at 2000, the bisection finds 1500 fails; 2000 was run
        (1000, [500, 1000, 2000, 1500], 1000),
        # passes only 500: stops at 1000 with nothing between, then runs the common rate for the p95 comparison
        (500, [500, 1000, 2000], 500),
        # passes up to 3000: 5000 fails, the bisection tries 3500 (fails), then 3000 (passes)
        (3000, [500, 1000, 2000, 5000, 3500, 3000], 3000),
        # nothing passes: no ceiling, and 2000 is still measured
        (0, [500, 2000], None),
    ],
)
def test_the_ladder_bisects_its_ceiling_and_always_measures_the_common_rate(passes_below, ran, ceiling):
    from devtools.bench import ladder

    runs: list[float] = []

    def run(rate: float) -> bool:
        runs.append(rate)
        return rate <= passes_below

    assert ladder(run, [500, 1000, 2000, 5000, 10000], step=True, refine=2) == ceiling
    assert runs == ran
