"""Static group membership (KIP-345) where aiokafka 0.14 stops short.

Removing a static member that will not come back: a static member sends no LeaveGroup when it closes
(aiokafka skips it when `group_instance_id` is set), so its partitions would wait out its session. aiokafka
has no `remove_members_from_consumer_group`; this is its request, LeaveGroup v3 by `group.instance.id`, as
Kafka's own AdminClient sends it.

Finding who holds an instance id: aiokafka's heartbeat (v0/v1) carries no instance id, so a member displaced
by another live process with the same id is told UnknownMemberId (not FencedInstanceId, which aiokafka does
not know either) and rejoins, displacing the other in turn. DescribeGroups v4 names each member's instance id,
which tells a displaced member from one whose session merely expired.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, OffsetAndMetadata, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    BrokerResponseError,
    GroupCoordinatorNotAvailableError,
    KafkaError,
    NotCoordinatorForGroupError,
    for_code,
    kafka_errors,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.commit import OffsetFetchRequest
from aiokafka.protocol.types import Array, Boolean, Bytes, Int16, Int32, Schema, String

from shared.errors import HifiError
from shared.retry import Backoff

log = logging.getLogger(__name__)

UNKNOWN_MEMBER_ID = ""  # the broker finds the member by its instance id


class LeaveGroupResponse_v3(Response):
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")), ("error_code", Int16)),
        ),
    )


class LeaveGroupRequest_v3(RequestStruct):
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = LeaveGroupResponse_v3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class RemoveStaticMembers(Request[LeaveGroupRequest_v3]):
    API_KEY = 13

    def __init__(self, group: str, instance_ids: list[str]) -> None:
        self.group = group
        self.instance_ids = instance_ids

    def build(self, request_struct_class: type[LeaveGroupRequest_v3]) -> LeaveGroupRequest_v3:
        return request_struct_class(self.group, [(UNKNOWN_MEMBER_ID, i) for i in self.instance_ids])


class FencedInstanceIdError(BrokerResponseError):
    """Error 82: another member joined with this `group.instance.id` (aiokafka 0.14 reports UnknownError)."""

    errno = 82
    message = "FENCED_INSTANCE_ID"
    description = "another consumer with the same group.instance.id has registered with a different member.id"


kafka_errors.setdefault(FencedInstanceIdError.errno, FencedInstanceIdError)  # so aiokafka's errors name it


def fenced(error: BaseException) -> bool:
    """A Kafka error that says this member's instance id was taken (aiokafka wraps JoinGroup's and SyncGroup's)."""
    return isinstance(error, FencedInstanceIdError) or FencedInstanceIdError.__name__ in str(error)


class InstanceIdTaken(HifiError):
    """Another live process is a member of the group under this worker's `group.instance.id`: two workers
    configured with one id (a copied HIFI_WORKER_ID, two pods with one name). Both would read the same
    partitions, so this one stops."""

    def __init__(self, group: str, instance_id: str, evidence: str) -> None:
        super().__init__(f"group {group!r}: instance id {instance_id!r} is taken by another live member ({evidence})")
        self.group, self.instance_id, self.evidence = group, instance_id, evidence


class DescribeGroupsResponse_v4(Response):
    API_KEY = 15
    API_VERSION = 4
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "groups",
            Array(
                ("error_code", Int16),
                ("group", String("utf-8")),
                ("state", String("utf-8")),
                ("protocol_type", String("utf-8")),
                ("protocol", String("utf-8")),
                (
                    "members",
                    Array(
                        ("member_id", String("utf-8")),
                        ("group_instance_id", String("utf-8")),
                        ("client_id", String("utf-8")),
                        ("client_host", String("utf-8")),
                        ("member_metadata", Bytes),
                        ("member_assignment", Bytes),
                    ),
                ),
                ("authorized_operations", Int32),
            ),
        ),
    )


class DescribeGroupsRequest_v4(RequestStruct):
    API_KEY = 15
    API_VERSION = 4
    RESPONSE_TYPE = DescribeGroupsResponse_v4
    SCHEMA = Schema(("groups", Array(String("utf-8"))), ("include_authorized_operations", Boolean))


class DescribeGroupMembers(Request[DescribeGroupsRequest_v4]):
    API_KEY = 15

    def __init__(self, group: str) -> None:
        self.group = group

    def build(self, request_struct_class: type[DescribeGroupsRequest_v4]) -> DescribeGroupsRequest_v4:
        return request_struct_class([self.group], False)


