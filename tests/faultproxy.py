"""A fault-injecting TCP proxy between the app and PostgreSQL, switched by the tests at run time.

    with FaultProxy(database_url) as proxy:      # listens on 127.0.0.1, forwards to the server
        app_url = proxy.url                      # the same database, through the proxy
        proxy.set_mode("stall")                  # nothing passes either way; sockets stay open
        proxy.set_mode("forward")

Modes:
* forward: bytes pass both ways (after `delay` seconds per chunk, when set);
* stall: nothing passes on any connection, old or new; new ones are still accepted (a
  frozen server or a partition behind a proxy that still ACKs);
* blackhole: new connections are accepted and never read or answered (a listener that
  accepts and does nothing); connections already open keep forwarding;
* reset: every connection, open or new, is closed with a TCP reset.

It runs an asyncio loop in a thread of the test process; `close()` stops it and every socket.
"""

import asyncio
import contextlib
import socket
import struct
import threading

from sqlalchemy.engine import make_url

MODES = ("forward", "stall", "blackhole", "reset")


class FaultProxy:
    def __init__(self, database_url: str):
        self.target_url = make_url(database_url)
        self.mode = "forward"
        self.delay = 0.0
        self.port: int | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    # --- the test's side ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL through the proxy (TCP on 127.0.0.1), with the same user and database."""
        return (
            self.target_url.set(host="127.0.0.1", port=self.port, query={})
            .render_as_string(hide_password=False)
        )

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        assert mode in MODES, mode
        asyncio.run_coroutine_threadsafe(self._switch(mode, delay), self._loop).result(5)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    # --- the proxy's side (its own thread and loop) --------------------------------------

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            self._flowing.set()  # stalled pumps see their sockets close and end
            for client, upstream in list(self._pairs):
                _reset(client)
                if upstream:
                    upstream.transport.abort()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if others:
                await asyncio.wait(others, timeout=5)

    async def _switch(self, mode: str, delay: float) -> None:
        self.mode, self.delay = mode, delay
        if mode == "stall":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "reset":
            doomed = list(self._pairs)
        elif mode == "forward":  # connections held in blackhole mode never reached the server
            doomed = [pair for pair in self._pairs if pair[1] is None]
        else:
            doomed = []
        for client, upstream in doomed:
            self._pairs.discard((client, upstream))
            _reset(client)
            if upstream:
                upstream.transport.abort()

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(client)
            return
        if self.mode == "blackhole":
            self._pairs.add((client, None))  # accepted; never read, never answered
            return
        upstream_reader, upstream = await self._open_upstream()
        pair = (client, upstream)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pump(client_reader, upstream), self._pump(upstream_reader, client))
        finally:
            self._pairs.discard(pair)
            client.close()
            upstream.close()

    async def _open_upstream(self):
        url = self.target_url
        socket_dir = url.query.get("host")
        if socket_dir:  # the embedded server: a unix socket
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{url.port or 5432}")
        return await asyncio.open_connection(url.host or "127.0.0.1", url.port or 5432)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                await self._flowing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER on with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
