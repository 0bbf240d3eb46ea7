"""Static group membership against the real broker: a worker back under its name takes its partitions back
without a rebalance, so its peers go on reading (issue 15)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.protocol.group import JoinGroupRequest

from devtools.kafka import LocalKafka
from shared.membership import UNKNOWN_MEMBER_ID, MemberRemovalFailed, remove_static_members
from shared.stage import StageRunner
from tests.test_stage_runner import FlakySink, create_topic, make_runner, produce_events, runners, start, wait_for

pytestmark = pytest.mark.asyncio
__all__ = ["runners"]  # the fixture, imported for this module's tests
STATIC_OPTIONS: dict[str, Any] = dict(batch_max=50, session_timeout_ms=10_000)


async def two_static_members(
    kafka: LocalKafka,
    runners: list[StageRunner],
    group: str,
    source: str,
    sink: FlakySink,
    partitions: int,
    first_leaves_on_stop: bool,
) -> tuple[StageRunner, StageRunner]:
    """Members "w-1" and "w-2" of one group, sharing the source's partitions; how "w-1" stops is configured."""
    first = make_runner(
        kafka.bootstrap,
        group,
        "a",
        source,
        sink.handle,
        group_instance_id="w-1",
        leave_group_on_stop=first_leaves_on_stop,
        **STATIC_OPTIONS,
    )
    await start(runners, first)
    second = await start(
        runners,
        make_runner(kafka.bootstrap, group, "b", source, sink.handle, group_instance_id="w-2", **STATIC_OPTIONS),
    )
    await wait_for(
        lambda: (
            first.joined
            and second.joined
            and len(first.assigned | second.assigned) == partitions
            and not first.assigned & second.assigned
        ),
        30,
        "two members sharing the partitions",
    )
    return first, second


