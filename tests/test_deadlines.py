"""Deadlines: @aiodelay.deadline and setup(deadline=...) with real sockets, and the queue that
times the requests of one deadline (``aiodelay/_core/deadlines.py``). @aiodelay.grace is
tested in test_policy.py, aiodelay.to_thread and check_cancelled in test_owned.py.

The bounds on times below are the behaviour the API promises (a 0.3 s deadline answers
after 0.3 s, not after the handler's 5 s), with room for a loaded machine."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import aiodelay
from aiodelay.pytest_plugin import AiodelayServer
from aiodelay.testing import RawClient
from tests.conftest import HandlerRun, Lines, Serve

# Deadlines arm loop timers: checked on asyncio's own loop and on uvloop.
pytestmark = pytest.mark.both_loops


def _app(*routes: web.RouteDef, **config: Any) -> web.Application:
    app = web.Application()
    aiodelay.setup(app, **config)
    app.add_routes(routes)
    return app


async def _get(client: RawClient, path: str) -> tuple[int, bytes, float]:
    """GET path on the connection: (status, body, seconds it took)."""
    start = time.monotonic()
    await client.get(path)
    status, body = await client.read_response()
    return status, body, time.monotonic() - start


# -- @aiodelay.deadline -----------------------------------------------------------------------


async def test_a_deadline_cancels_the_handler_and_answers_504(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    @aiodelay.deadline(0.3)
    async def slow(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, asyncio.sleep(5))
        return web.Response(text="too late")

    served = await serve(_app(web.get("/slow", slow)))
    client = await served.connect()
    status, body, took = await _get(client, "/slow")
    assert status == 504
    assert body == b"504: the request exceeded its 0.300s deadline\n"
    assert 0.3 <= took < 0.5
    assert probe.cancelled
    exc = finish[0].exception()
    assert isinstance(exc, aiodelay.DeadlineExceeded)
    assert isinstance(exc, TimeoutError)
    assert exc.seconds == 0.3
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.completed, stats.disconnected, stats.in_flight) == (1, 0, 0, 0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert line == "GET /slow from 127.0.0.1 exceeded its 0.300s deadline: cancelled, answered 504"
    # The connection is still good for the next request.
    status, _, _ = await _get(client, "/slow")
    assert status == 504


async def test_setup_deadline_applies_to_undecorated_routes_and_deadline_none_exempts(
    serve: Serve,
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    @aiodelay.deadline(None)
    async def exempt(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)  # longer than the app's deadline
        return web.Response(text="done")

    @aiodelay.deadline(0.2, status=503)
    async def own(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    served = await serve(
        _app(web.get("/slow", slow), web.get("/exempt", exempt), web.get("/own", own), deadline=0.3)
    )
    client = await served.connect()
    assert (await _get(client, "/slow"))[:2] == (
        504,
        b"504: the request exceeded its 0.300s deadline\n",
    )
    assert (await _get(client, "/exempt"))[:2] == (200, b"done")
    status, body, took = await _get(client, "/own")
    assert (status, body) == (503, b"503: the request exceeded its 0.200s deadline\n")
    assert took < 0.3


async def test_an_app_default_deadline_leaves_shielded_routes_alone(serve: Serve) -> None:
    """Decided: a shielded route runs to its end; the app's default deadline is not for it
    (an explicit @aiodelay.deadline on it applies)."""

    @aiodelay.shielded
    async def charge(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.Response(text="charged")

    @aiodelay.shielded
    @aiodelay.deadline(0.2)
    async def bounded(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    served = await serve(
        _app(web.post("/charge", charge), web.post("/bounded", bounded), deadline=0.1)
    )
    client = await served.connect()
    await client.send(b"POST /charge HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert await client.read_response() == (200, b"charged")
    await client.send(b"POST /bounded HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    assert (await client.read_response())[0] == 504


async def test_a_deadline_on_a_view_class(serve: Serve) -> None:
    @aiodelay.deadline(0.2)
    class Slow(web.View):
        async def get(self) -> web.Response:
            await asyncio.sleep(5)
            return web.Response()

    served = await serve(_app(web.view("/slow", Slow)))
    client = await served.connect()
    assert (await _get(client, "/slow"))[0] == 504


async def test_a_deadline_in_the_middle_of_a_stream_cuts_the_response(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")

    @aiodelay.deadline(0.2)
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first line\n")
        await asyncio.sleep(5)
        await response.write(b"never\n")
        return response

    served = await serve(_app(web.get("/stream", stream)))
    client = await served.get("/stream")
    received = await client.read_until(b"first line\n")
    received += await client.reader.read()  # until the server closes
    assert b"200 OK" in received
    assert not received.endswith(b"0\r\n\r\n")  # no final chunk: the client sees it cut
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert line.endswith("exceeded its 0.200s deadline: cancelled, its response cut short")


async def test_a_shield_section_delays_the_deadline(serve: Serve) -> None:
    events: list[str] = []

    @aiodelay.deadline(0.1)
    async def handler(request: web.Request) -> web.Response:
        try:
            await aiodelay.shield(asyncio.sleep(0.3))
            events.append("section ended")
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.connect()
    status, _, took = await _get(client, "/")
    assert status == 504
    # The section ran to its end first (uvloop's timers run off the loop's cached clock and may
    # fire a little before 0.3 s of time.monotonic() have passed; without the shield: 0.1 s).
    assert took >= 0.29
    assert events == ["cancelled"]  # right as the section ended


async def test_deadline_timers_and_tasks_of_the_request_go_with_it(serve: Serve) -> None:
    fired: list[str] = []
    spawned: list[asyncio.Task[Any]] = []

    async def forever() -> None:
        await asyncio.sleep(60)

    @aiodelay.deadline(0.1)
    async def handler(request: web.Request) -> web.Response:
        aiodelay.call_later(request, 0.3, fired.append, "timer")
        spawned.append(aiodelay.spawn(request, forever()))
        await asyncio.sleep(5)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.connect()
    assert (await _get(client, "/"))[0] == 504
    await asyncio.wait(spawned, timeout=5)
    assert spawned[0].cancelled()
    assert fired == []


# -- races: what comes first decides, counted once -------------------------------------------


async def test_a_client_leaving_after_the_deadline_does_not_count_again(serve: Serve) -> None:
    @aiodelay.deadline(0.1)
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    served = await serve(_app(web.get("/slow", slow)))
    client = await served.connect()
    assert (await _get(client, "/slow"))[0] == 504
    client.drop("RST")
    other = await served.connect()
    assert (await _get(other, "/slow"))[0] == 504
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.disconnected) == (2, 0)


async def test_a_client_leaving_before_the_deadline_is_a_disconnect_only(serve: Serve) -> None:
    probe = HandlerRun()

    @aiodelay.deadline(0.3)
    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, asyncio.sleep(5))
        return web.Response()

    served = await serve(_app(web.get("/slow", slow)))
    client = await served.get("/slow")
    await probe.wait_started()
    client.drop("FIN")
    await probe.wait_ended()
    # Past the deadline: its timer went with the request.
    other = await served.connect()

    assert (await _get(other, "/slow"))[0] == 504
    stats = aiodelay.stats(served.app)
    assert (stats.cancelled, stats.timed_out) == (1, 1)
    assert stats.disconnected == 1


async def test_a_shutdown_before_the_deadline_decides(serve: Serve) -> None:
    probe = HandlerRun()

    @aiodelay.deadline(2)
    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, asyncio.sleep(5))
        return web.Response()

    served = await serve(_app(web.get("/slow", slow)), shutdown_timeout=0.05)
    await served.get("/slow")
    await probe.wait_started()
    await served.runner.cleanup()
    stats = aiodelay.stats(served.app)
    assert (stats.failed, stats.disconnected, stats.timed_out) == (1, 1, 0)


# -- the pytest plugin ------------------------------------------------------------------------


async def test_the_plugin_reports_a_deadline(aiodelay_server: AiodelayServer) -> None:
    @aiodelay.deadline(0.1)
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/slow", slow)
    server = await aiodelay_server(app)
    outcome = await server.drop("GET", "/slow", after_seconds=2)
    assert outcome.timed_out, outcome  # the deadline came before the drop
    # ... and the drop came after the answer, which the test can check.
    assert outcome.status == 504, outcome
    assert outcome.received.startswith(b"504"), outcome


# -- regressions found in review ---------------------------------------------------------------


async def test_an_app_default_deadline_leaves_websockets_alone(serve: Serve) -> None:

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        async for message in socket_:
            await socket_.send_str(message.data)
        return socket_

    served = await serve(_app(web.get("/ws", ws), deadline=0.2))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{served.port}/ws") as connection,
    ):
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # past the default deadline
            await connection.send_str("ping")
            assert (await connection.receive_str()) == "ping"
    assert aiodelay.stats(served.app).timed_out == 0


async def test_a_handler_that_catches_the_deadline_and_answers_counts_as_timed_out(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")

    @aiodelay.deadline(0.1)
    async def stubborn(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return web.Response(text="answered anyway")
        return web.Response()

    served = await serve(_app(web.get("/", stubborn)))
    client = await served.connect()
    assert (await _get(client, "/"))[:2] == (200, b"answered anyway")
    assert aiodelay.stats(served.app).timed_out == 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert line.endswith("the handler caught the cancellation and answered itself")


async def test_a_client_leaving_after_the_deadline_while_a_shield_section_runs(
    serve: Serve,
) -> None:
    """The deadline came first; the client leaves during the shield section that delays the
    cancellation: counted once, as timed out."""
    lost: list[str] = []
    probe = HandlerRun()
    release = asyncio.Event()

    class Lost:
        def request_started(self, request: web.BaseRequest) -> None:
            pass

        def request_lost(self, request: web.BaseRequest, why: aiodelay.ConnectionLost) -> None:
            lost.append(why.reason)

        def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
            pass

    @aiodelay.deadline(0.1)
    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, aiodelay.shield(release.wait()))
        return web.Response()

    app = _app(web.get("/", handler))
    aiodelay.add_observer(app, Lost())
    served = await serve(app)
    client = await served.get("/")
    await probe.wait_started()
    assert probe.request is not None
    with pytest.raises(aiodelay.DeadlineExceeded):
        await asyncio.wait_for(aiodelay.notify_finish(probe.request), 5)  # it passed
    client.drop("RST")
    # The RST reaches the server's loop before this round trip on a new connection ends.
    other = await served.connect()
    await other.send(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await other.read_response())[0] == 404
    release.set()
    await probe.wait_ended()
    assert probe.cancelled
    stats = aiodelay.stats(served.app)
    assert (stats.timed_out, stats.disconnected) == (1, 0)
    assert lost == []


# -- one timer per deadline -------------------------------------------------------------------


async def test_requests_of_one_deadline_each_pass_it_on_their_own_time(serve: Serve) -> None:
    """The routes of one deadline share a queue and its timer: a request that ends early
    leaves it (the timer set for it finds nothing due, and waits for the next), and each
    request's deadline counts from its own start, also once the queue was empty."""

    @aiodelay.deadline(0.3)
    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="quick")

    @aiodelay.deadline(0.3)
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    served = await serve(_app(web.get("/quick", quick), web.get("/slow", slow)))
    client = await served.connect()
    assert (await _get(client, "/quick"))[:2] == (200, b"quick")
    for _ in range(2):  # the second starts after the first passed: the queue was empty
        status, _, took = await _get(client, "/slow")
        assert status == 504
        assert 0.3 <= took < 0.5
    stats = aiodelay.stats(served.app)
    assert (stats.completed, stats.timed_out, stats.in_flight) == (1, 2, 0)


