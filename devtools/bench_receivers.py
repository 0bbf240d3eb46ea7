"""The bench's sinks (the webhook receiver and the file tail) in a process of their own.

In the load generator's process, a receiver answered a webhook batch only between the load's own
callbacks, so every system's webhook latency included the client's work: a real destination runs
elsewhere. Here the receivers get their own event loop and core share; the parent reads their progress
during the drain and their ground truth (latencies, copies, stage lags) once they stop.

Run by `RemoteSinks`; `python -m devtools.bench_receivers <hook port> <control port> [file path]`.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from hdrh.histogram import HdrHistogram

from devtools.bench_measure import BenchSink, FileTail, SinkTruth

START_TIMEOUT_S = 30.0


def truth_to_wire(truth: SinkTruth) -> dict[str, Any]:
    return {
        "histogram": truth.histogram.encode(),
        "stage_lag": {stage: hist.encode() for stage, hist in truth.stage_lag.items()},
        "seen": truth.seen,
        "on_time": truth.on_time,
        "warmup_histogram": truth.warmup_histogram.encode(),
        "warmup_on_time": truth.warmup_on_time,
    }


def truth_from_wire(wire: dict[str, Any]) -> SinkTruth:
    return SinkTruth(
        histogram=HdrHistogram.decode(wire["histogram"]),
        stage_lag={stage: HdrHistogram.decode(encoded) for stage, encoded in wire["stage_lag"].items()},
        seen=wire["seen"],
        on_time=wire["on_time"],
        warmup_histogram=HdrHistogram.decode(wire["warmup_histogram"]),
        warmup_on_time=wire["warmup_on_time"],
    )


@dataclass
class RemoteSinks:
    """The parent's handle on the receivers' process: start, drain progress, and the truths at stop."""

    hook_port: int
    control_port: int
    file_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def names(self) -> list[str]:
        return ["hook", "files"] if self.file_path is not None else ["hook"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def spawn(self) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "devtools.bench_receivers", str(self.hook_port), str(self.control_port)]
        return subprocess.Popen(args + ([str(self.file_path)] if self.file_path is not None else []))

    async def start(self) -> None:
        self.process = self.spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the bench's receivers exited with {self.process.returncode} at start")
                try:
                    async with session.get(f"{self.url}/progress") as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"the bench's receivers did not answer within {START_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.2)

    async def expect(self, accepted: set[str]) -> None:
        """The ids the collector accepted: the drain's progress counts the sinks against them."""
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/accepted", data=msgspec.msgpack.encode(sorted(accepted))) as resp:
                resp.raise_for_status()

    async def progress(self) -> tuple[int, bool]:
        """Events received over every sink, and whether every accepted event reached every sink."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{self.url}/progress") as resp:
                resp.raise_for_status()
                body = msgspec.msgpack.decode(await resp.read())
        return body["received"], body["complete"]

    async def stop(self) -> dict[str, SinkTruth]:
        """Stop the receivers (the file tail reads what arrived since its last poll) and return their truths."""
        assert self.process is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(f"{self.url}/stop") as resp:
                resp.raise_for_status()
                wire = msgspec.msgpack.decode(await resp.read())
        await asyncio.to_thread(self.process.wait, 30)
        return {name: truth_from_wire(truth) for name, truth in wire.items()}

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def serve(hook_port: int, control_port: int, file_path: Path | None) -> None:
    truths: dict[str, SinkTruth] = {"hook": BenchSink(port=hook_port)}
    if file_path is not None:
        truths["files"] = FileTail(path=file_path)
    accepted: set[str] = set()
    told = asyncio.Event()  # /accepted arrived: before it, nothing is complete (a run may accept no event)
    done = asyncio.Event()
    stopped: dict[str, Any] = {}

    async def set_accepted(request: web.Request) -> web.Response:
        accepted.update(msgspec.msgpack.decode(await request.read()))
        told.set()
        return web.Response()

    async def progress(request: web.Request) -> web.Response:
        complete = told.is_set() and all(accepted <= t.seen.keys() for t in truths.values())
        body = {"received": sum(len(t.seen) for t in truths.values()), "complete": complete}
        return web.Response(body=msgspec.msgpack.encode(body))

    async def stop(request: web.Request) -> web.Response:
        if not stopped:
            for truth in truths.values():
                await truth.stop()
            stopped.update({name: truth_to_wire(truth) for name, truth in truths.items()})
        done.set()
        return web.Response(body=msgspec.msgpack.encode(stopped))

    for truth in truths.values():
        await truth.start()
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/accepted", set_accepted)
    app.router.add_get("/progress", progress)
    app.router.add_post("/stop", stop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    await asyncio.sleep(0.2)  # the answer to /stop leaves before the server closes
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None))
