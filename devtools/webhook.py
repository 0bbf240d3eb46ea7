"""A webhook destination for demos, tests and benchmarks: records every event it acknowledges."""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class WebhookReceiver:
    """Fault knobs: `fail_status` (+ `retry_after`) answers an error instead of acking (`fail_for` for a
    timed stretch: a 503 outage, a 401 for a revoked credential), `delay_s` slows every batch,
    `slow_event_ids` slows only batches holding those events, and `reject_event` answers
    `reject_status` (400) to any request holding an event it picks, as a sink refusing one bad event.

    A batch counts as received only if the answer can still be sent: like a sink that commits in the
    same transaction it answers from, a batch whose sender vanished mid-request (timed out, died) is not
    kept (`sender_gone`).
    """

    host: str = "127.0.0.1"
    port: int = 8800
    received: list[dict[str, Any]] = field(default_factory=list)
    arrival_ms: list[float] = field(default_factory=list)
    fail_status: int | None = None
    retry_after: float | None = None
    delay_s: float = 0.0
    slow_event_ids: set[str] = field(default_factory=set)
    slow_s: float = 5.0
    reject_event: Callable[[str], bool] | None = None
    reject_status: int = 400
    requests: int = 0
    rejected_requests: int = 0
    dropped_batches: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.fail_status is not None:
            headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
            return web.json_response({"error": "injected"}, status=self.fail_status, headers=headers)
        body = await request.json()
        events = body["events"]
        if self.reject_event is not None:
            bad = [e["event_id"] for e in events if self.reject_event(e["event_id"])]
            if bad:
                self.rejected_requests += 1
                return web.json_response({"error": "invalid event", "event_ids": bad}, status=self.reject_status)
        delay = self.delay_s
        if self.slow_event_ids and any(e["event_id"] in self.slow_event_ids for e in events):
            delay = max(delay, self.slow_s)
        if delay:
            await asyncio.sleep(delay)
        if sender_gone(request):
            self.dropped_batches += 1
            raise ConnectionResetError("sender went away before the ack")
        now = time.time() * 1000
        for event in events:
            self.received.append(event)
            self.arrival_ms.append(now)
        return web.json_response({"ok": len(events)})

    async def fail_for(self, status: int, seconds: float, retry_after: float | None = None) -> None:
        """Answer `status` to every request for `seconds`, then ack again."""
        self.fail_status, self.retry_after = status, retry_after
        try:
            await asyncio.sleep(seconds)
        finally:
            self.fail_status, self.retry_after = None, None

    def counts(self) -> Counter[str]:
        return Counter(e["idempotency_key"] for e in self.received)


def sender_gone(request: web.Request) -> bool:
    """The sender hung up on this request. Asked of the socket itself: a receiver whose loop lags (the chaos
    process stalled 8-13 s at 1,000 events/s) reads a stale request before the FIN behind it, so aiohttp's
    transport still looks open, and a batch the sender timed out on and re-sent would be kept twice."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as peek:  # a dup: closing it keeps the connection
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""  # EOF: the sender closed
    except BlockingIOError:
        return False  # nothing after the request: its sender waits for the answer
    except OSError:
        return True  # reset: the sender is gone


def one_in(n: int) -> Callable[[str], bool]:
    """Picks about one event id in `n`, the same ones on every run and in every process (not `hash`)."""
    return lambda event_id: zlib.crc32(event_id.encode()) % n == 0


def serve_forever(host: str, port: int) -> None:
    """`hifi demo-sink`: print what arrives every 5 s until SIGTERM/Ctrl-C."""
    import asyncio
    import signal

    async def main() -> None:
        receiver = WebhookReceiver(host=host, port=port)
        await receiver.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"demo sink listening on http://{host}:{port}/", flush=True)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 5.0)
            except TimeoutError:
                counts = receiver.counts()
                dupes = sum(n - 1 for n in counts.values() if n > 1)
                print(
                    f"received {len(receiver.received)} events ({len(counts)} distinct, {dupes} repeated)", flush=True
                )
        await receiver.stop()

    asyncio.run(main())
