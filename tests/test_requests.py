"""The public functions that ask about a request (``aiodelay/_core/requests.py``):
notify_finish and is_disconnected, before and after the request's end, and what a disconnect
does in which order.

What a request owns (call_later, spawn, to_thread) is tested in test_owned.py, shield() in
test_shield.py.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import aiodelay
from tests.conftest import Drop, HandlerRun, Lines, Serve


def _app(*routes: web.RouteDef, policy: str = "cancel") -> web.Application:
    app = web.Application()
    aiodelay.setup(app, policy=policy)
    app.add_routes(routes)
    return app


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
    probe = HandlerRun()

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
    probe = HandlerRun()

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
    probe = HandlerRun()
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


# -- asked after the end, with nothing asked while the request ran --------------------------


@pytest.mark.both_loops
async def test_notify_finish_asked_after_the_end_fails_with_the_handlers_error(
    serve: Serve,
) -> None:
    """A handler raised; nothing asked aiodelay about the request while it ran. Asked after
    the end, notify_finish fails with what the handler raised, as it does when asked before."""
    kept: list[web.Request] = []

    async def broken(request: web.Request) -> web.Response:
        kept.append(request)
        raise RuntimeError("boom")

    served = await serve(_app(web.get("/broken", broken)))
    client = await served.get("/broken")
    assert (await asyncio.wait_for(client.read_response(), 5))[0] == 500
    assert aiodelay.stats(served.app).completed == 1  # its client did not leave: ended
    [request] = kept
    with pytest.raises(RuntimeError, match=r"^boom$"):
        await asyncio.wait_for(aiodelay.notify_finish(request), 5)


@pytest.mark.both_loops
async def test_a_download_cut_short_is_disconnected_when_asked_after_the_end(
    serve: Serve, lines: Lines
) -> None:
    """The handler returned a large response and its client reset the connection while aiohttp
    wrote it; nothing asked aiodelay about the request while it ran. Asked after the end:
    notify_finish fails with ConnectionLost, and is_disconnected is True."""
    kept: list[web.Request] = []

    async def download(request: web.Request) -> web.Response:
        kept.append(request)
        return web.Response(body=b"x" * 16_000_000)

    served = await serve(_app(web.get("/big", download)))
    client = await served.connect()
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    await client.get("/big")
    await client.read_until(b"HTTP/1.1 200 OK\r\n")
    client.drop("RST")
    await lines.wait_for("cut short")
    assert aiodelay.stats(served.app).truncated == 1
    [request] = kept
    assert aiodelay.is_disconnected(request)
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(aiodelay.notify_finish(request), 5)
    assert aiodelay.is_disconnected(request)