def test_a_deadline_passes_on_a_second_loop_after_the_first_kept_its_timer() -> None:
    """One middleware() object serves on one event loop, then on another (an app run again,
    a test suite's next loop). The first loop ends with its deadline's timer still set (its
    one request ended quickly: the timer waits for the 0.2 s it was set for); on the second
    loop a request must not join the queue as if that timer would stop it: its deadline
    passes at 0.2 s, not after the handler's 5 s."""
    shared = aiodelay.middleware(deadline=0.2)

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="quick")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    async def serve_once(path: str) -> int:
        app = web.Application(middlewares=[shared])
        app.add_routes([web.get("/quick", quick), web.get("/slow", slow)])
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            timeout = aiohttp.ClientTimeout(total=3)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"http://127.0.0.1:{port}{path}") as response,
            ):
                return response.status
        finally:
            await runner.cleanup()

    assert asyncio.run(serve_once("/quick")) == 200
    assert asyncio.run(serve_once("/slow")) == 504


class _Waiting:
    """A request in a DeadlineQueue: what its deadline passing did, and when."""

    def __init__(self) -> None:
        self.passed: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def deadline_passed(self, seconds: float, status: int) -> None:
        assert (seconds, status) == (0.2, 504)
        self.passed.set_result(time.monotonic())


