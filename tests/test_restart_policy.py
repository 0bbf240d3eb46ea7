"""The supervisor's crash-loop bound and its stop race, with no servers: the policy on simulated crashes,
the supervisor on stand-in processes (review of issue 15, findings 5 and 6)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

from devtools.pipeline import PipelineProcesses, RestartPolicy
from shared.config import Settings
from shared.stage import EXIT_INSTANCE_ID_TAKEN
from tests.helpers import tenant_block


def simulate(policy: RestartPolicy, uptime_s: float, horizon_s: float) -> tuple[list[float], bool]:
    """A worker that dies `uptime_s` after every start, for `horizon_s`: the supervisor's delays, and whether
    it gave up."""
    crashes, delays, clock = 0, [], 0.0
    while clock < horizon_s:
        clock += uptime_s
        crashes, delay = policy.after_exit(crashes, uptime_s)
        if delay is None:
            return delays, True
        delays.append(delay)
        clock += delay
    return delays, False


def test_a_worker_dying_after_12_s_is_given_up_after_a_bounded_number_of_restarts() -> None:
    """Before: only deaths within one minute counted, so a worker dying after 12 s restarted ~200 times an hour."""
    policy = RestartPolicy()
    delays, gave_up = simulate(policy, uptime_s=12.0, horizon_s=3600.0)
    assert gave_up, f"restarted {len(delays)} times in an hour and still going"
    assert len(delays) <= 10
    assert delays[0] == 0.0  # the first crash restarts at once, as a kill -9 should
    assert all(later >= earlier * 0.6 for earlier, later in itertools.pairwise(delays[1:]))  # doubling
    assert 20.0 <= max(delays) <= 30.0, f"the backoff never reached its 30 s ceiling: {delays}"


def test_a_worker_that_stays_up_ten_minutes_starts_its_count_over_and_is_never_given_up() -> None:
    delays, gave_up = simulate(RestartPolicy(), uptime_s=601.0, horizon_s=10 * 3600.0)
    assert not gave_up and len(delays) > 50
    assert set(delays) == {0.0}, "a worker that had run for ten minutes waited for a backoff"


def test_backoff_doubles_with_jitter_up_to_the_ceiling() -> None:
    policy = RestartPolicy(first_delay_s=0.0, backoff_s=1.0, ceiling_s=30.0, max_consecutive=100)
    for crashes, base in [(2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 16.0)]:
        samples = {policy.after_exit(crashes - 1, 1.0)[1] for _ in range(50)}
        assert all(s is not None and 0.8 * base <= s <= 1.2 * base for s in samples), (crashes, samples)
        assert len(samples) > 1, "no jitter"
    assert all(policy.after_exit(20, 1.0)[1] == 30.0 for _ in range(20))


class StandInProcesses(PipelineProcesses):
    """Every worker is `python -c <script>`: the supervisor's bookkeeping without the stages."""

    script = "import sys; sys.exit(3)"

    def _start(self, label: str) -> None:
        svc = self.services[label]
        if svc.process is not None and svc.process.poll() is None:
            return
        svc.terminating = False
        svc.started_at = time.monotonic()
        svc.process = subprocess.Popen([sys.executable, "-c", self.script])


def stand_ins(tmp_path: Path, policy: RestartPolicy) -> StandInProcesses:
    config = tmp_path / "hifi.yaml"
    config.write_text(
        "tenants:\n" + tenant_block("acme", "k", ["hook"]) + 'sinks:\n  hook: {type: webhook, url: "http://x"}\n'
    )
    settings = Settings(config_path=str(config), data_dir=str(tmp_path / "data"))  # type: ignore[call-arg]
    return StandInProcesses(settings, tmp_path / "logs", supervise=True, restart_policy=policy)


def test_a_worker_stopped_after_it_crashed_is_not_restarted_behind_the_callers_back(tmp_path: Path) -> None:
    """Before: `stop` saw the process already exited and returned without marking it terminating, so the
    supervisor restarted it after the caller had stopped it."""
    pipeline = stand_ins(tmp_path, RestartPolicy(first_delay_s=0.5))
    try:
        pipeline.start_all()
        process = pipeline.services["enricher"].process
        assert process is not None
        process.wait()  # crashed; its restart is due in 0.5 s
        assert pipeline.stop("enricher") == 3
        time.sleep(1.5)  # past the planned restart: nothing else to wait on
        assert pipeline.services["enricher"].restarts == 0
        assert pipeline.services["enricher"].process is process
    finally:
        pipeline.stop_all(timeout=5.0)


def test_the_live_line_says_the_supervisor_gave_up(tmp_path: Path) -> None:
    pipeline = stand_ins(tmp_path, RestartPolicy(first_delay_s=0.0, backoff_s=0.01, ceiling_s=0.02, max_consecutive=3))
    try:
        pipeline.start_all()
        deadline = time.monotonic() + 20.0
        while not pipeline.services["router"].gave_up:
            assert time.monotonic() < deadline, pipeline.restarts()
            time.sleep(0.05)
        assert "router x3 (exit 3) GAVE UP after 4 crashes in a row" in pipeline.restarts()
    finally:
        pipeline.stop_all(timeout=5.0)


def test_a_worker_that_found_its_name_taken_is_not_restarted() -> None:
    """Exit 78: another live process holds its group.instance.id; restarting it would displace that one again
    (the two took turns until the crash bound, a duplicate window each time)."""
    policy = RestartPolicy()
    assert policy.after_exit(0, 1.0, EXIT_INSTANCE_ID_TAKEN)[1] is None
    assert policy.after_exit(0, 1.0, -9)[1] == policy.first_delay_s
