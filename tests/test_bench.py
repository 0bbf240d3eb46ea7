"""The benchmark harness itself, briefly: it measures what it claims to (no timing thresholds here;
targets live in `make bench` and docs/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from shared.local.bench import BenchEnv, run_once


@pytest.mark.parametrize("system", ["hifi", "raw"])
async def test_bench_run_measures_every_event_and_process(system, kafka, redis_server, tmp_path, port_base):
    env = BenchEnv(kafka, redis_server, tmp_path / "bench", port_base=port_base)
    result = await run_once(env, system, rate=300, duration=4, batch=20)
    assert result["offered"] == 1200 and result["accepted"] == 1200
    assert result["missing"] == 0 and result["duplicates"] == 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert 0 < result["on_time_ratio"] <= 1
    assert "collector" in result["cpu_s_per_1k"] and any(k.startswith("kafka") for k in result["cpu_s_per_1k"])
    assert all(v > 0 for v in result["peak_rss_mib"].values())
    if system == "hifi":
        assert set(result["stage_p95_ms"]) == {"enricher", "deduplicator", "router", "sender"}
        assert {"enricher", "deduplicator", "router", "sender.hook"} <= set(result["cpu_s_per_1k"])
