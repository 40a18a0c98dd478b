"""A request's state (``aiodelay/_core/state.py``): one object per request, from the
middleware to the final outcome, that whatever asks about the request finds on it."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

import aiodelay
from aiodelay._core.aiohttp_internals import state_of
from aiodelay._core.state import ENDED, RUNNING, SETTLED
from tests.conftest import Serve

pytestmark = pytest.mark.both_loops


@pytest.mark.parametrize("kept", ["the request", "a clone"])
async def test_each_keep_alive_request_answers_for_itself_after_the_end(
    serve: Serve, kept: str
) -> None:
    """A connection's requests one after the other: each that something still holds (the
    request, or a clone made of it) keeps a state of its own (a state is made anew for the next
    request only when nothing can reach it any more), which still says how it ended, also
    after the requests behind it ended otherwise."""
    held: list[web.BaseRequest] = []
    phases: list[int] = []

    async def ok(request: web.Request) -> web.Response:
        phases.append(state_of(request).phase)
        held.append(request if kept == "the request" else request.clone())
        return web.Response(text="ok")

    async def fails(request: web.Request) -> web.Response:
        held.append(request)
        raise RuntimeError("a bug")

    app = web.Application()
    aiodelay.setup(app)
    app.add_routes([web.get("/ok", ok), web.get("/fails", fails)])
    served = await serve(app)
    client = await served.connect()
    for path in ("/ok", "/ok", "/fails"):  # (aiohttp closes the connection after a 500)
        await client.get(path)
        await client.read_response()
    first, second, failed = held
    assert phases == [RUNNING, RUNNING]
    assert len({id(state_of(request)) for request in held}) == 3
    assert state_of(first).phase == ENDED  # completed, counted when its handler returned
    assert state_of(failed).phase == SETTLED
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(aiodelay.notify_finish(failed), 5)
    await asyncio.wait_for(aiodelay.notify_finish(first), 5)  # resolves: it completed
    await asyncio.wait_for(aiodelay.notify_finish(second), 5)
    assert not any(aiodelay.is_disconnected(request) for request in held)
    stats = aiodelay.stats(app)
    assert (stats.in_flight, stats.completed, stats.failed) == (0, 3, 0)