async def members_with_instance_id(bootstrap: str, group: str, instance_id: str) -> list[str]:
    """The member ids the coordinator holds under `instance_id` in `group` now (none, or one)."""
    return [member_id for member_id, held_by in await group_members(bootstrap, group) if held_by == instance_id]


async def group_members(bootstrap: str, group: str) -> list[tuple[str, str]]:
    """(member id, instance id: "" for a dynamic member) of each member the coordinator holds in `group` now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        coordinator = await admin.find_coordinator(group)
        response = await admin._send_request(DescribeGroupMembers(group), coordinator)
    finally:
        await admin.close()
    (code, _group, _state, _type, _protocol, members, _ops) = response.groups[0]
    if code:
        raise for_code(code)(f"describing group {group!r}")
    return [(member_id, held_by or "") for member_id, held_by, *_ in members]


class MemberRemovalFailed(HifiError):
    """The coordinator refused to remove a static member (the group or the member is unknown, ...)."""

    def __init__(self, group: str, instance_id: str, error: str) -> None:
        super().__init__(f"removing {instance_id!r} from group {group!r}: {error}")
        self.group, self.instance_id, self.error = group, instance_id, error


async def remove_static_members(bootstrap: str, group: str, instance_ids: list[str]) -> None:
    """Take these static members out of `group` now, so their partitions move at once (one rebalance)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        coordinator = await admin.find_coordinator(group)
        response = await admin._send_request(RemoveStaticMembers(group, instance_ids), coordinator)
    finally:
        await admin.close()
    if response.error_code:
        raise MemberRemovalFailed(group, ",".join(instance_ids), for_code(response.error_code).__name__)
    for _member_id, instance_id, code in response.members:
        if code:
            raise MemberRemovalFailed(group, instance_id, for_code(code).__name__)


# -- aiokafka's group coordinator: what it does not expose publicly ----------------------------------------


def coordinator_member_id(consumer: AIOKafkaConsumer | None) -> str:
    """The member id the group coordinator gave this consumer, UNKNOWN_MEMBER_ID if none or reset."""
    # aiokafka exposes neither the member id nor its reset on UnknownMemberId: read its coordinator's.
    coordinator = getattr(consumer, "_coordinator", None)
    return str(getattr(coordinator, "member_id", UNKNOWN_MEMBER_ID) or UNKNOWN_MEMBER_ID)


def coordinator_generation(consumer: AIOKafkaConsumer | None) -> int:
    """The group generation of this consumer's last join, -1 if none or reset (aiokafka does not expose it)."""
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", -1)
    return generation if isinstance(generation, int) else -1


NOT_COMMITTED = -1  # OffsetFetch's offset of a partition the group never committed
OFFSET_FETCH_BACKOFF = Backoff(0.1, 1.0)


class CommittedOffsetsUnknown(HifiError):
    """The coordinator did not tell these partitions' committed offsets in the time allowed (it moved, or is
    still loading the group's offsets): reading them from the reset policy's start would replay the log."""

    def __init__(self, group: str, partitions: set[TopicPartition], error: str) -> None:
        names = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))
        super().__init__(f"group {group!r}: committed offsets of {names} unknown: {error}")
        self.group, self.partitions, self.error = group, partitions, error


async def committed_offsets(
    consumer: AIOKafkaConsumer, partitions: set[TopicPartition], within_s: float
) -> tuple[dict[TopicPartition, int], CommittedOffsetsUnknown | None]:
    """The group's committed offsets of `partitions`, `NOT_COMMITTED` for one never committed, each verified: a
    partition is only in the answer once the coordinator named it without an error.

    aiokafka's own fetch reads neither OffsetFetch v2+'s top-level error (a coordinator moving or loading sends
    that, and no partitions) nor a missing partition: both came back as "never committed", and the reset policy
    replayed the log. Retried here (backoff, jitter) for up to `within_s`, each partition on its own; what is
    still unknown then comes back as the error, with the offsets that are known."""
    coordinator = consumer._coordinator
    group = str(coordinator.group_id)
    deadline = time.monotonic() + within_s
    known: dict[TopicPartition, int] = {}
    attempt = 0
    while True:
        wanted = partitions - known.keys()
        if not wanted:
            return known, None
        try:
            error = await asyncio.wait_for(
                _fetch_committed(coordinator, wanted, known), max(0.1, deadline - time.monotonic())
            )
        except (TimeoutError, KafkaError) as exc:  # no coordinator found, a connection lost, ...
            error = repr(exc)
        if error is None:
            continue
        attempt += 1
        delay = OFFSET_FETCH_BACKOFF.delay(attempt)
        if time.monotonic() + delay >= deadline:
            return known, CommittedOffsetsUnknown(group, partitions - known.keys(), error)
        log.info("group %s: committed offsets not told (%s); asking again in %.2fs", group, error, delay)
        await asyncio.sleep(delay)


