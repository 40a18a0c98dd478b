"""setup() and middleware(): policies, "not done yet" results, logging, stats, transparency."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import logging
import socket as socket_module
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

import aiodelay
import aiodelay._core.middleware
import aiodelay._core.outcome
from aiodelay._core.middleware import Middleware
from aiodelay.pytest_plugin import AiodelayServer
from aiodelay.testing import RawClient
from tests.conftest import Drop, HandlerRun, Serve, recorded


def _app(*routes: web.RouteDef, policy: str = "cancel") -> web.Application:
    app = web.Application()
    aiodelay.setup(app, policy=policy)
    app.add_routes(routes)
    return app


# -- "not done yet": a handler returns a pending awaitable ----------------------------------


async def test_twisted_example_delivers_after_the_delay(serve: Serve) -> None:
    """The Twisted document's example, in aiohttp form (the delay shortened)."""

    async def delayed(request: web.Request) -> Any:
        fut = asyncio.get_running_loop().create_future()
        aiodelay.call_later(
            request, 0.01, fut.set_result, web.Response(text="Sorry to keep you waiting.")
        )
        return fut

    served = await serve(_app(web.get("/", delayed)))
    client = await served.get("/")
    assert await client.read_response() == (200, b"Sorry to keep you waiting.")


@pytest.mark.parametrize("drop", ["FIN", "RST"])
async def test_twisted_example_dropped_never_renders(serve: Serve, drop: Drop) -> None:
    returned: list[asyncio.Future[web.Response]] = []
    timers: list[asyncio.TimerHandle] = []
    rendered: list[str] = []
    started = asyncio.Event()

    def render() -> None:
        rendered.append("rendered")
        returned[0].set_result(web.Response(text="Sorry to keep you waiting."))

    async def delayed(request: web.Request) -> Any:
        fut = asyncio.get_running_loop().create_future()
        timers.append(aiodelay.call_later(request, 5, render))
        returned.append(fut)
        started.set()
        return fut

    served = await serve(_app(web.get("/", delayed)))
    client = await served.get("/")
    await asyncio.wait_for(started.wait(), 5)
    client.drop(drop)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(returned[0], 5)  # cancelled by aiodelay, not by wait_for
    assert timers[0].cancelled()
    assert rendered == []
    assert aiodelay.stats(served.app).cancelled == 1


@pytest.mark.parametrize("form", ["future", "task", "coroutine", "sync-function"])
async def test_pending_awaitables_of_every_kind_are_awaited(serve: Serve, form: str) -> None:
    async def later() -> web.Response:
        await asyncio.sleep(0)
        return web.Response(text=form)

    async def handler(request: web.Request) -> Any:
        if form == "future":
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(fut.set_result, web.Response(text=form))
            return fut
        if form == "task":
            return asyncio.ensure_future(later())
        return later()

    @aiodelay.cancellable
    def sync_handler(request: web.Request) -> Any:
        return asyncio.ensure_future(later())

    route = sync_handler if form == "sync-function" else handler
    served = await serve(_app(web.get("/", route)))
    client = await served.get("/")
    assert await client.read_response() == (
        200,
        b"sync-function" if route is sync_handler else form.encode(),
    )


@pytest.mark.parametrize(
    ("returned", "shown"),
    [
        ("a string", "'a string'"),
        (None, "None"),
        ("awaitable-of-int", "an awaitable that resolved to 42"),
    ],
)
async def test_a_result_that_is_no_response_gives_500_and_a_log_line(
    serve: Serve, caplog: pytest.LogCaptureFixture, returned: Any, shown: str
) -> None:
    caplog.set_level(logging.ERROR, logger="aiodelay")

    async def answer() -> int:
        return 42

    async def confused(request: web.Request) -> Any:
        return answer() if returned == "awaitable-of-int" else returned

    served = await serve(_app(web.get("/thing", confused)))
    client = await served.get("/thing")
    status, _ = await client.read_response()
    assert status == 500
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    message = record.getMessage()
    assert "confused" in message
    assert "GET /thing" in message
    assert shown in message


