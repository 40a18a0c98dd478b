"""A request's state (``aiodelay/_core/state.py``): one object per request, from the
middleware to the final outcome, that whatever asks about the request finds on it.

The drop path most requests take: a handler under the cancel policy, with no grace, that
asked aiodelay nothing and that nobody observes, is cancelled from the transport's callback
with nothing made for it beyond its state; whatever asks later (the handler's own ``except``
block, a deadline, ``notify_finish`` after the end) finds the truth in the request's state.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_remotes import XForwardedRelaxed

import aiodelay
from aiodelay._core import middleware as middleware_module
from aiodelay._core import state as state_module
from aiodelay._core.aiohttp_internals import state_of
from aiodelay._core.policy import Policy
from aiodelay._core.requests import request_policy
from aiodelay._core.state import ENDED, RUNNING, SETTLED
from tests.conftest import Drop, HandlerRun, Held, Serve, connection_gone, recorded

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
    monkeypatch.setattr(middleware_module, "ONLY_THE_WATCH", measured)


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


# -- the drop path most requests take: nothing made beyond the request's state ---------------------


def _app(*routes: web.RouteDef) -> web.Application:
    app = web.Application()
    aiodelay.setup(app)
    app.add_routes(routes)
    return app


@pytest.mark.parametrize(("drop", "reason"), [("FIN", "FIN"), ("RST", "RST")])
async def test_a_plain_drop_makes_nothing_more_and_says_the_truth(
    serve: Serve, drop: Drop, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = HandlerRun()

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    with caplog.at_level(logging.INFO, logger="aiodelay"):
        client.drop(drop)
        await probe.wait_ended()
        await recorded(served.app)
    assert probe.cancelled
    request = probe.request
    assert request is not None
    # Before anything asks: how the client left is kept, and nothing else was made for it.
    state = state_of(request)
    assert state.phase == SETTLED
    assert state.extras is None
    assert state.request is None  # let go: no cycle between the request and its state
    assert state.lost is not None
    assert state.lost.reason == reason
    assert aiodelay.is_disconnected(request)
    assert request_policy(request) is Policy.CANCEL  # what the server's Resource reads
    future = aiodelay.notify_finish(request)
    assert future.done()
    exc = future.exception()
    assert isinstance(exc, aiodelay.ConnectionLost)
    assert exc.reason == reason
    with pytest.raises(RuntimeError, match="already ended"):
        aiodelay.call_later(request, 1, print)
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.cancelled, stats.completed) == (1, 1, 0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert f"GET / from 127.0.0.1 interrupted by {reason} after" in line
    assert line.endswith(": cancelled")


def _asking(seen: list[object], turns: int = 0) -> Callable[[web.Request], Awaitable[None]]:
    """An ``on_cancel`` that, ``turns`` turns of the loop after the cancellation, asks
    whether the client left and how (into ``seen``), then lets the cancellation go on."""

    async def ask(request: web.Request) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        seen.append(aiodelay.is_disconnected(request))
        future = aiodelay.notify_finish(request)
        seen.append(future.done() and future.exception())

    return ask


@pytest.mark.parametrize("drop", ["FIN", "RST"])
@pytest.mark.parametrize("turns", [0, 5])
async def test_the_handler_can_ask_after_a_quick_stop_whenever(
    serve: Serve, drop: Drop, turns: int
) -> None:
    """In its ``except CancelledError`` block the handler learns that its client left, also
    after an RST (whose connection_lost is the first news, so the connection is gone when the
    handler runs its except block) and a few turns later (after a FIN the deferred close has
    run by then); the request is still open for timers."""
    seen: list[object] = []
    ask = _asking(seen, turns)

    async def ask_and_set_a_timer(request: web.Request) -> None:
        await ask(request)
        aiodelay.call_later(request, 10, print)  # the request has not ended: no error

    held = Held(ask_and_set_a_timer)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    await recorded(served.app)
    assert seen[0] is True
    assert isinstance(seen[1], aiodelay.ConnectionLost)
    assert seen[1].reason == drop
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.cancelled) == (1, 1)


@web.middleware
async def _cloning(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An inner middleware that hands the handler a clone (as aiohttp-remotes' do), made
    before any drop."""
    return await handler(request.clone(rel_url=request.rel_url))


@pytest.mark.parametrize("drop", ["FIN", "RST"])
@pytest.mark.parametrize("turns", [0, 5])
async def test_a_clone_made_before_the_drop_can_ask_after_it(
    serve: Serve, drop: Drop, turns: int
) -> None:
    """A clone made before the drop knows of it, as the request does: it shares the
    request's state."""
    seen: list[object] = []
    held = Held(_asking(seen, turns))
    app = _app(web.get("/", held.handle))
    app.middlewares.append(_cloning)
    served = await serve(app)
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    assert seen[0] is True
    assert isinstance(seen[1], aiodelay.ConnectionLost)


