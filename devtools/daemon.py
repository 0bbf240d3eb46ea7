"""A local server process the dev tools start: spawned in its own session with its log and pid file,
awaited until it answers, and stopped by pid even from another `hifi` invocation."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def spawn(argv: list[str], log_path: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    """Start `argv` detached from our terminal (Ctrl-C goes to us, not it), its output to `log_path`."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pid_file.write_text(str(process.pid))
    return process


def await_answer(
    process: subprocess.Popen[bytes], answering: Callable[[], bool], timeout: float, poll_s: float
) -> bool:
    """True once `answering()` is; False if the process exited first or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answering():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll_s)
    return False


def stop(
    process: subprocess.Popen[bytes] | None, pid_file: Path, sig: int = signal.SIGTERM, wait_s: float = 10.0
) -> None:
    """Signal the server we started (this process's handle, else the pid file's) and wait for it to exit."""
    pid = process.pid if process is not None else None
    if pid is None and pid_file.exists():
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            pid = None
    if pid is not None:
        try:
            os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if process is not None:
                    if process.poll() is not None:
                        break
                else:
                    os.kill(pid, 0)  # raises once it is gone
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                if process is not None:
                    process.wait()
        except ProcessLookupError:
            pass
    pid_file.unlink(missing_ok=True)
