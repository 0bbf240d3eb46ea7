"""The chaos report's late seconds per fault window and issue 15's limits on them (pure: no pipeline)."""

from __future__ import annotations

from types import SimpleNamespace

from devtools.chaos import judge_late_windows
from devtools.chaos_faults import on_time_over
from devtools.chaos_verify import ChaosVerify


def run_and_sink(
    late_ingests: list[float], on_time_ingests: list[float], fault_start_ms: float, windows
) -> tuple[ChaosVerify, SimpleNamespace]:
    """A run at 10 events/s whose healthy sink got `late_ingests` 1.5 s late and the rest 100 ms after ingest."""
    received, arrivals = [], []
    for n, ingest in enumerate(late_ingests + on_time_ingests):
        received.append({"event_id": f"e{n}", "ingest_ts": ingest})
        arrivals.append(ingest + (1500.0 if n < len(late_ingests) else 100.0))
    run = ChaosVerify.__new__(ChaosVerify)
    run.rate = 10.0
    run.fault_start_ms = fault_start_ms
    run.windows = windows
    return run, SimpleNamespace(received=received, arrival_ms=arrivals)


def verify_with(late_ingests: list[float], on_time_ingests: list[float], fault_start_ms: float, windows) -> ChaosVerify:
    run, sink = run_and_sink(late_ingests, on_time_ingests, fault_start_ms, windows)
    return run._late_by_window(sink)  # type: ignore[arg-type,return-value]


def test_a_windows_late_seconds_are_placed_by_the_second_of_ingest_after_it_began():
    """A broker kill's stall apart from its restart 30 s later, in one window."""
    windows = [("kill busiest broker 1", 10_000.0, 45_000.0)]
    late = [10_100.0, 10_600.0, 11_200.0, 43_900.0, 50_000.0]  # the last: over 3 s after the window's end
    run, sink = run_and_sink(late, [12_000.0, 44_000.0], fault_start_ms=10_000.0, windows=windows)
    assert run._late_by_second_of_window(sink) == {"kill busiest broker 1": {0: 0.2, 1: 0.1, 33: 0.1}}  # type: ignore[arg-type]


def test_late_events_before_the_fault_are_the_start_up_not_a_window_or_the_gaps_between():
    windows = [("redeploy router", 20_000.0, 25_000.0), ("redeploy router#2", 30_000.0, 31_000.0)]
    late = [1_000.0, 2_000.0, 3_000.0, 21_000.0, 33_500.0, 40_000.0, 41_000.0]
    by_window = verify_with(late, [5_000.0, 22_000.0], fault_start_ms=10_000.0, windows=windows)
    assert by_window == {
        "redeploy router": 0.1,  # 21 s
        "redeploy router#2": 0.1,  # 33.5 s: within 3 s of its end
        "before the fault": 0.3,  # 1, 2 and 3 s: the warm-up
        "outside windows": 0.2,  # 40 and 41 s: during the fault, in no window
    }


def test_a_planned_window_must_have_no_late_event_and_a_crash_at_most_the_limit():
    result = {
        "late_s_by_window": {
            "redeploy router": 0.0,
            "kill -9 router#2": 2.9,
            "kill busiest broker 2": 3.2,
            "before the fault": 40.0,  # the machine, not a fault: never judged
            "outside windows": 9.0,
        }
    }
    judge_late_windows(result, 3.0)
    assert result["late_windows_over_limit"] == {"kill busiest broker 2": 3.2}
    assert result["late_limit_met"] is False

    result = {"late_s_by_window": {"redeploy router": 0.05, "redeploy router#2": 0.0, "outside windows": 0.0}}
    judge_late_windows(result, 0.0)
    assert result["late_windows_over_limit"] == {"redeploy router": 0.05}

    result = {"late_s_by_window": {"redeploy router": 0.0, "kill -9 router#2": 1.2, "before the fault": 6.0}}
    judge_late_windows(result, 3.0)
    assert result["late_limit_met"] is True and result["late_windows_over_limit"] == {}


def test_a_run_whose_fault_recorded_no_window_meets_no_limit():
    result = {"late_s_by_window": {"before the fault": 0.0, "outside windows": 0.0}}
    judge_late_windows(result, 3.0)
    assert result["late_limit_met"] is False


def test_a_kill_of_a_second_sender_worker_covers_its_sinks_duplicates():
    """Scenario 21 kills `sender.faulted#2`: a duplicate from that kill's documented window (the sink took a batch,
    the worker died before its ledger mark was durable) is the faulted sink's (before: only `sender.faulted` was
    matched, so its 9 duplicates were "unexplained" and the run failed)."""
    from devtools.chaos_faults import Kill
    from devtools.chaos_verify import kills_of_sender

    kills = [Kill("sender.faulted#2", 1000.0), Kill("sender.healthy", 2000.0), Kill("router#2", 3000.0)]
    assert [k.label for k in kills_of_sender(kills, "faulted")] == ["sender.faulted#2"]
    assert [k.label for k in kills_of_sender(kills, "healthy")] == ["sender.healthy"]


def sink_of(lags_ms: list[tuple[float, float]]) -> SimpleNamespace:
    """A healthy sink that received one event per (arrival ms, lag ms), in arrival order."""
    return SimpleNamespace(
        received=[{"event_id": f"e{n}", "ingest_ts": at - lag} for n, (at, lag) in enumerate(lags_ms)],
        arrival_ms=[at for at, _ in lags_ms],
    )


def test_a_fault_waits_for_a_sink_on_time_over_the_whole_span_not_for_a_backlog_still_draining():
    now = 100_000.0
    steady = sink_of([(now - 15_000 + i * 100, 200.0) for i in range(150)])
    assert on_time_over(steady, now, 10.0)
    draining = sink_of([(now - 15_000 + i * 100, 200.0 if i < 140 else 1_400.0) for i in range(150)])
    assert not on_time_over(draining, now, 10.0)  # the last second still late
    recovering = sink_of([(now - 15_000 + i * 100, 1_400.0 if i < 60 else 200.0) for i in range(150)])
    assert not on_time_over(recovering, now, 10.0)  # on time for 9 s only
    assert on_time_over(recovering, now + 1_000, 10.0)
    just_started = sink_of([(now - 3_000 + i * 100, 200.0) for i in range(30)])
    assert not on_time_over(just_started, now, 10.0)  # receiving for 3 s: not yet a span of 10
    assert not on_time_over(sink_of([]), now, 10.0)
