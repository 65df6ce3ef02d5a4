"""A load tester's test server: aiohttp with a fixed number of request slots, so that the
waves a burst makes are known in advance; and routes that fail, answer fast, or stall once."""

import asyncio
import collections
import threading
import time

from aiohttp import web

from greenflask import servers

KNEE_WINDOW = 0.5  # seconds over which /knee measures its arrival rate


class SlotServer:
    """An HTTP server with `slots` request slots; each request holds one for ?seconds=."""

    def __init__(self, slots: int, stall_after: float = 2.0, stall_seconds: float = 1.0, knee: float = 300):
        self.slots, self.knee = slots, knee
        self._arrivals: collections.deque = collections.deque()
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

    async def _knee(self, request):
        """Fast up to `knee` requests a second, slow (0.2 s) past it: a server with a known capacity."""
        now = time.monotonic()
        self._arrivals.append(now)
        while self._arrivals[0] < now - KNEE_WINDOW:
            self._arrivals.popleft()
        if len(self._arrivals) / KNEE_WINDOW > self.knee:
            await asyncio.sleep(0.2)
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
        self._runner = web.AppRunner(app, access_log=None)  # a log line per request would slow it down
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
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