async def _fetch_committed(
    coordinator: Any, wanted: set[TopicPartition], known: dict[TopicPartition, int]
) -> str | None:
    """One OffsetFetch of `wanted` into `known` (the partitions it named without an error); what went wrong, if
    anything was not told."""
    await coordinator.ensure_coordinator_known()
    by_topic: dict[str, list[int]] = {}
    for tp in sorted(wanted):
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    response = await coordinator._send_req(OffsetFetchRequest(coordinator.group_id, list(by_topic.items())))
    top_level = getattr(response, "error_code", 0)  # v2+
    if top_level:
        return _coordinator_error(coordinator, top_level)
    errors: list[str] = []
    for topic, answers in response.topics:
        for partition, offset, _metadata, code in answers:
            tp = TopicPartition(topic, partition)
            if tp not in wanted:
                continue
            if code:
                errors.append(f"{topic}[{partition}]: {_coordinator_error(coordinator, code)}")
            else:
                known[tp] = offset if offset >= 0 else NOT_COMMITTED
    missing = wanted - known.keys() - {TopicPartition(t, p) for t, ps in response.topics for p, *_ in ps}
    if missing:
        errors.append(f"{len(missing)} partitions missing from the answer")
    return "; ".join(errors) or None


def _coordinator_error(coordinator: Any, code: int) -> str:
    """The error's name; a coordinator that moved is looked up again before the next attempt."""
    error = for_code(code)
    if error is NotCoordinatorForGroupError or error is GroupCoordinatorNotAvailableError:
        coordinator.coordinator_dead()
    return str(error.__name__)


def start_at_reset_policy(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    """Read `partitions` (never committed) from the consumer's `auto_offset_reset` start, found in the background:
    `seek_to_beginning` would wait for it, in an assign callback that sends no heartbeats."""
    fetcher = consumer._fetcher
    fetcher.request_offset_reset(partitions, fetcher._default_reset_strategy)  # its future: the position found


def settle_position_lookups(consumer: AIOKafkaConsumer, starts: dict[TopicPartition, int]) -> None:
    """Answer aiokafka's pending position lookups of partitions this worker has placed itself (sought, or sent
    to the reset policy's start), with their verified commit or `NOT_COMMITTED`.

    aiokafka looks positions up one partition after another in one task per broker, and sends that broker no
    fetch meanwhile; its lookup of a partition the coordinator keeps failing for would hold every other partition
    of the broker. The answer is not used: the lookup skips a partition that has a position once it is told."""
    subscription = consumer._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    if assignment is None:
        return
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state is not None and (state.has_valid_position or state.awaiting_reset):
            state.update_committed(OffsetAndMetadata(starts.get(tp, NOT_COMMITTED), ""))


def request_rejoin(consumer: AIOKafkaConsumer) -> None:
    """Ask the group coordinator for a rebalance, keeping the subscription."""
    # aiokafka has no public rejoin: re-subscribing would drop the assignment without the revoke callback.
    consumer._coordinator.request_rejoin()


# -- a worker whose instance id another process holds -------------------------------------------------------

EXIT_INSTANCE_ID_TAKEN = 78  # EX_CONFIG: two workers configured with one id; restarting one does not fix it
_requested_exit_code = 0


def request_exit(code: int) -> None:
    """Drain and exit the worker process with `code` (non-zero: its supervisor or Kubernetes sees a failure)."""
    global _requested_exit_code
    _requested_exit_code = _requested_exit_code or code
    os.kill(os.getpid(), signal.SIGTERM)


def requested_exit_code() -> int:
    """The exit code a stage asked for (`request_exit`), 0 if none: `shared.service.run` exits with it."""
    return _requested_exit_code
