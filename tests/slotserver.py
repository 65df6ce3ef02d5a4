"""A load tester's test server: aiohttp with a fixed number of request slots, so that the
waves a burst makes are known in advance; and routes that fail, answer fast, or stall once."""

import asyncio
import collections
import random
import threading
import time

from aiohttp import web

from greenflask import servers

BACKLOG = 4096
KNEE_WINDOW = 0.5  # seconds over which /knee measures its arrival rate


class SlotServer:
    """An HTTP server with `slots` request slots; each request holds one for ?seconds=."""

    def __init__(self, slots: int, stall_after: float = 2.0, stall_seconds: float = 1.0, knee: float = 300):
        self.slots, self.knee = slots, knee
        self._arrivals: collections.deque = collections.deque()
        self._answered = 0
        self.stall_after, self.stall_seconds = stall_after, stall_seconds
        self.stall_at, self.stalled = None, False
        self.port = servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._started = threading.Event()

    async def _sleep(self, request):
        async with self._semaphore:
            await asyncio.sleep(float(request.query.get("seconds", "0")))
        return web.json_response({"todos": []})

    async def _fail(self, request):
        return web.json_response({"error": "boom"}, status=500)

    async def _ok(self, request):
        return web.json_response({"ok": True})

    async def _stalls_once(self, request):
        """Fast, except that the first request after `stall_after` s holds the whole server
        (its event loop) for `stall_seconds`: a pause like a stop-the-world GC or a blocked loop."""
        if self.stall_at is None:
            self.stall_at = time.monotonic() + self.stall_after
        elif not self.stalled and time.monotonic() >= self.stall_at:
            self.stalled = True
            time.sleep(self.stall_seconds)  # blocks this server's loop on purpose
        return web.json_response({"ok": True})

    def _arrival_rate(self) -> float:
        now = time.monotonic()
        self._arrivals.append(now)
        while self._arrivals[0] < now - KNEE_WINDOW:
            self._arrivals.popleft()
        return len(self._arrivals) / KNEE_WINDOW

    async def _knee(self, request):
        """A server with a known capacity and a real server's kind of noise: a share of its
        answers is slow (0.2 s), 1 % at `knee` requests a second and growing steeply with
        the rate ((rate / knee)^12: 0.5 % at 0.94 x knee, 2 % at 1.06 x), so that a p99 near
        the knee comes out above or below 50 ms from one run to the next."""
        if random.random() < 0.01 * (self._arrival_rate() / self.knee) ** 12:
            await asyncio.sleep(0.2)
        return web.json_response({"ok": True})

    async def _one_in_100(self, request):
        """Every hundredth answer slow (0.2 s): a p99 on the very edge of a 50 ms SLO."""
        self._answered += 1
        if self._answered % 100 == 0:
            await asyncio.sleep(0.2)
        return web.json_response({"ok": True})

    async def _saturates(self, request):
        """Fast up to `knee` requests a second; past it every answer takes 3 s, so requests
        time out and pile up in flight: a saturated server, not a slow client."""
        if self._arrival_rate() > self.knee:
            await asyncio.sleep(3)
        return web.json_response({"ok": True})

    def _run(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._semaphore = asyncio.Semaphore(self.slots)
        app = web.Application()
        app.router.add_get("/sleep/python/", self._sleep)
        app.router.add_get("/sleep/postgres/", self._sleep)
        app.router.add_get("/healthz", self._ok)
        app.router.add_get("/fast", self._ok)
        app.router.add_get("/stalls-once", self._stalls_once)
        app.router.add_get("/fail", self._fail)
        app.router.add_get("/knee", self._knee)
        app.router.add_get("/saturates", self._saturates)
        app.router.add_get("/one-in-100", self._one_in_100)
        self._runner = web.AppRunner(app, access_log=None)  # a log line per request would slow it down
        self._loop.run_until_complete(self._runner.setup())
        # aiohttp listens with a backlog of 128: a burst of 250 connects overflows it, and the
        # kernel's SYN retransmit a second later splits the burst into two waves.
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=BACKLOG)
        self._loop.run_until_complete(site.start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
