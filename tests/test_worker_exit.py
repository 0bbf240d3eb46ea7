"""How a worker process ends: a start that fails exits non-zero, so a supervisor (devtools, Kubernetes) sees it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from devtools.kafka import LocalKafka

FAILING_START = textwrap.dedent(
    """
    import faust
    from mode import Service
    from shared.service import GracefulWorker

    class BrokenAtStart(Service):
        async def on_start(self) -> None:
            raise RuntimeError("the sink refused the credentials")

    app = faust.App("exit-test", broker="kafka://{bootstrap}", web_enabled=False)
    worker = GracefulWorker(
        app, BrokenAtStart(), log_level="INFO", shutdown_grace_s=10.0, quiet=True, redirect_stdouts=False
    )
    worker.execute_from_commandline()
    """
)


def test_a_worker_whose_start_fails_exits_non_zero(kafka: LocalKafka) -> None:
    """mode stops the worker in `execute_from_commandline`'s `finally` and re-raises afterwards; the prompt exit
    after a stop (`_exit_now`) ran in between, with exit 0: a worker that never started looked like a clean stop."""
    script = FAILING_START.format(bootstrap=kafka.bootstrap)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert "the sink refused the credentials" in done.stderr, done.stderr[-3000:]
