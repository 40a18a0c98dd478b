"""A request's state (``aiodelay/_core/state.py``): one object per request, from the
middleware to the final outcome, that whatever asks about the request finds on it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiohttp import web

import aiodelay
from aiodelay._core import state as state_module
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


@pytest.fixture
def measured_untraced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state module measures "nothing else holds it" at import; under a trace function
    (coverage.py's, when CI measures coverage on Python 3.10 and 3.11) it gives up and never
    lets a state serve again (the test below). Coverage's tracer reads no frame's variables,
    so the count measured without it is the true one here: measure it so."""
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        measured = state_module._only_the_watch()
    finally:
        sys.settrace(tracer)
    assert measured > 0
    monkeypatch.setattr(state_module, "_ONLY_THE_WATCH", measured)


@pytest.mark.usefixtures("measured_untraced")
async def test_a_state_nothing_can_reach_serves_the_connections_next_request(
    serve: Serve,
) -> None:
    """Keep-alive requests that nobody holds on to share one state object, one after the
    other (no allocation per request); one that something holds gets its own (above)."""
    seen: list[int] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(id(state_of(request)))  # the id only: holding it would keep it apart
        return web.Response(text="ok")

    app = web.Application()
    aiodelay.setup(app)
    app.add_routes([web.get("/", ok)])
    served = await serve(app)
    client = await served.connect()
    for _ in range(3):
        await client.get("/")
        await client.read_response()
    assert len(set(seen)) == 1


_UNDER_A_TRACER = """
import asyncio, sys

def trace(frame, event, arg):
    # As a debugger does where it stops: one more reference to each variable. (Only in the
    # function that measures: on Python 3.12 reading f_locals in a tracer breaks inlined
    # comprehensions of the modules imported meanwhile.)
    if frame.f_code.co_name == "_only_the_watch":
        frame.f_locals
    return trace

sys.settrace(trace)
import aiodelay  # the state module measures what "nothing else holds it" counts now
sys.settrace(None)
from aiohttp import web
from aiodelay._core.aiohttp_internals import state_of

async def main():
    held = []

    async def ok(request):
        held.append(request)
        return web.Response(text="ok")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    for _ in range(2):
        writer.write(b"GET / HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
        await reader.readuntil(b"ok")
    print(len({id(state_of(request)) for request in held}))
    writer.close()
    await runner.cleanup()

asyncio.run(main())
"""


def test_a_tracer_at_import_never_lets_a_held_request_share_its_state() -> None:
    """A trace function that reads frames' variables (a debugger) holds one more reference
    to them: had the state module measured "nothing else holds it" under one, a state that a
    request still reaches would serve the next request."""
    run = subprocess.run(
        [sys.executable, "-c", _UNDER_A_TRACER], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2"
