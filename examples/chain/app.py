"""Three services in a chain, A -> B -> C, each calling the next with ``aiohttp.ClientSession``.

C does the slow work (a sleep standing in for a query or a model call); B and A wait on the
service after them. Each has aiodelay installed, and nothing else is needed for a client that
leaves A to stop the work everywhere: aiodelay cancels A's handler, the cancellation closes
A's unfinished request to B (an aiohttp client connection with a response still to come is
closed, not pooled), which B's aiodelay sees as its client leaving; and so on to C.

Not promised: a service that pools its downstream connections differently (HTTP/2, a proxy
that buffers the response) may keep the downstream request open after its client left; then
the next service does not see anyone leave.

Run the chain (three shells, from the repository root)::

    python examples/chain/app.py C 8083
    python examples/chain/app.py B 8082 http://127.0.0.1:8083
    python examples/chain/app.py A 8081 http://127.0.0.1:8082
    curl http://127.0.0.1:8081/work     # then Ctrl-C: each service logs its cancellation
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

import aiodelay

__all__ = ("create_app", "main")

NAME = web.AppKey("name", str)
DOWNSTREAM = web.AppKey("downstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
WORK_SECONDS = web.AppKey("work_seconds", float)

log = logging.getLogger("chain")


async def work(request: web.Request) -> web.Response:
    """Call the next service and pass its answer on; the last one does the slow work."""
    app = request.app
    name = app[NAME]
    try:
        if DOWNSTREAM in app:
            async with app[SESSION].get(app[DOWNSTREAM] + "/work") as response:
                answer = await response.text()
            return web.Response(text=f"{name} <- {answer}")
        await asyncio.sleep(app[WORK_SECONDS])
        return web.Response(text=f"{name} done")
    except asyncio.CancelledError:
        log.info("%s: the client left, work cancelled", name)
        raise


async def _session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        yield


async def create_app(
    name: str, downstream: str | None = None, *, work_seconds: float = 30.0
) -> web.Application:
    """Service ``name`` of the chain: ``GET /work`` calls ``downstream`` (a base URL such as
    ``http://127.0.0.1:8083``) or, without one, works for ``work_seconds`` seconds."""
    if work_seconds <= 0:
        raise ValueError(f"work_seconds must be positive, got {work_seconds!r}")
    app = web.Application()
    aiodelay.setup(app)
    app[NAME] = name
    app[WORK_SECONDS] = work_seconds
    if downstream is not None:
        app[DOWNSTREAM] = downstream.rstrip("/")
        app.cleanup_ctx.append(_session)
    app.router.add_get("/work", work)
    return app


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not argv[1].isdigit():
        print("usage: app.py NAME PORT [DOWNSTREAM_URL]", file=sys.stderr)
        return 2
    name, port, *downstream = argv
    logging.basicConfig(level=logging.INFO)
    try:
        web.run_app(create_app(name, *downstream), host="127.0.0.1", port=int(port))
    except OSError as exc:  # the port is taken, or not ours to listen on
        print(
            f"examples/chain: cannot listen on 127.0.0.1:{int(port)}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
