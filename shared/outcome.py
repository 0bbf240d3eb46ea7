"""What a stage did with each event it read: the outcomes its tally counts and the auditor reconciles.

The values are the wire names in tallies (shared/audit.py); an Outcome is a `str`, so code and tallies
compare them directly. The router's filtered outcomes are built per event (`shared.audit.filtered_outcome`:
`filtered:<sink>,<sink>`), not members.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # the collector (and canaries, and replays) took it in
    OUT = "out"  # passed on to the next stage
    DUP = "dup"  # the deduplicator dropped a copy
    QUARANTINED = "quarantined"  # the deduplicator: it broke its tenant's schema (hifi.failed.<tenant>)
    UNROUTED = "unrouted"  # the router: its tenant subscribes no sink
    DELIVERED = "delivered"  # a sender: the sink acknowledged it
    SKIPPED = "skipped"  # a sender: its ledger had delivered it already
    CANARY_DROPPED = "canary_dropped"  # a sender: a canary the sink is configured not to receive
    DLQ = "dlq"  # dead-lettered (the runner's tally)
    REPLAYED = "replayed"  # `hifi replay` traffic, delivered (counted apart from live traffic)
    REPLAY_SKIPPED = "replay_skipped"  # `hifi replay` traffic the ledger had already
    REPLAY_DLQ = "replay_dlq"  # `hifi replay` traffic dead-lettered


# What a stage passed on, for `hifi trace` (everything else is a drop it explains).
PASSED = (Outcome.OUT, Outcome.DELIVERED)
# What a sender counts as delivered, and the replay outcomes kept out of live reconciliation.
DELIVERED = (Outcome.DELIVERED, Outcome.SKIPPED, Outcome.CANARY_DROPPED)
REPLAYED = (Outcome.REPLAYED, Outcome.REPLAY_SKIPPED, Outcome.REPLAY_DLQ)
