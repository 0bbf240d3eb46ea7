"""The chaos results table, printed and written into docs/RELIABILITY.md between the chaos markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devtools.docsection import latest_run, rewrite_section


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| # | scenario | accepted | delivered (faulted / healthy) | missing | duplicates | dead-lettered / expected "
        "| recovery s | healthy on-time during fault | late s (healthy, whole run) | result |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        on_time = r.get("healthy_on_time_during_fault")
        window = " (sender kill window)" if r["duplicates"] and not r["duplicates_unexplained"] else ""
        rows.append(
            f"| {r['number']} | {r['scenario']} | {r['accepted']} "
            f"| {r['faulted_delivered']} / {r['healthy_delivered']} "
            f"| {r['missing']} | {r['duplicates']}{window} "
            f"| {r['dead_lettered']} / {r['dead_letters_expected']} | {r['recovery_s']} "
            f"| {'n/a' if on_time is None else f'{on_time * 100:.2f} %'} | {r.get('late_event_seconds', 'n/a')} "
            f"| {'pass' if r['passed'] else 'FAIL'} |"
        )
    return head + "\n".join(rows) + "\n"


def write_doc(doc: Path, table: str, command: str) -> None:
    """Replace the results section of docs/RELIABILITY.md (between the chaos markers)."""
    rewrite_section(doc, "chaos", f"{latest_run(command)}, everything on one machine.\n\n{table}")
