"""`hifi up`'s supervisor on real processes: a worker killed -9 comes back by itself under its stable
name, takes its partitions back without a rebalance, and the pipeline delivers every event once (issue 15)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from devtools.pipeline import PipelineProcesses
from devtools.traffic import EventFactory
from devtools.up import status_line
from devtools.webhook import WebhookReceiver
from tests.helpers import post, wait_for, write_webhook_config


def readiness(pipeline: PipelineProcesses, label: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(pipeline.services[label].url("/ready"), timeout=1.0) as resp:
            return dict(json.loads(resp.read()))
    except OSError as exc:  # 503 while joining or restoring carries the same body
        body = getattr(exc, "read", lambda: b"{}")()
        return dict(json.loads(body or b"{}"))


async def test_a_stage_killed_9_is_restarted_by_the_supervisor_and_its_peer_is_not_rebalanced(
    tmp_path, namespace, port_base, settings_for, start_pipeline
):
    hook = WebhookReceiver(port=port_base + 19)
    await hook.start()
    config = write_webhook_config(tmp_path / "hifi.yaml", hook.port, "key-acme")
    # A session longer than a restart on a loaded machine (5 to 10 s seen at load 20): past it, the group
    # rebalances by design, static or not.
    pipeline = await start_pipeline(settings_for(config, session_timeout_s=30.0), supervise=True)
    peer = pipeline.add_worker("enricher")
    await asyncio.to_thread(pipeline.wait_ready, 120.0, [peer])
    factory = EventFactory(producer_id=f"{namespace}-acme")
    sent: list[str] = []

    async def send(batches: int) -> None:
        for _ in range(batches):
            batch = [factory.make() for _ in range(20)]
            status, body = await post(pipeline.collector_url, "key-acme", batch)
            assert status == 200, body
            sent.extend(e["event_id"] for e in batch)

    try:
        await send(5)
        await wait_for(lambda: len(hook.received) >= len(sent), 60, "the first events", pipeline)
        # Both enrichers settled: the peer's revocations from here on are the kill's.
        before = readiness(pipeline, peer)
        held = readiness(pipeline, "enricher")["partitions"]
        assert before["group_instance_id"] == "enricher-2" and held
        old_pid = pipeline.services["enricher"].process.pid  # type: ignore[union-attr]
        killed_at = time.monotonic()
        pipeline.kill("enricher")
        await send(5)  # while it is down
        await wait_for(
            lambda: pipeline.services["enricher"].restarts == 1 and pipeline.ready("enricher"),
            60,
            "the supervisor to restart the killed enricher",
            pipeline,
        )
        back_s = time.monotonic() - killed_at
        await send(5)
        await wait_for(lambda: len(hook.received) >= len(sent), 60, "every event after the restart", pipeline)
        await asyncio.sleep(2.0)  # a late copy would land here
        assert pipeline.services["enricher"].process.pid != old_pid  # type: ignore[union-attr]
        assert pipeline.services["enricher"].last_exit == -9
        assert "restarts enricher x1 (exit -9)" in status_line(pipeline, 1.0)  # `hifi up`'s live line
        after = readiness(pipeline, peer)
        assert after["revocations"] == before["revocations"], f"the restart rebalanced the peer (back in {back_s:.1f}s)"
        assert readiness(pipeline, "enricher")["partitions"] == held
        counts = Counter(e["event_id"] for e in hook.received)
        assert set(counts) == set(sent)
        assert not [e for e, n in counts.items() if n > 1]
        print(f"enricher back and ready {back_s:.1f}s after the kill")
    finally:
        await hook.stop()


@pytest.mark.parametrize("standby", [1, 0], ids=["standby-on", "standby-off"])
async def test_auto_leave_on_sigterm_a_stage_leaves_unless_its_state_has_no_warm_standby(
    tmp_path, port_base, settings_for, start_pipeline, standby
):
    """`HIFI_LEAVE_GROUP_ON_STOP=auto` through Settings and `StageRunner.attach` on real workers: the enricher
    (no state) hands its partitions over at once after its drain; so does the deduplicator (RocksDB) when its
    peer keeps warm standby copies of its stores (a takeover replays the tail). Without standbys
    (`HIFI_STANDBY_REPLICAS=0`) the deduplicator keeps its partitions for its restart, for the session (30 s)."""
    config = write_webhook_config(
        tmp_path / "hifi.yaml", port_base + 19, "key-acme", sections="dedupe: {backend: rocksdb}\n"
    )
    settings = settings_for(config, session_timeout_s=30.0, standby_replicas=standby)
    assert settings.leave_group_on_stop == "auto"
    pipeline = await start_pipeline(settings)
    peers = {stage: pipeline.add_worker(stage) for stage in ("enricher", "deduplicator")}
    await asyncio.to_thread(pipeline.wait_ready, 120.0, list(peers.values()))

    def held(label: str) -> list[int]:
        return list(readiness(pipeline, label).get("partitions", []))

    await wait_for(
        lambda: all(held(stage) and held(peer) for stage, peer in peers.items()), 60, "both workers of each", pipeline
    )
    kept = held(peers["deduplicator"])
    for stage in peers:
        assert await asyncio.to_thread(pipeline.stop, stage) == 0
    stopped_at = time.monotonic()
    await wait_for(lambda: len(held(peers["enricher"])) == 4, 15, "the enricher's partitions at its peer", pipeline)
    moved_s = time.monotonic() - stopped_at
    if standby:
        await wait_for(
            lambda: len(held(peers["deduplicator"])) == 4, 15, "the deduplicator's partitions at its peer", pipeline
        )
    else:
        await asyncio.sleep(2.0)  # a leave by the deduplicator would have moved its partitions by now
        assert held(peers["deduplicator"]) == kept, "without a standby the stateful stage left: a full restore"
    print(f"standby={standby}: the enricher's partitions moved {moved_s:.1f}s after its stop (session 30 s)")


async def test_a_second_process_under_a_workers_name_makes_one_of_them_exit_78(
    tmp_path, port_base, settings_for, start_pipeline
):
    """Review finding 4 on real processes: a copied HIFI_WORKER_ID. One of the two exits non-zero (so a
    supervisor or Kubernetes sees it), the other keeps reading every partition."""
    from shared.stage import EXIT_INSTANCE_ID_TAKEN

    config = write_webhook_config(tmp_path / "hifi.yaml", port_base + 19, "key-acme")
    pipeline = await start_pipeline(settings_for(config))
    twin = pipeline.add_worker("enricher", env={"HIFI_WORKER_ID": pipeline.worker_id("enricher")})
    pair = [pipeline.services["enricher"], pipeline.services[twin]]

    def exited() -> list[int]:
        return [svc.process.returncode for svc in pair if svc.process and svc.process.poll() is not None]

    await wait_for(lambda: exited(), 60, "one of the two enrichers under one name to exit", pipeline)
    assert exited() == [EXIT_INSTANCE_ID_TAKEN]
    survivor = next(label for label in ("enricher", twin) if pipeline.services[label].process.poll() is None)
    await wait_for(lambda: pipeline.ready(survivor), 30, "the other one ready", pipeline)
    await wait_for(lambda: len(readiness(pipeline, survivor)["partitions"]) == 4, 30, "every partition", pipeline)
    await asyncio.sleep(3.0)  # the stopped one neither rejoined nor removed the name: nothing moves
    assert len(readiness(pipeline, survivor)["partitions"]) == 4 and exited() == [EXIT_INSTANCE_ID_TAKEN]
    for svc in pair:  # the fixture's clean-stop check is for the survivor; the 78 was the point
        if svc.process is not None and svc.process.poll() is not None:
            svc.process = None


async def test_a_worker_exits_promptly_once_its_drain_is_done(tmp_path, namespace, port_base, settings_for):
    """A stateful worker keeps its partitions for its restart: they stand still from its SIGTERM until the new
    process has joined, so every second between the end of its drain and its exit is a second of stall. mode's
    Worker spent 1 to 3 s there in sleeps (a 1 s sentinel task, polling for tasks to end)."""
    config = write_webhook_config(tmp_path / "hifi.yaml", port_base + 19, "key-acme")
    pipeline = PipelineProcesses(settings_for(config, log_level="info"), tmp_path / "logs", port_base=port_base)
    try:
        pipeline.start("router")
        await asyncio.to_thread(pipeline.wait_ready, 120.0, ["router"])
        process = pipeline.services["router"].process
        assert process is not None
        pipeline.signal("router", signal.SIGTERM)
        await asyncio.to_thread(process.wait)
        exited = time.time()
    finally:
        pipeline.stop_all(timeout=30.0)
    log = pipeline.services["router"].log_path.read_text(errors="replace")
    # The drain's last step: its LeaveGroup, or (alone in its group, under auto) keeping its partitions.
    last_step = r"left group .* as router|router: no other member in group .* keeping the partitions"
    stamps = re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*(?:" + last_step + ")", log)
    assert stamps, "no end-of-drain line (leave or keep, the drain's last step) in the log:\n" + pipeline.tail("router")
    drained = datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert process.returncode == 0, pipeline.tail("router")
    assert exited - drained < 0.6, f"the worker exited {exited - drained:.2f}s after its drain was done"