@pytest.mark.parametrize("drop", ["FIN", "RST"])
async def test_behind_x_forwarded_the_handler_and_later_callers_see_the_drop(
    serve: Serve, drop: Drop
) -> None:
    """The deployment guide's setup: aiodelay.setup(app), then aiohttp-remotes'
    XForwardedRelaxed, which hands every handler a clone."""
    seen: list[object] = []
    held = Held(_asking(seen))
    app = _app(web.get("/", held.handle))
    await XForwardedRelaxed().setup(app)
    served = await serve(app)
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    await recorded(served.app)
    assert seen[0] is True
    assert isinstance(seen[1], aiodelay.ConnectionLost)
    after = aiodelay.notify_finish(held.requests[0])  # after the end, from the test's task
    assert after.done()
    assert isinstance(after.exception(), aiodelay.ConnectionLost)


@pytest.mark.parametrize("drop", ["FIN", "RST"])
async def test_a_clone_made_after_a_quick_stop_knows_it_after_the_end(
    serve: Serve, drop: Drop
) -> None:
    """A clone copies what the request keeps of the stop; it still says the truth after the
    end, also once the original was asked."""
    clones: list[web.BaseRequest] = []
    seen: list[bool] = []

    async def clone_and_ask(request: web.Request) -> None:
        clone = request.clone()
        clones.append(clone)
        seen.append(aiodelay.is_disconnected(request))
        seen.append(aiodelay.is_disconnected(clone))

    held = Held(clone_and_ask)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    await recorded(served.app)
    assert seen == [True, True]
    assert aiodelay.is_disconnected(clones[0])
    future = aiodelay.notify_finish(clones[0])
    assert isinstance(future.exception(), aiodelay.ConnectionLost)


async def test_a_handler_with_a_grace_that_asks_nothing_runs_on_in_its_grace(
    serve: Serve,
) -> None:
    """@aiodelay.grace keeps a handler off the quick path: it is not cancelled at once."""
    started, ended, work = asyncio.Event(), asyncio.Event(), asyncio.Event()
    requests: list[web.BaseRequest] = []
    outcome: list[str] = []

    @aiodelay.grace(5)
    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        started.set()
        try:
            await work.wait()
            outcome.append("completed")
        except asyncio.CancelledError:  # pragma: no cover - the failure being tested
            outcome.append("cancelled")
            raise
        finally:
            ended.set()
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await asyncio.wait_for(started.wait(), 5)
    client.drop("RST")
    await connection_gone(requests[0])  # the server has seen the drop
    work.set()
    await asyncio.wait_for(ended.wait(), 5)
    await recorded(served.app)
    assert outcome == ["completed"]
    assert aiodelay.stats(served.app).shielded_ran_on == 1


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 cannot count cancel requests (documented)"
)
async def test_a_foreign_cancellation_after_a_swallowed_quick_stop_is_not_aiodelays(
    serve: Serve,
) -> None:
    swallowed = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []

    async def swallow_and_run_on(request: web.Request) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        swallowed.set()
        await asyncio.get_running_loop().create_future()  # runs on

    held = Held(swallow_and_run_on)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop("FIN")
    await asyncio.wait_for(swallowed.wait(), 5)
    tasks[0].cancel()  # an outer cancellation, not aiodelay's
    await held.wait_ended()
    await recorded(served.app)
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.cancelled, stats.failed) == (1, 0, 1)


async def test_a_handler_that_answers_after_a_quick_stop_ran_on(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Catching the cancellation and returning a response: counted as run on, nothing sent."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="too late")

    held = Held(answer)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    with caplog.at_level(logging.INFO, logger="aiodelay"):
        client.drop("RST")
        await held.wait_ended()
        await recorded(served.app)
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.shielded_ran_on, stats.cancelled) == (1, 1, 0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert "interrupted by RST" in line
    assert "ran on (it ended before the cancellation took effect)" in line


async def test_a_deadline_after_a_quick_stop_changes_nothing(serve: Serve) -> None:
    """The client left first: the deadline that passes later (the handler caught the
    cancellation and runs on) neither cancels it again nor counts it as timed out."""
    started, ended = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    @aiodelay.deadline(0.05)
    async def handler(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            try:
                await asyncio.sleep(0.2)  # the deadline passes meanwhile
            except asyncio.CancelledError:  # pragma: no cover - the failure being tested
                outcome.append("cancelled again")
                raise
            outcome.append("ran on")
            return web.Response()
        finally:
            ended.set()
        return web.Response()  # pragma: no cover - never reached

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await asyncio.wait_for(started.wait(), 5)
    client.drop("FIN")
    await asyncio.wait_for(ended.wait(), 5)
    await recorded(served.app)
    assert outcome == ["ran on"]
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.shielded_ran_on, stats.timed_out) == (1, 1, 0)


def test_without_sys_getrefcount_no_state_serves_again() -> None:
    """Where ``sys.getrefcount`` is missing (PyPy), nothing can tell whether something still
    reaches a state: none serves a connection's next request (a held request keeps its own)."""
    code = (
        "import sys; del sys.getrefcount; "
        "from aiodelay._core import middleware, state; "
        "print(state.ONLY_THE_WATCH, middleware.ONLY_THE_WATCH)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["0", "0"]
