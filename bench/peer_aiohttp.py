"""The peer people pick instead: aiohttp.web + asyncpg, same JSON body for GET /todos.

    BENCH_DSN=... gunicorn bench.peer_aiohttp:create_app -k aiohttp.GunicornWebWorker -w 2
"""

import json

import asyncpg
from aiohttp import web

from greenflask.settings import Tools

QUERY = "SELECT id, title, done, priority FROM todos ORDER BY id LIMIT 100 OFFSET 0"


async def todos(request: web.Request) -> web.Response:
    async with request.app["pool"].acquire() as connection:
        rows = await connection.fetch(QUERY)
    body = json.dumps({"todos": [dict(row) for row in rows], "limit": 100, "offset": 0}, separators=(",", ":"))
    return web.Response(body=(body + "\n").encode(), content_type="application/json")


async def _open_pool(app: web.Application):
    app["pool"] = await asyncpg.create_pool(Tools.from_env().bench_dsn, min_size=1, max_size=20)
    yield
    await app["pool"].close()


async def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/todos", todos)
    app.cleanup_ctx.append(_open_pool)
    return app
