"""The results sections that `hifi bench` and `hifi chaos` rewrite in place inside the docs."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from devtools.kafka import KAFKA_VERSION


def latest_run(command: str) -> str:
    """`Latest run: <when>, <command>, on <machine>, Kafka <version>`: the opening of every results section."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"Latest run: {stamp}, `{command}`, on {os.cpu_count()} cores / {mem_gib:.0f} GiB "
        f"({platform.platform()}), Kafka {KAFKA_VERSION}"
    )


def rewrite_section(doc: Path, marker: str, body: str) -> None:
    """Replace what stands between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` in `doc` with `body`."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    head, rest = doc.read_text().split(begin, 1)
    doc.write_text(head + begin + "\n" + body + end + rest.split(end, 1)[1])
