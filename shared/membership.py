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

import os
import signal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import BrokerResponseError, for_code, kafka_errors
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Bytes, Int16, Int32, Schema, String

from shared.errors import HifiError

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
    return [member_id for member_id, held_by, *_ in members if held_by == instance_id]


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


async def committed_offsets(consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets of `partitions` in one OffsetFetch (`consumer.committed` asks per partition,
    one round trip each while the assignment callback holds up reading); partitions never committed are left out."""
    fetched = await consumer._coordinator.fetch_committed_offsets(list(partitions))
    return {tp: meta.offset for tp, meta in fetched.items() if meta.offset >= 0}


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