# -- shielded handlers -----------------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [False, True])
@pytest.mark.parametrize("how", ["decorator", "app-policy", "view-class"])
async def test_shielded_handler_runs_to_completion(
    serve: Serve, handler_cancellation: bool, how: str
) -> None:
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    async def work(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, probe.gate)
        return web.Response(text="charged")

    @aiodelay.shielded
    class Charge(web.View):
        async def post(self) -> web.Response:
            return await work(self.request)

    route: Any = {"decorator": aiodelay.shielded(work), "app-policy": work, "view-class": Charge}[
        how
    ]
    policy = "shield" if how == "app-policy" else "cancel"
    app = _app(web.route("*", "/", route), policy=policy)
    served = await serve(app, handler_cancellation=handler_cancellation)
    client = await served.connect()
    await client.send(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
    await probe.wait_started()
    client.drop("RST")
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(finish[0], 5)  # the server has seen the client leave
    assert not probe.ended.is_set()
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert probe.completed
    assert not probe.cancelled
    stats = aiodelay.stats(served.app)
    assert (stats.shielded_ran_on, stats.cancelled, stats.disconnected) == (1, 0, 1)


async def test_cancellable_overrides_an_app_wide_shield(aiodelay_server: AiodelayServer) -> None:
    @aiodelay.cancellable
    async def report(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()
        return web.Response()

    server = await aiodelay_server(_app(web.get("/report", report), policy="shield"))
    outcome = await server.drop("GET", "/report")
    assert outcome.cancelled


# -- cancellations that are not the disconnect's ------------------------------------------


async def test_cancelling_the_request_task_propagates(serve: Serve) -> None:
    """The caller cancels: the CancelledError goes through aiodelay unchanged."""
    probe = HandlerRun()
    tasks: list[asyncio.Task[Any]] = []

    async def handler(request: web.Request) -> web.Response:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    await served.get("/")
    await probe.wait_started()
    tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert probe.cancelled
    assert aiodelay.stats(served.app).cancelled == 0  # not a disconnect


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 cannot count cancel requests")
async def test_a_foreign_cancel_during_a_disconnect_still_propagates(serve: Serve) -> None:
    """Both arrive before the handler wakes up: aiodelay takes back only its own."""
    probe = HandlerRun()
    tasks: list[asyncio.Task[Any]] = []

    async def handler(request: web.Request) -> web.Response:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        # Runs right after aiodelay requested the cancellation, before the handler wakes.
        aiodelay.notify_finish(request).add_done_callback(lambda _: task.cancel())
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    client.drop("RST")
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(tasks[0], 5)


async def test_server_shutdown_fails_notify_finish_with_shutdown_reason(serve: Serve) -> None:
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    async def handler(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)), shutdown_timeout=0.05)
    await served.get("/")
    await probe.wait_started()
    await served.runner.cleanup()  # aiohttp cancels the handler after its shutdown timeout
    assert probe.cancelled
    with pytest.raises(aiodelay.ConnectionLost) as caught:
        await finish[0]
    assert caught.value.reason == "shutdown"


# -- logging and stats ----------------------------------------------------------------------


