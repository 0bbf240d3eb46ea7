"""The garbage collector's policy for Hifi's processes: freeze what start-up built, and collect the young
generation after 50,000 net container allocations instead of CPython's 700.

Why: CPython starts a young collection once allocations minus deallocations of container objects pass the
threshold. A stage holding a fetched batch of a few hundred decoded events (several dicts each) passes 700
inside nearly every batch: the collection scans every live object of the batch and promotes it, every tenth
one rescans the middle generation, and the full ones walk every object start-up built (Faust, aiokafka, the
app). The larger the batches (the busier the stage), the more of this per event. Timed with `gc.callbacks`
at 3,000 events/s (hifi bench, production shape, 2026-12-01), wall time inside collections was 22 % of a
sender's CPU time, 15 % of the router's and 9 % of the deduplicator's.

What an event's objects become is freed by reference counting the moment its batch is done; they never reach
the collector. A higher threshold lets only reference cycles wait longer, at most the threshold's worth of
objects. `gc.freeze` moves start-up's objects out of every generation, so the rare full collection no longer
walks them (CPython's advice for long-running servers: https://docs.python.org/3/library/gc.html#gc.freeze).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000  # HIFI_GC_YOUNG_THRESHOLD


def apply_gc_policy(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Once start-up has imported and built what the process keeps (before its loop runs). 0: CPython's own
    thresholds, nothing frozen."""
    if young_threshold <= 0:
        return
    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
