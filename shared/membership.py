"""Removing a static group member (KIP-345) that will not come back: a static member sends no
LeaveGroup when it closes (aiokafka skips it when `group_instance_id` is set), so its partitions would
wait out its session. aiokafka has no `remove_members_from_consumer_group`; this is its request, LeaveGroup
v3 by `group.instance.id`, as Kafka's own AdminClient sends it."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String

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