async def test_a_worker_restarted_under_its_name_takes_its_partitions_back_without_a_rebalance(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    source = f"{namespace}.static"
    await create_topic(kafka.bootstrap, source, 6)
    sink = FlakySink()
    group = f"{namespace}-static"
    first, second = await two_static_members(kafka, runners, group, source, sink, 6, False)
    ids = await produce_events(kafka.bootstrap, source, 200)
    await wait_for(lambda: set(sink.received) >= set(ids), 30, "the first events at the sink")
    held = {tp.partition for tp in first.assigned}
    revocations = second.revocations
    await first.stop()  # a static member sends no LeaveGroup: the group does not move
    runners.remove(first)
    restarted_at = time.monotonic()
    again = await start(
        runners,
        make_runner(kafka.bootstrap, group, "a2", source, sink.handle, group_instance_id="w-1", **STATIC_OPTIONS),
    )
    await wait_for(lambda: again.joined, 30, "the restarted worker's assignment")
    back_s = time.monotonic() - restarted_at
    more = await produce_events(kafka.bootstrap, source, 200, first=200)
    await wait_for(lambda: set(sink.received) >= set(more), 30, "every event after the restart")
    await asyncio.sleep(1.0)  # a rebalance started by the rejoin would revoke here
    assert second.revocations == revocations, "the other member was revoked: the restart rebalanced the group"
    assert {tp.partition for tp in again.assigned} == held
    assert back_s < 5.0, f"the restarted worker waited {back_s:.1f}s for its partitions"


async def test_a_static_member_removed_after_its_stop_hands_its_partitions_over_at_once(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """Scale-in: a static member sends no LeaveGroup, so without a removal its partitions wait out its session."""
    source = f"{namespace}.leave"
    await create_topic(kafka.bootstrap, source, 6)
    sink = FlakySink()
    group = f"{namespace}-leave"
    first, second = await two_static_members(kafka, runners, group, source, sink, 6, False)
    await first.stop()
    runners.remove(first)
    stopped_at = time.monotonic()
    await remove_static_members(kafka.bootstrap, group, ["w-1"])
    await wait_for(lambda: second.joined and len(second.assigned) == 6, 30, "every partition at the other member")
    moved_s = time.monotonic() - stopped_at
    ids = await produce_events(kafka.bootstrap, source, 100)
    await wait_for(lambda: set(sink.received) >= set(ids), 30, "every event")
    assert moved_s < 5.0, f"the partitions moved {moved_s:.1f}s after the stop (the session is 10 s)"
    with pytest.raises(MemberRemovalFailed):
        await remove_static_members(kafka.bootstrap, group, ["w-1"])  # already gone: refused, typed


@pytest.mark.parametrize("leaves", [True, False], ids=["leaves", "keeps-its-partitions"])
async def test_a_static_member_stopped_leaves_or_keeps_its_partitions_as_configured(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner], leaves: bool
) -> None:
    source = f"{namespace}.stop"
    await create_topic(kafka.bootstrap, source, 4)
    sink = FlakySink()
    group = f"{namespace}-stop"
    first, second = await two_static_members(kafka, runners, group, source, sink, 4, leaves)
    held = len(second.assigned)
    await first.stop()
    runners.remove(first)
    stopped_at = time.monotonic()
    await asyncio.sleep(4.0)  # well past a rebalance after a leave, well within the 10 s session
    assert len(second.assigned) == (4 if leaves else held)
    if not leaves:  # what keeping costs when the member does not come back: its partitions wait out the session
        await wait_for(lambda: len(second.assigned) == 4, 30, "the session to expire and the partitions to move")
        stalled_s = time.monotonic() - stopped_at
        print(f"a static member that kept its partitions and did not return stalled them {stalled_s:.1f}s")
        assert 9.0 <= stalled_s < 20.0, f"stalled {stalled_s:.1f}s with a 10 s session"


async def test_two_live_workers_under_one_instance_id_one_stops_and_the_sink_sees_no_duplicates(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """Review finding 4: aiokafka's v0/v1 heartbeat carries no instance id, so a displaced static member is told
    UnknownMemberId, rejoins under the same id and displaces the other: both fetch and deliver, for ever."""
    source = f"{namespace}.twins"
    await create_topic(kafka.bootstrap, source, 6)
    sink = FlakySink()
    group = f"{namespace}-twins"
    options = dict(STATIC_OPTIONS, group_instance_id="w-1")
    shutdowns: dict[str, int] = {}
    first = make_runner(kafka.bootstrap, group, "a", source, sink.handle, **options)
    first.request_shutdown = lambda code: shutdowns.setdefault("a", code)
    await start(runners, first)
    await wait_for(lambda: first.joined and len(first.assigned) == 6, 30, "the first worker's assignment")
    ids = await produce_events(kafka.bootstrap, source, 200)
    await wait_for(lambda: set(sink.received) >= set(ids), 30, "the first events at the sink")
    second = make_runner(kafka.bootstrap, group, "b", source, sink.handle, **options)
    second.request_shutdown = lambda code: shutdowns.setdefault("b", code)
    await start(runners, second)
    await wait_for(lambda: bool(shutdowns), 30, "one of the two workers to give its instance id up (a session after)")
    assert len(shutdowns) == 1 and next(iter(shutdowns.values())) != 0, shutdowns
    stopped = first if "a" in shutdowns else second
    survivor = second if stopped is first else first
    assert stopped.fenced is not None and survivor.fenced is None
    await wait_for(lambda: survivor.joined and len(survivor.assigned) == 6, 30, "every partition at the survivor")
    revocations = survivor.revocations
    await asyncio.wait_for(stopped.stop(), 20.0)  # what its SIGTERM does: no rejoin, no removal of the id
    runners.remove(stopped)
    more = await produce_events(kafka.bootstrap, source, 600, first=200)
    await wait_for(lambda: set(sink.received) >= set(more), 30, "every event after the fence")
    await asyncio.sleep(3.0)  # a second deliverer would land its copies here (several heartbeats)
    assert not shutdowns.keys() - {"a" if stopped is first else "b"}, f"both stopped: {shutdowns}"
    assert survivor.revocations == revocations and len(survivor.assigned) == 6, "the stopped worker displaced it"
    duplicated = [e for e, n in sink.received.items() if n > 1 and e in set(more)]
    assert not duplicated, f"{len(duplicated)} events delivered twice after the fence"


async def join_without_sync(bootstrap: str, group: str, instance_id: str, topic: str, session_ms: int) -> str:
    """A JoinGroup under `instance_id` that never syncs nor heartbeats: the member a process leaves behind when
    the coordinator moves between its JoinGroup and SyncGroup. The coordinator holds it until its session ends."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        coordinator = await admin.find_coordinator(group)
        metadata = ConsumerProtocolMemberMetadata(0, [topic], b"").encode()
        request = JoinGroupRequest(
            group, session_ms, 30_000, UNKNOWN_MEMBER_ID, instance_id, "consumer", [("roundrobin", metadata)]
        )
        response = await admin._send_request(request, coordinator)
    finally:
        await admin.close()
    assert response.error_code == 0, response
    return str(response.member_id)


async def test_a_dead_holder_of_the_instance_id_is_waited_out_not_taken_for_a_live_twin(
    kafka: LocalKafka, namespace: str, runners: list[StageRunner]
) -> None:
    """The instance-id check described the group once: a member id left under this worker's name by a join that
    never completed (no process behind it) looked like a live twin, and the worker exited 78 for nothing."""
    source = f"{namespace}.orphan"
    await create_topic(kafka.bootstrap, source, 4)
    sink = FlakySink()
    group = f"{namespace}-orphan"
    shutdowns: list[int] = []
    worker = make_runner(kafka.bootstrap, group, "a", source, sink.handle, group_instance_id="w-1", **STATIC_OPTIONS)
    worker.request_shutdown = shutdowns.append
    await start(runners, worker)
    await wait_for(lambda: worker.joined and len(worker.assigned) == 4, 30, "the worker's assignment")
    revocations = worker.revocations
    orphan = await join_without_sync(kafka.bootstrap, group, "w-1", source, session_ms=3_000)
    await wait_for(lambda: worker.revocations > revocations or bool(shutdowns), 15, "the worker told it was displaced")
    ids = await produce_events(kafka.bootstrap, source, 200)
    await wait_for(lambda: bool(shutdowns) or set(sink.received) >= set(ids), 40, "the events, or an exit")
    assert not shutdowns, f"the worker took the dead member {orphan} for a live one and exited {shutdowns}"
    assert worker.fenced is None and set(sink.received) >= set(ids), "the worker did not read again after the orphan"


@pytest.mark.parametrize("holders_after_the_wait", [["x"], []], ids=["holder-still-there", "holder-gone"])
async def test_a_stop_during_the_instance_id_wait_is_a_stop_not_a_fence_nor_a_rejoin(
    monkeypatch: pytest.MonkeyPatch, holders_after_the_wait: list[str]
) -> None:
    """SIGTERM while the worker waits a session to see whether its id's holder is live: `on_stop` releases the
    wait, which looked the holder up again: still listed (it is dead, not yet expired), the plain stop became
    exit 78 and a CRITICAL; gone, the worker rejoined while stopping."""
    answers = iter([["x"], holders_after_the_wait])

    async def members_with_instance_id(bootstrap: str, group: str, instance_id: str) -> list[str]:
        return next(answers)

    monkeypatch.setattr("shared.rebalance.members_with_instance_id", members_with_instance_id)
    worker = make_runner("127.0.0.1:9", "g", "a", "src", FlakySink().handle, group_instance_id="w-1", **STATIC_OPTIONS)
    shutdowns: list[int] = []
    worker.request_shutdown = shutdowns.append
    worker._member_id = "previous"  # joined once; aiokafka (no consumer here) reads as having reset its id
    hold = asyncio.create_task(worker._hold_rejoin_if_instance_id_taken())
    await wait_for(lambda: worker._rejoin_held is not None, 5, "the rejoin held")
    await asyncio.sleep(0.1)  # in the session-long wait
    await asyncio.wait_for(worker._release_held_rejoin(), 5)
    with pytest.raises(asyncio.CancelledError):  # aiokafka's coordinator task ends without a JoinGroup
        await hold
    assert worker.fenced is None and not shutdowns, f"a plain stop fenced the worker (exit {shutdowns})"


async def test_a_stop_during_the_second_instance_id_lookup_is_a_stop_not_a_fence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while the worker looks its id's holder up again after the session-long wait (up to 5 s): the
    holder still listed then, the plain stop became exit 78 and a CRITICAL."""
    worker = make_runner("127.0.0.1:9", "g", "a", "src", FlakySink().handle, group_instance_id="w-1", **STATIC_OPTIONS)
    worker.session_timeout_ms = 200  # the session-long wait ends on its own, quickly
    releases: list[asyncio.Task[None]] = []
    lookups = 0

    async def members_with_instance_id(bootstrap: str, group: str, instance_id: str) -> list[str]:
        nonlocal lookups
        lookups += 1
        if lookups == 2:  # after the session-long wait: SIGTERM's `on_stop` releases the rejoin meanwhile
            releases.append(asyncio.create_task(worker._release_held_rejoin()))
            await asyncio.sleep(0)
        return ["x"]  # still listed: dead, its session not expired yet

    monkeypatch.setattr("shared.rebalance.members_with_instance_id", members_with_instance_id)
    shutdowns: list[int] = []
    worker.request_shutdown = shutdowns.append
    worker._member_id = "previous"  # joined once; aiokafka (no consumer here) reads as having reset its id
    hold = asyncio.create_task(worker._hold_rejoin_if_instance_id_taken())
    with pytest.raises(asyncio.CancelledError):  # aiokafka's coordinator task ends without a JoinGroup
        await asyncio.wait_for(hold, 5)
    await asyncio.wait_for(releases[0], 5)
    assert worker.fenced is None and not shutdowns, f"a stop during the second lookup fenced the worker {shutdowns}"
