"""notify_finish, is_disconnected, request-scoped timers and tasks, shield()."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import aiodelay
from tests.conftest import Drop, Probe, Serve


def _app(*routes: web.RouteDef, policy: str = "cancel") -> web.Application:
    app = web.Application()
    aiodelay.setup(app, policy=policy)
    app.add_routes(routes)
    return app


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


# -- notify_finish -------------------------------------------------------------------------


async def test_notify_finish_resolves_after_write_eof(serve: Serve) -> None:
    """The future is pending when the handler returns; it resolves once the whole body is
    written (body_length is only set by write_eof)."""
    body = b"x" * 3_000_000  # larger than the socket buffers: the write has to wait
    seen: list[Any] = []
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        response = web.Response(body=body)
        first, second = aiodelay.notify_finish(request), aiodelay.notify_finish(request)
        assert first is not second
        second.cancel()  # one caller giving up does not affect another

        def record(future: asyncio.Future[None]) -> None:
            # body_length (bytes written, headers included) is set only by write_eof.
            seen.append((future.result(), response.body_length > len(body)))
            done.set()

        first.add_done_callback(record)
        return response

    served = await serve(_app(web.get("/", handler)))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{served.port}/") as resp,
    ):
        assert await resp.read() == body
    await asyncio.wait_for(done.wait(), 5)
    assert seen == [(None, True)]


@pytest.mark.parametrize(("drop", "reason"), [("half-close", "FIN"), ("RST", "RST")])
async def test_notify_finish_fails_when_client_leaves_mid_body(
    serve: Serve, drop: Drop, reason: str
) -> None:
    """The handler is done, aiohttp is writing a large body, and the client leaves. The future
    says so once aiohttp is done with the response: a client that only half-closed could still
    read it all (see test_outcome.py), so the half-closing client here then goes away."""
    futures: list[asyncio.Future[None]] = []

    async def handler(request: web.Request) -> web.Response:
        futures.append(aiodelay.notify_finish(request))
        return web.Response(body=b"x" * 20_000_000)

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await client.read_until(b"xxxx")
    client.drop(drop)
    if drop == "half-close":
        client.writer.transport.abort()  # the FIN went out first, at the half-close
    with pytest.raises(aiodelay.ConnectionLost) as caught:
        await asyncio.wait_for(futures[0], 5)
    assert caught.value.reason == reason


async def test_notify_finish_fails_when_shielded_stream_loses_client(serve: Serve) -> None:
    """A shielded handler streams on; the future fails as soon as the client is gone."""
    futures: list[asyncio.Future[None]] = []
    probe = Probe()

    @aiodelay.shielded
    async def handler(request: web.Request) -> web.StreamResponse:
        futures.append(aiodelay.notify_finish(request))
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first line\n")
        await probe.run(request, probe.gate)
        return response

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await client.read_until(b"first line\n")
    client.drop("RST")
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(futures[0], 5)
    assert probe.request is not None
    assert aiodelay.is_disconnected(probe.request)
    assert not probe.ended.is_set()  # shielded: still running
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert probe.completed


async def test_notify_finish_after_the_end_reports_the_outcome(serve: Serve) -> None:
    requests: list[web.BaseRequest] = []
    probe = Probe()

    async def ok(request: web.Request) -> web.Response:
        requests.append(request)
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/ok", ok), web.get("/slow", slow)))
    client = await served.connect()
    await client.get("/ok", close=True)
    assert await client.read_response() == (200, b"ok")
    assert await client.reader.read() == b""  # the server closed: all is written
    completed = aiodelay.notify_finish(requests[0])
    assert completed.done()
    assert completed.result() is None
    assert not aiodelay.is_disconnected(requests[0])

    client = await served.get("/slow")
    await probe.wait_started()
    client.drop("FIN")
    await probe.wait_ended()
    assert probe.request is not None
    interrupted = aiodelay.notify_finish(probe.request)
    assert interrupted.done()
    exc = interrupted.exception()
    assert isinstance(exc, aiodelay.ConnectionLost)
    assert exc.reason == "FIN"
    assert aiodelay.is_disconnected(probe.request)


async def test_notify_finish_resolves_after_a_raised_http_exception_is_written(
    serve: Serve,
) -> None:
    futures: list[asyncio.Future[None]] = []

    async def handler(request: web.Request) -> web.Response:
        futures.append(aiodelay.notify_finish(request))
        raise web.HTTPNotFound(text="no such thing")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    assert await client.read_response() == (404, b"no such thing")
    await asyncio.wait_for(futures[0], 5)
    assert futures[0].result() is None


async def test_notify_finish_fails_with_the_handlers_exception(serve: Serve) -> None:
    futures: list[asyncio.Future[None]] = []

    async def handler(request: web.Request) -> web.Response:
        futures.append(aiodelay.notify_finish(request))
        raise LookupError("a bug")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    status, _ = await client.read_response()
    assert status == 500
    with pytest.raises(LookupError):
        await futures[0]


@pytest.mark.parametrize(
    ("call", "args"),
    [
        (aiodelay.notify_finish, ()),
        (aiodelay.is_disconnected, ()),
        (aiodelay.call_later, (1, print)),
    ],
)
async def test_functions_need_setup(serve: Serve, call: Any, args: tuple[Any, ...]) -> None:
    errors: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)") as caught:
            call(request, *args)
        errors.append(str(caught.value))
        return web.Response()

    app = web.Application()
    app.router.add_get("/", handler)
    served = await serve(app)
    client = await served.get("/")
    assert (await client.read_response())[0] == 200
    assert len(errors) == 1


async def test_spawn_and_shield_need_setup(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)"):
            aiodelay.spawn(request, coro)  # and the coroutine is closed: no "never awaited"
        with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)"):
            await aiodelay.shield(asyncio.sleep(0))
        return web.Response(text="checked")

    app = web.Application()
    app.router.add_get("/", handler)
    served = await serve(app)
    client = await served.get("/")
    assert await client.read_response() == (200, b"checked")


# -- the order of what a disconnect does ----------------------------------------------------


async def test_disconnect_fails_futures_then_cancels_timers_and_tasks_then_the_handler(
    serve: Serve,
) -> None:
    events: list[str] = []
    probe = Probe()
    timers: list[asyncio.TimerHandle] = []

    async def background() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            events.append("task cancelled")
            raise

    async def handler(request: web.Request) -> web.Response:
        timers.append(aiodelay.call_later(request, 60, events.append, "timer fired"))

        def on_finish(future: asyncio.Future[None]) -> None:
            events.append(f"future failed: {future.exception()!r}")

        aiodelay.notify_finish(request).add_done_callback(on_finish)
        aiodelay.spawn(request, background())
        try:
            await probe.run(request, probe.gate)
        except asyncio.CancelledError:
            events.append("handler cancelled")
            raise
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    client.drop("RST")
    await probe.wait_ended()
    assert events == [
        "future failed: ConnectionLost('RST')",
        "task cancelled",
        "handler cancelled",
    ]
    assert timers[0].cancelled()


# -- request-scoped timers and tasks ------------------------------------------------------


async def test_timers_and_tasks_are_cancelled_when_the_request_ends(serve: Serve) -> None:
    owned: list[Any] = []
    fired = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        owned.append(aiodelay.call_later(request, 0, fired.set))
        owned.append(aiodelay.call_later(request, 3600, print, "never"))
        owned.append(aiodelay.spawn(request, _forever()))
        await fired.wait()  # the first timer runs while the request is alive
        return web.Response(text="ok")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    assert await client.read_response() == (200, b"ok")
    _, pending_timer, task = owned
    assert pending_timer.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_shielded_handler_keeps_its_timers_until_it_ends(serve: Serve) -> None:
    probe = Probe()
    owned: list[Any] = []

    @aiodelay.shielded
    async def handler(request: web.Request) -> web.Response:
        owned.append(aiodelay.notify_finish(request))
        owned.append(aiodelay.call_later(request, 3600, print, "never"))
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    client.drop("FIN")
    finish, timer = owned
    with pytest.raises(aiodelay.ConnectionLost):
        await finish
    assert not timer.cancelled()  # the client left, the shielded handler still owns it
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert timer.cancelled()  # the handler ended


async def test_errors_in_timers_and_tasks_are_logged_never_lost(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aiodelay")
    both = asyncio.Event()
    count: list[int] = []

    def broken_timer() -> None:
        count.append(1)
        if len(count) == 2:
            both.set()
        raise ValueError("timer bug")

    async def broken_task() -> None:
        broken_timer()

    async def handler(request: web.Request) -> web.Response:
        aiodelay.call_later(request, 0, broken_timer)
        task = aiodelay.spawn(request, broken_task())
        await both.wait()
        # asyncio.wait() returns after the task's earlier done-callbacks, aiodelay's among them.
        await asyncio.wait({task})
        return web.Response(text="still fine")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    assert await client.read_response() == (200, b"still fine")
    messages = [r for r in caplog.records if r.name == "aiodelay"]
    assert len(messages) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in messages)
    assert {r.getMessage().split()[0] for r in messages} == {"timer", "task"}


async def test_spawn_after_the_end_raises(serve: Serve) -> None:
    requests: list[web.BaseRequest] = []

    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await client.read_response()
    with pytest.raises(RuntimeError, match="already ended"):
        aiodelay.spawn(requests[0], asyncio.sleep(0))
    with pytest.raises(RuntimeError, match="already ended"):
        aiodelay.call_later(requests[0], 1, print)


# -- shield() ------------------------------------------------------------------------------


async def test_shield_finishes_the_critical_section_then_cancels(serve: Serve) -> None:
    events: list[str] = []
    probe = Probe()
    finish: list[asyncio.Future[None]] = []

    async def critical() -> str:
        await probe.gate
        events.append("critical section done")
        return "charged"

    async def handler(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        try:
            await probe.run(request, aiodelay.shield(critical()))
            events.append("after the section")
        except asyncio.CancelledError:
            events.append("handler cancelled")
            raise
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    client.drop("RST")
    with pytest.raises(aiodelay.ConnectionLost):
        await finish[0]
    assert events == []  # the disconnect is held back
    probe.gate.set_result(None)
    await probe.wait_ended()
    assert events == ["critical section done", "handler cancelled"]
    assert aiodelay.stats(served.app).cancelled == 1


async def test_shield_finds_its_request_through_nested_coroutines_among_many(
    serve: Serve,
) -> None:
    """shield() called two coroutines below the handler holds back the disconnect of its
    own request, while other requests are held on other connections."""
    events: list[str] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    held = asyncio.Event()
    in_section = asyncio.Event()
    ended = asyncio.Event()
    holding = 0

    async def critical() -> None:
        in_section.set()
        await gate
        events.append("section done")

    async def helper() -> None:
        await aiodelay.shield(critical())

    async def outer() -> None:
        await helper()

    finish: list[asyncio.Future[None]] = []

    async def handler(request: web.Request) -> web.Response:
        finish.append(aiodelay.notify_finish(request))
        try:
            await outer()
            events.append("after the section")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            ended.set()
        return web.Response()

    async def hold(request: web.Request) -> web.Response:
        nonlocal holding
        holding += 1
        if holding == 5:
            held.set()
        await _forever()
        return web.Response()  # pragma: no cover - never reached

    served = await serve(_app(web.get("/", handler), web.get("/hold", hold)))
    for _ in range(5):
        await served.get("/hold")
    await asyncio.wait_for(held.wait(), 5)
    client = await served.get("/")
    await asyncio.wait_for(in_section.wait(), 5)
    client.drop("FIN")
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(finish[0], 5)
    assert events == []  # the section holds the cancellation back until it ends
    gate.set_result(None)
    await asyncio.wait_for(ended.wait(), 5)
    assert events == ["section done", "cancelled"]
    assert aiodelay.stats(served.app).in_flight == 5  # the others are still held


async def test_shield_in_a_task_the_handler_started_is_not_the_handlers(serve: Serve) -> None:
    """The handler's request is not found from a task of its own (only from aiodelay.spawn's
    tasks, where shield() is a plain await): RuntimeError, as outside any request."""
    raised: list[BaseException] = []

    async def section() -> None:
        try:
            await aiodelay.shield(asyncio.sleep(0))
        except RuntimeError as exc:
            raised.append(exc)

    async def handler(request: web.Request) -> web.Response:
        await asyncio.create_task(section())
        return web.Response(text="ok")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    assert await client.read_response() == (200, b"ok")
    assert len(raised) == 1
    assert "aiodelay" in str(raised[0])


# -- leaks ---------------------------------------------------------------------------------


async def test_no_tasks_or_timers_left_after_1000_disconnects(serve: Serve) -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        aiodelay.notify_finish(request)
        aiodelay.call_later(request, 3600, print, "never")
        aiodelay.spawn(request, _forever())
        started.set()
        try:
            await loop.create_future()
        finally:
            ended.set()
        return web.Response()

    def live_timers() -> int:
        scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
        return sum(1 for handle in scheduled if not handle.cancelled())

    served = await serve(_app(web.get("/", handler)))
    tasks_before, timers_before = len(asyncio.all_tasks()), live_timers()
    for i in range(1000):
        started.clear()
        ended.clear()
        client = await served.get("/")
        await asyncio.wait_for(started.wait(), 5)
        client.drop("RST" if i % 2 else "FIN")
        await asyncio.wait_for(ended.wait(), 5)
        served.clients.clear()
    # Cancelled tasks finish on their next step, and aiohttp's connection tasks end after
    # the handler: wait for exactly those, without sleeping.
    others = asyncio.all_tasks() - {asyncio.current_task()}
    leftover = [t for t in others if "RequestHandler.start" in repr(t) or "Future" in repr(t)]
    await asyncio.wait_for(asyncio.gather(*leftover, return_exceptions=True), 5)
    assert len(asyncio.all_tasks()) == tasks_before
    assert live_timers() <= timers_before
    stats = aiodelay.stats(served.app)
    assert (stats.in_flight, stats.disconnected, stats.cancelled) == (0, 1000, 1000)