async def test_one_info_line_per_interrupted_request(
    aiodelay_server: AiodelayServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def handler(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()
        return web.Response()

    server = await aiodelay_server(_app(web.get("/slow/thing", handler)))
    outcome = await server.drop("GET", "/slow/thing", how="RST")
    assert outcome.cancelled
    ours = [r for r in caplog.records if r.name == "aiodelay"]
    assert len(ours) == 1
    assert ours[0].levelno == logging.INFO
    message = ours[0].getMessage()
    assert message.startswith("GET /slow/thing from 127.0.0.1 interrupted by RST after ")
    assert message.endswith("s: cancelled")
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []  # nothing in aiohttp's error log, nothing from asyncio


async def test_the_info_line_is_the_record_logger_info_makes_through_the_logging_setup(
    aiodelay_server: AiodelayServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiodelay makes its INFO record without logging's search for the caller, and the
    logging set-up still decides: the record factory makes it, the logger's filters and its
    parents' handlers see it, and it says where it was made as logger.info there would."""
    made: list[logging.LogRecord] = []
    searched: list[str] = []
    search = logging.Logger.findCaller

    def searching(self: logging.Logger, *args: Any, **kwargs: Any) -> Any:
        searched.append(self.name)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "findCaller", searching)
    factory = logging.getLogRecordFactory()

    def recording_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    monkeypatch.setattr(logging, "_logRecordFactory", recording_factory)
    handled: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handled.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)  # a parent's: the record propagates to it
    logger = logging.getLogger("aiodelay")
    caplog.set_level(logging.INFO, logger="aiodelay")
    only_rst = logging.Filter()
    only_rst.filter = lambda record: " RST " in record.getMessage()  # type: ignore[method-assign]
    logger.addFilter(only_rst)

    async def handler(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()
        return web.Response()

    try:
        server = await aiodelay_server(_app(web.get("/slow", handler)))
        assert (await server.drop("GET", "/slow", how="RST")).cancelled
        assert (await server.drop("GET", "/slow", how="FIN")).cancelled
    finally:
        logger.removeFilter(only_rst)
        logging.getLogger().removeHandler(keep)
    ours = [record for record in made if record.name == "aiodelay"]
    assert [record.getMessage().split(" ")[6] for record in ours] == ["RST", "FIN"]
    [record] = [record for record in handled if record.name == "aiodelay"]  # filtered: FIN
    assert "aiodelay" not in searched  # (the search costs a drop some 14,000 instructions)
    assert record is ours[0]
    assert record.levelno == logging.INFO
    assert record.funcName == "_info"
    assert record.pathname == aiodelay._core.outcome.__file__
    lines, first = inspect.getsourcelines(aiodelay._core.outcome._info)
    assert first < record.lineno < first + len(lines)  # a line of _info's body


@pytest.mark.parametrize("setting", ["a logger class of its own", "no caller wanted"])
async def test_the_info_line_goes_through_logger_info_where_the_logging_setup_asks(
    aiodelay_server: AiodelayServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    setting: str,
) -> None:
    """A logger class of its own (its _log may add to the record) and logging._srcfile set
    to None (no caller searched for) are honoured, as logger.info would honour them."""

    class Tagging(logging.Logger):
        def _log(self, *args: Any, **kwargs: Any) -> None:
            kwargs["extra"] = {"tag": "its own"}
            super()._log(*args, **kwargs)

    caplog.set_level(logging.INFO, logger="aiodelay")
    if setting == "a logger class of its own":
        monkeypatch.setattr(logging.getLogger("aiodelay"), "__class__", Tagging)
    else:
        monkeypatch.setattr(logging, "_srcfile", None)

    async def handler(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()
        return web.Response()

    server = await aiodelay_server(_app(web.get("/slow", handler)))
    assert (await server.drop("GET", "/slow", how="FIN")).cancelled
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    assert " interrupted by FIN " in record.getMessage()
    if setting == "a logger class of its own":
        assert record.tag == "its own"  # type: ignore[attr-defined]
    else:
        assert (record.funcName, record.lineno) == ("(unknown function)", 0)


async def test_shielded_log_line_says_it_ran_on(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    @aiodelay.shielded
    async def handler(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.post("/charge", handler)))
    client = await served.connect()
    await client.send(b"POST /charge HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
    await probe.wait_started()
    client.drop("FIN")
    with pytest.raises(aiodelay.ConnectionLost):
        await finish[0]
    probe.gate.set_result(None)
    await probe.wait_ended()  # the handler returns and aiodelay logs in the same task step
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    assert " interrupted by FIN after " in record.getMessage()
    assert "ran on (shielded), ended after " in record.getMessage()


async def test_stats_count_completed_and_in_flight(serve: Serve) -> None:
    snapshots: list[aiodelay.Stats] = []

    async def handler(request: web.Request) -> web.Response:
        snapshots.append(aiodelay.stats(request.app))
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(f"http://127.0.0.1:{served.port}/") as resp:
                assert resp.status == 200
    assert [s.in_flight for s in snapshots] == [1, 1, 1]
    assert aiodelay.stats(served.app) == aiodelay.Stats(
        in_flight=0, completed=3, disconnected=0, cancelled=0, shielded_ran_on=0
    )


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nope", "CANCEL", "", 1, None, object()])
def test_bad_policy_values_are_rejected_naming_the_valid_ones(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"'cancel', 'shield'"):
        aiodelay.setup(web.Application(), policy=bad)
    with pytest.raises(ValueError, match=r"'cancel', 'shield'"):
        aiodelay.middleware(policy=bad)


def test_policies_accept_strings_and_the_enum() -> None:
    for policy in ("cancel", "shield", aiodelay.Policy.CANCEL, aiodelay.Policy.SHIELD):
        aiodelay.setup(web.Application(), policy=policy)


def test_setup_twice_is_an_error() -> None:
    app = web.Application()
    aiodelay.setup(app)
    with pytest.raises(RuntimeError, match="already installed"):
        aiodelay.setup(app)
    with pytest.raises(TypeError):
        aiodelay.setup(object())  # type: ignore[arg-type]


def test_setup_puts_the_middleware_outermost() -> None:
    @web.middleware
    async def other(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request)

    app = web.Application(middlewares=[other])
    aiodelay.setup(app)
    assert isinstance(app.middlewares[0], Middleware)
    assert app.middlewares[1] is other


def test_stats_without_aiodelay_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)"):
        aiodelay.stats(web.Application())


def test_public_names() -> None:
    assert set(aiodelay.__all__) >= {
        "setup",
        "middleware",
        "cancellable",
        "shielded",
        "shield",
        "notify_finish",
        "is_disconnected",
        "call_later",
        "spawn",
        "ConnectionLost",
        "stats",
    }
    assert all(hasattr(aiodelay, name) for name in aiodelay.__all__)
    assert issubclass(aiodelay.ConnectionLost, ConnectionError)


# -- transparency: what aiodelay does not touch behaves as without it -------------------------

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def _transparency_app(with_aiodelay: bool, static: Path) -> web.Application:
    @web.middleware
    async def set_id(request: web.Request, handler: Handler) -> web.StreamResponse:
        _request_id.set("id-7")
        return await handler(request)

    async def ctx(request: web.Request) -> web.Response:
        return web.Response(text=_request_id.get("unset"))

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(3):
            await response.write(f"chunk {i}\n".encode())
        await response.write_eof()
        return response

    async def file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(static)

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text="gone fishing")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ctx")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_str(f"echo {message.data}")
        return socket

    middlewares: list[Any] = [set_id]
    if with_aiodelay:
        # aiodelay outermost would run before set_id; put it inside to test that a contextvar
        # set outside it is seen by the handler, then also test setup() (outermost) below.
        middlewares.append(aiodelay.middleware())
    app = web.Application(middlewares=middlewares)
    app.add_routes(
        [
            web.get("/ctx", ctx),
            web.get("/stream", stream),
            web.get("/file", file),
            web.get("/missing", missing),
            web.get("/redirect", redirect),
            web.get("/ws", ws),
        ]
    )
    return app


async def _exercise(port: int) -> list[Any]:
    seen: list[Any] = []
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for path, headers in [
            ("/ctx", {}),
            ("/stream", {}),
            ("/file", {}),
            ("/file", {"Range": "bytes=2-5"}),
            ("/missing", {}),
            ("/redirect", {}),
        ]:
            async with session.get(base + path, headers=headers, allow_redirects=False) as resp:
                seen.append(
                    (
                        path,
                        resp.status,
                        resp.headers.get("Content-Type"),
                        resp.headers.get("Location"),
                        await resp.read(),
                    )
                )
        async with session.ws_connect(base + "/ws") as socket:
            await socket.send_str("hi")
            seen.append(("/ws", (await socket.receive()).data))
    return seen


async def test_transparent_for_what_it_does_not_touch(serve: Serve, tmp_path: Path) -> None:
    static = tmp_path / "data.txt"
    static.write_bytes(b"0123456789")
    results = []
    for with_aiodelay in (False, True):
        served = await serve(await _transparency_app(with_aiodelay, static))
        results.append(await _exercise(served.port))
    without, with_ = results
    assert with_ == without
    assert ("/ctx", 200, "text/plain; charset=utf-8", None, b"id-7") in with_
    assert ("/file", 206, "text/plain", None, b"2345") in with_
    assert ("/ws", "echo hi") in with_


class _Log(AbstractAccessLogger):
    """Records what aiohttp's access log is given."""

    lines: ClassVar[list[str]] = []

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.lines.append(
            f"{request.method} {request.path_qs} {response.status} {response.body_length}"
        )


async def test_access_log_is_the_same_with_and_without(serve: Serve, tmp_path: Path) -> None:
    static = tmp_path / "data.txt"
    static.write_bytes(b"0123456789")
    logs: list[list[str]] = []
    for with_aiodelay in (False, True):
        lines: list[str] = []
        _Log.lines = lines
        app = await _transparency_app(with_aiodelay, static)
        runner = web.AppRunner(
            app,
            handler_cancellation=False,
            access_log_class=_Log,
            access_log=logging.getLogger("t"),
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await _exercise(runner.addresses[0][1])
        await runner.cleanup()
        logs.append(lines)
    assert logs[1] == logs[0]
    assert len(logs[0]) == 7


async def test_contextvar_of_an_outer_middleware_reaches_a_handler_under_setup(
    serve: Serve,
) -> None:
    @web.middleware
    async def set_id(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = _request_id.set("inner-9")
        try:
            return await handler(request)
        finally:
            _request_id.reset(token)

    async def ctx(request: web.Request) -> web.Response:
        return web.Response(text=_request_id.get("unset"))

    app = web.Application(middlewares=[set_id])
    aiodelay.setup(app)
    app.router.add_get("/", ctx)
    served = await serve(app)
    client = await served.get("/")
    assert await client.read_response() == (200, b"inner-9")


@pytest.mark.parametrize("drop", ["FIN", "RST"])
async def test_a_websocket_handler_ends_as_without_aiodelay(serve: Serve, drop: Drop) -> None:
    """aiohttp itself ends a WebSocket handler's receive loop when the client leaves;
    aiodelay does not turn that into a cancellation."""
    probe = HandlerRun()
    events: list[str] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)

        async def receive() -> None:
            async for message in socket:
                events.append(f"got {message.data}")
            events.append("receive loop ended")

        await probe.run(request, receive())
        return socket

    served = await serve(_app(web.get("/ws", ws)))
    session = aiohttp.ClientSession()
    connection = await session.ws_connect(f"http://127.0.0.1:{served.port}/ws")
    await connection.send_str("hello")
    await probe.wait_started()
    transport = connection._response.connection.transport  # type: ignore[union-attr]
    assert transport is not None
    if drop == "RST":
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()
    await probe.wait_ended()
    await session.close()
    assert probe.completed
    assert events[-1] == "receive loop ended"
    stats = aiodelay.stats(served.app)
    assert (stats.cancelled, stats.shielded_ran_on) == (0, 1)


async def test_cleanup_cancels_a_shielded_handler_still_running_for_a_gone_client(
    serve: Serve,
) -> None:
    """aiohttp stops tracking a connection's handler once the connection is gone; aiodelay's
    cleanup cancels what still runs, so nothing is destroyed pending when the loop closes."""
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    @aiodelay.shielded
    async def handler(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)), shutdown_timeout=0.05)
    client = await served.get("/")
    await probe.wait_started()
    client.drop("FIN")
    with pytest.raises(aiodelay.ConnectionLost):
        await finish[0]  # the client is gone, the shielded handler runs on
    await served.runner.cleanup()
    assert probe.cancelled
    assert aiodelay.stats(served.app).in_flight == 0


# -- regressions found in review --------------------------------------------------------------


async def test_shielded_handler_on_an_already_closed_connection_has_the_whole_api(
    serve: Serve,
) -> None:
    """The connection closed before aiodelay saw the request; the shielded handler still
    runs, and aiodelay's functions tell it the truth."""
    seen: dict[str, Any] = {}

    @web.middleware
    async def close_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return await handler(request)

    ended = asyncio.Event()

    @aiodelay.shielded
    async def handler(request: web.Request) -> web.Response:
        try:
            seen["is_disconnected"] = aiodelay.is_disconnected(request)
            seen["notify_finish"] = repr(aiodelay.notify_finish(request).exception())
            seen["spawned"] = await aiodelay.spawn(request, asyncio.sleep(0, result="ran"))
            seen["shielded"] = await aiodelay.shield(asyncio.sleep(0, result="kept"))
        finally:
            ended.set()
        return web.Response()

    app = web.Application(middlewares=[close_first, aiodelay.middleware()])
    app.router.add_get("/", handler)
    served = await serve(app)
    client = await served.get("/")
    assert await client.reader.read() == b""
    await asyncio.wait_for(ended.wait(), 5)
    assert seen == {
        "is_disconnected": True,
        "notify_finish": "ConnectionLost('closed')",
        "spawned": "ran",
        "shielded": "kept",
    }
    stats = aiodelay.stats(app)
    assert (stats.in_flight, stats.disconnected, stats.shielded_ran_on) == (0, 1, 1)


async def test_a_shielded_section_that_raises_still_ends_in_the_cancellation(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aiodelay")
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []
    events: list[str] = []

    async def critical() -> None:
        await probe.gate
        raise ValueError("the charge failed")

    async def handler(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        try:
            await probe.run(request, aiodelay.shield(critical()))
        except ValueError:
            events.append("caught the error, carried on")
        except asyncio.CancelledError as exc:
            events.append(f"cancelled, cause {exc.__cause__!r}")
            raise
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    client.drop("RST")
    with pytest.raises(aiodelay.ConnectionLost):
        await finish[0]
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert events == ["cancelled, cause ValueError('the charge failed')"]
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


async def test_a_sub_apps_own_policy_applies_to_its_routes(serve: Serve) -> None:
    probe = HandlerRun()
    finish: list[asyncio.Future[None]] = []

    async def work(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        await probe.run(request, probe.gate)
        return web.Response()

    sub = web.Application()
    aiodelay.setup(sub, policy="shield")
    sub.router.add_get("/work", work)
    app = web.Application()
    aiodelay.setup(app, policy="cancel")
    app.add_subapp("/sub", sub)
    served = await serve(app)
    client = await served.get("/sub/work")
    await probe.wait_started()
    client.drop("FIN")
    with pytest.raises(aiodelay.ConnectionLost):
        await finish[0]
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert probe.completed  # shielded by the sub-app's policy, not cancelled by the app's


async def test_a_request_cloned_by_a_middleware_is_the_same_request(serve: Serve) -> None:
    probe = HandlerRun()
    seen: list[Any] = []

    @web.middleware
    async def rewrite(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request.clone(rel_url="/inner"))

    async def handler(request: web.Request) -> web.Response:
        finish = aiodelay.notify_finish(request)
        seen.append(finish)
        aiodelay.spawn(request, asyncio.sleep(3600))
        try:
            await probe.run(request, probe.gate)
        finally:
            seen.append(aiodelay.is_disconnected(request))
        return web.Response()

    app = web.Application(middlewares=[rewrite])
    aiodelay.setup(app)
    app.router.add_get("/{tail:.*}", handler)
    served = await serve(app)
    client = await served.get("/outer")
    await probe.wait_started()
    assert not seen[0].done()  # pending: the clone is the request in flight
    client.drop("RST")
    await probe.wait_ended()
    assert probe.cancelled
    assert isinstance(seen[0].exception(), aiodelay.ConnectionLost)
    assert seen[1] is True


async def test_no_reference_cycles_are_left_per_connection_or_request(serve: Serve) -> None:
    """What aiodelay keeps for a connection and a request is freed by reference counting,
    not left for the cyclic garbage collector."""

    async def ok(request: web.Request) -> web.Response:
        aiodelay.notify_finish(request)  # makes the state's extras
        return web.Response(text="ok")

    async def fails(request: web.Request) -> web.Response:
        aiodelay.notify_finish(request)
        raise RuntimeError("a bug")

    started = asyncio.Event()
    ended = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first line\n")
        started.set()
        try:
            await asyncio.Future()  # cancelled mid-stream when the client leaves
        finally:
            ended.set()
        return response

    async def shielded(request: web.Request) -> web.Response:
        await aiodelay.shield(asyncio.sleep(0))  # shield() finds the request on the stack
        started.set()
        try:
            await asyncio.Future()
        finally:
            ended.set()
        return web.Response()

    served = await serve(
        _app(
            web.get("/ok", ok),
            web.get("/fails", fails),
            web.get("/stream", stream),
            web.get("/shielded", shielded),
        )
    )
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for path in ["/ok", "/fails"] * 10:
            client = await served.connect()
            await client.get(path, close=True)
            await client.read_response()
            assert await client.reader.read() == b""
        for _ in range(10):
            started.clear()
            ended.clear()
            client = await served.get("/stream")
            await client.read_until(b"first line\n")
            await asyncio.wait_for(started.wait(), 5)
            client.drop("RST")
            await asyncio.wait_for(ended.wait(), 5)
        for _ in range(10):
            started.clear()
            ended.clear()
            client = await served.get("/shielded")
            await asyncio.wait_for(started.wait(), 5)
            client.drop("RST")
            await asyncio.wait_for(ended.wait(), 5)
        await _ping_until_idle(served)
        gc.collect()
        kinds = Counter(type(obj).__name__ for obj in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    ours = {name: kinds[name] for name in ("Watch", "RequestState", "_Extras", "Request")}
    assert ours == {"Watch": 0, "RequestState": 0, "_Extras": 0, "Request": 0}


async def _ping_until_idle(served: Any) -> None:
    """One more full request on a new connection: the earlier ones have been wound up."""
    client = await served.connect()
    await client.get("/ok", close=True)
    assert (await client.read_response())[0] == 200
    assert await client.reader.read() == b""


@pytest.mark.both_loops
@pytest.mark.parametrize("logged", [False, True])
async def test_a_middleware_outside_aiodelay_sees_a_drop_as_without_aiodelay(
    serve: Serve, caplog: pytest.LogCaptureFixture, logged: bool
) -> None:
    """A middleware outside aiodelay's (a parent app's, or one put before
    aiodelay.middleware()) gets the CancelledError where aiohttp logs nothing (from Python
    3.11 on), and otherwise a response of its own to look at: never one shared by every
    drop, which it could change for all the others."""
    seen: list[object] = []
    probes: list[HandlerRun] = []
    outer_ended = asyncio.Event()

    @web.middleware
    async def outer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            seen.append("CancelledError")
            outer_ended.set()
            raise
        seen.append(response)
        outer_ended.set()
        response.headers["X-Outer"] = "seen"
        return response

    async def hold(request: web.Request) -> web.Response:
        await probes[-1].run(request, asyncio.get_running_loop().create_future())
        return web.Response()

    access_log = None
    if logged:
        caplog.set_level(logging.INFO, logger="tests.access.outer")  # (enabled: aiohttp logs)
        access_log = logging.getLogger("tests.access.outer")
    app = web.Application(middlewares=[outer, aiodelay.middleware()])
    app.router.add_get("/", hold)
    served = await serve(app, access_log=access_log)
    for _ in range(2):
        probes.append(HandlerRun())
        client = await served.get("/")
        await probes[-1].wait_started()
        client.drop("RST")
        await asyncio.wait_for(outer_ended.wait(), 5)  # (a turn or two after the handler's)
        outer_ended.clear()
    # (aiohttp before 3.11 does not say whether it logs: aiodelay takes it that it does)
    aiohttp_says = tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) >= (3, 11)
    if not logged and sys.version_info >= (3, 11) and aiohttp_says:
        assert seen == ["CancelledError", "CancelledError"]
    else:
        first, second = seen
        assert isinstance(first, web.StreamResponse)
        assert isinstance(second, web.StreamResponse)
        assert (first.status, second.status) == (499, 499)
        assert first is not second


# -- graceful shutdown: the responses in flight say that the connection closes ---------------

# What a handler in flight when the server began to shut down answers: a response it returns
# (aiohttp writes it), one that aiodelay writes (an observed request), a stream it prepares
# itself; and whether aiodelay is installed (without it, aiohttp's own behaviour: the control).
SHUTDOWN_CASES = [
    ("returned", True),
    ("observed", True),
    ("stream", True),
    ("returned", False),  # aiohttp alone answers as on a connection that stays open
    ("stream", False),
]


class _Quiet:
    def request_started(self, request: web.BaseRequest) -> None:
        pass

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        pass

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        pass


@pytest.mark.parametrize(("kind", "installed"), SHUTDOWN_CASES)
async def test_a_response_in_flight_at_shutdown_says_the_connection_closes(
    serve: Serve, kind: str, installed: bool
) -> None:
    started, go, stopping, answered = (asyncio.Event() for _ in range(4))

    async def handler(request: web.Request) -> web.StreamResponse:
        started.set()
        await go.wait()
        if kind != "stream":
            return web.Response(text="done")
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"done")
        return response

    async def on_shutdown(app: web.Application) -> None:
        # The app's own shutdown work (aiodelay's hook, the first, has drained); the response
        # goes out meanwhile.
        stopping.set()
        await answered.wait()

    app = web.Application()
    app.on_shutdown.append(on_shutdown)
    if installed:
        aiodelay.setup(app)
        if kind == "observed":
            aiodelay.add_observer(app, _Quiet())
    app.router.add_get("/", handler)
    served = await serve(app, shutdown_timeout=5)
    client = await served.get("/")  # HTTP/1.1, keep-alive
    await asyncio.wait_for(started.wait(), 5)
    cleanup = asyncio.ensure_future(served.runner.cleanup())
    await asyncio.wait_for(stopping.wait(), 5)
    go.set()
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    answered.set()
    await asyncio.wait_for(cleanup, 5)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (b"\r\nConnection: close\r\n" in head) is installed, head
    await asyncio.wait_for(client.reader.read(), 5)  # and then the connection closes


async def test_a_request_sent_after_shutdown_began_is_not_read(serve: Serve) -> None:
    """A client that sends its next request before it reads ``Connection: close`` (pipelining)
    gets no answer to it: the connection closes after the response in flight."""
    started, go, stopping = asyncio.Event(), asyncio.Event(), asyncio.Event()
    handled: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        handled.append(request.path)
        started.set()
        await go.wait()
        return web.Response(text="done")

    async def on_shutdown(app: web.Application) -> None:
        stopping.set()
        await go.wait()

    app = web.Application()
    aiodelay.setup(app)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/{name}", handler)
    served = await serve(app, shutdown_timeout=5)
    client = await served.get("/first")
    await asyncio.wait_for(started.wait(), 5)
    cleanup = asyncio.ensure_future(served.runner.cleanup())
    await asyncio.wait_for(stopping.wait(), 5)
    await client.get("/second")  # read by the server or not, it must not be handled
    go.set()
    rest = await asyncio.wait_for(client.reader.read(), 5)
    await asyncio.wait_for(cleanup, 5)
    assert rest.count(b"HTTP/1.1 ") == 1, rest
    assert b"\r\nConnection: close\r\n" in rest, rest
    assert handled == ["/first"]


async def _head(client: RawClient) -> tuple[bytes, bytes]:
    """One Content-Length response: its head and its body."""
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.partition(b":")[2])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(client.reader.readexactly(length), 5)


@pytest.fixture
def long_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain of 5 s instead of 0.25: the tests below send their request once the shutdown
    began, and a machine that stalls a quarter of a second between the two must not close the
    connection first (the drain ends as soon as every connection has closed, so they do not
    take longer)."""
    monkeypatch.setattr(aiodelay._core.middleware, "SHUTDOWN_DRAIN", 5.0)


# A connection on which a client sends a request once the shutdown began, while another
# request is in flight: accepted just before and nothing sent yet (a proxy connects to send
# a request), or idle after a first request (a proxy's pool of connections).
@pytest.mark.usefixtures("long_drain")
@pytest.mark.parametrize("connection", ["new", "idle"])
async def test_a_request_sent_before_the_client_learned_of_the_shutdown_is_served(
    serve: Serve, connection: str
) -> None:
    started, go, began, accepted = (asyncio.Event() for _ in range(4))

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/held":
            started.set()
            await go.wait()
        return web.Response(text=request.path)

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/{name}", handler)
    served = await serve(app, shutdown_timeout=5)
    server = served.runner.server
    assert server is not None
    await served.get("/held")
    await asyncio.wait_for(started.wait(), 5)
    # Told when the server accepted the next connection and when its shutdown began.
    connection_made = server.connection_made
    pre_shutdown = server.pre_shutdown

    def made(handler: Any, transport: Any) -> None:
        connection_made(handler, transport)
        accepted.set()

    def shutting_down() -> None:
        pre_shutdown()
        began.set()

    server.connection_made = made  # type: ignore[method-assign]
    server.pre_shutdown = shutting_down  # type: ignore[method-assign]
    client = await served.connect()
    await asyncio.wait_for(accepted.wait(), 5)
    if connection == "idle":
        await client.get("/first")
        _, body = await _head(client)
        assert body == b"/first"
    cleanup = asyncio.ensure_future(served.runner.cleanup())
    try:
        await asyncio.wait_for(began.wait(), 5)
        await client.get("/late")
        head, body = await _head(client)
        assert body == b"/late"
        assert b"\r\nConnection: close\r\n" in head, head
    finally:
        go.set()
        await asyncio.wait_for(cleanup, 5)


@pytest.mark.parametrize("installed", ["setup", "middleware"])
async def test_an_idle_connection_does_not_hold_up_the_shutdown(
    serve: Serve, installed: str
) -> None:
    """Closed at once when nothing is in flight: aiohttp's shutdown would wait its whole
    ``shutdown_timeout`` for a connection still reading."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application(middlewares=[aiodelay.middleware()] if installed == "middleware" else [])
    if installed == "setup":
        aiodelay.setup(app)
    app.router.add_get("/", handler)
    served = await serve(app, shutdown_timeout=60)
    client = await served.get("/")
    assert (await _head(client))[1] == b"done"
    await asyncio.wait_for(served.runner.cleanup(), 5)
    assert await asyncio.wait_for(client.reader.read(), 5) == b""


@pytest.mark.usefixtures("long_drain")
async def test_the_next_request_after_a_response_sent_before_the_shutdown_is_served(
    serve: Serve,
) -> None:
    """A handler still runs when the shutdown begins, but its whole response went out before,
    as on a connection that stays open: its client sends its next request on it, which is
    served (saying that the connection closes), not read and dropped."""
    sent, go, began = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/late":
            return web.Response(text="/late")
        response = web.StreamResponse()
        response.content_length = 5
        await response.prepare(request)
        await response.write(b"first")
        await response.write_eof()
        sent.set()
        await go.wait()  # the handler's work after its response (a log line, a commit...)
        return response

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/{name}", handler)
    served = await serve(app, shutdown_timeout=5)
    server = served.runner.server
    assert server is not None
    client = await served.get("/first")
    await asyncio.wait_for(sent.wait(), 5)
    head, body = await _head(client)
    assert body == b"first"
    assert b"Connection" not in head, head  # a keep-alive response, before the shutdown
    pre_shutdown = server.pre_shutdown

    def shutting_down() -> None:
        pre_shutdown()
        began.set()

    server.pre_shutdown = shutting_down  # type: ignore[method-assign]
    cleanup = asyncio.ensure_future(served.runner.cleanup())
    try:
        await asyncio.wait_for(began.wait(), 5)
        await client.get("/late")
        go.set()
        head, body = await _head(client)
        assert body == b"/late"
        assert b"\r\nConnection: close\r\n" in head, head
    finally:
        go.set()
        await asyncio.wait_for(cleanup, 5)


async def test_a_middleware_served_again_after_a_shutdown_keeps_connections_alive(
    serve: Serve,
) -> None:
    """One ``aiodelay.middleware()`` object in the apps of two runners, one after the other
    (an app factory's, a restarted app's): the first runner's shutdown is over for the second,
    whose responses keep their connections alive."""
    mw = aiodelay.middleware()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="done")

    heads: list[bytes] = []
    for _ in range(2):
        app = web.Application(middlewares=[mw])
        app.router.add_get("/", handler)
        served = await serve(app)
        client = await served.connect()
        for _ in range(2):  # the second on the same connection: it was kept alive
            await client.get("/")
            head, body = await _head(client)
            assert body == b"done"
            heads.append(head)
        await served.runner.cleanup()
    assert not [head for head in heads if b"Connection: close" in head], heads
    assert not mw.shutting_down
    assert not mw.servers  # the first runner's server is not kept


class _SeenInSub:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def request_started(self, request: web.BaseRequest) -> None:
        self.events.append(("started", request.path))

    def request_lost(self, request: web.BaseRequest, lost: object) -> None:
        self.events.append(("lost", request.path))

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        self.events.append((outcome.kind, request.path))


async def test_a_middleware_shared_by_two_apps_counts_a_drop_where_it_counted_its_start(
    serve: Serve,
) -> None:
    """One ``aiodelay.middleware()`` object in two apps (an app factory's apps): it learns its
    first app's shape. A drop in the second app's sub-app, which has aiodelay of its own, is
    counted and told in the sub-app's installation only if its start was too."""
    shared = aiodelay.middleware()
    probe = HandlerRun()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    first = web.Application(middlewares=[shared])
    first.router.add_get("/", ok)
    second = web.Application(middlewares=[shared])
    sub = web.Application()
    aiodelay.setup(sub)
    seen = _SeenInSub()
    aiodelay.add_observer(sub, seen)
    sub.router.add_get("/slow", slow)
    second.add_subapp("/sub", sub)

    one = await serve(first)
    client = await one.get("/")
    await client.read_response()
    two = await serve(second)
    dropped = await two.get("/sub/slow")
    await probe.wait_started()
    dropped.drop("RST")
    await probe.wait_ended()
    await recorded(second)
    stats = aiodelay.stats(sub)
    assert stats.in_flight >= 0, (stats, seen.events)
    assert [kind for kind, _ in seen.events].count("started") >= sum(
        kind not in ("started", "lost") for kind, _ in seen.events
    ), seen.events
