"""The collector policy every Hifi process starts its loop under (shared/gc_policy.py), in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, sys
from shared.gc_policy import apply_gc_policy
before = gc.get_threshold()
apply_gc_policy(int(sys.argv[1]))
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def _probe(threshold: int) -> dict[str, list[int] | int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_policy_raises_the_young_threshold_and_freezes_start_up() -> None:
    seen = _probe(50_000)
    assert seen["after"] == [50_000, *seen["before"][1:]], "only the young generation's threshold changes"
    assert seen["frozen"] > 1_000, "start-up's objects leave the collector's scans"


def test_zero_keeps_cpythons_collector_as_it_is() -> None:
    seen = _probe(0)
    assert seen["after"] == seen["before"]
    assert seen["frozen"] == 0


def test_the_setting_reads_its_environment_variable() -> None:
    from shared.config import Settings

    assert Settings.from_env({"HIFI_GC_YOUNG_THRESHOLD": "0"}).gc_young_threshold == 0
    assert Settings().gc_young_threshold == 50_000