async def test_a_deadline_queue_stops_each_request_at_its_own_deadline_and_no_other() -> None:
    from aiodelay._core.deadlines import DeadlineQueue

    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(0.2, 504)
    queue._use(loop)
    early, left, late = _Waiting(), _Waiting(), _Waiting()
    now = time.monotonic()
    # Three requests that started 0.1 s, 0.05 s and no time ago (the queue's own order).
    queue.pending.update({early: now + 0.1, left: now + 0.15, late: now + 0.2})  # type: ignore[dict-item]
    queue._arm(loop)
    del queue.pending[left]  # type: ignore[arg-type]  # it ended
    early_at = await asyncio.wait_for(early.passed, 5)
    assert not late.passed.done()
    late_at = await asyncio.wait_for(late.passed, 5)
    assert now + 0.1 <= early_at < now + 0.2 <= late_at
    assert not left.passed.done()
    assert queue.pending == {}


async def test_a_deadline_queue_stops_the_others_when_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiodelay._core.deadlines import DeadlineQueue

    caplog.set_level(logging.ERROR, logger="aiodelay")

    class Failing(_Waiting):
        def deadline_passed(self, seconds: float, status: int) -> None:
            raise RuntimeError("broken")

    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(0.2, 504)
    queue._use(loop)
    failing, other = Failing(), _Waiting()
    now = time.monotonic()
    queue.pending.update({failing: now, other: now})  # type: ignore[dict-item]
    queue._arm(loop)
    await asyncio.wait_for(other.passed, 5)
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    assert "at its deadline failed" in record.getMessage()


# -- what a tiny deadline is said to be -----------------------------------------------------


@pytest.mark.parametrize(("seconds", "said"), [(1e-300, "1e-300s"), (0.00012345, "0.000123s")])
async def test_a_deadline_under_a_millisecond_is_said_with_its_significant_digits(
    serve: Serve, lines: Lines, seconds: float, said: str
) -> None:
    """A deadline of less than 0.001 s is not "0.000s": the 504 body and the INFO line give
    it with three significant digits."""

    @aiodelay.deadline(seconds)
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    served = await serve(_app(web.get("/x", slow)))
    client = await served.get("/x")
    status, body = await asyncio.wait_for(client.read_response(), 5)
    assert (status, body) == (504, f"504: the request exceeded its {said} deadline\n".encode())
    line = (await lines.wait_for("deadline"))[0]
    assert line == f"GET /x from 127.0.0.1 exceeded its {said} deadline: cancelled, answered 504"
    assert lines.lines == [line]
