"""aiodelay.shield() (``aiodelay/_core/shield.py``): a critical section that a disconnect
does not interrupt."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

import aiodelay
from tests.conftest import HandlerRun, Serve, connection_gone


def _app(*routes: web.RouteDef, policy: str = "cancel") -> web.Application:
    app = web.Application()
    aiodelay.setup(app, policy=policy)
    app.add_routes(routes)
    return app


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


@pytest.mark.both_loops
async def test_shield_in_a_task_the_handler_started_says_to_await_it_in_the_handlers_task(
    serve: Serve,
) -> None:
    """aiodelay is installed; shield() awaited in a plain task the handler started cannot
    protect that task: the RuntimeError says so, not that aiodelay is not installed."""
    errors: list[RuntimeError] = []

    async def section() -> None:
        await aiodelay.shield(asyncio.sleep(0))

    async def handler(request: web.Request) -> web.Response:
        try:
            await asyncio.create_task(section())
        except RuntimeError as exc:
            errors.append(exc)
        return web.Response(text="ok")

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    assert await asyncio.wait_for(client.read_response(), 5) == (200, b"ok")
    [error] = errors
    assert "not installed" not in str(error)
    assert "handler's own task" in str(error)


async def test_shield_finishes_the_critical_section_then_cancels(serve: Serve) -> None:
    events: list[str] = []
    probe = HandlerRun()
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


@pytest.mark.both_loops
async def test_shield_in_a_sub_app_with_aiodelay_of_its_own(serve: Serve) -> None:
    """Two aiodelay middlewares on the stack: shield() finds the request all the same."""
    events: list[str] = []
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    in_section, ended = asyncio.Event(), asyncio.Event()
    requests: list[web.BaseRequest] = []

    async def critical() -> None:
        in_section.set()
        await gate
        events.append("section done")

    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        try:
            await aiodelay.shield(critical())
            events.append("after the section")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        finally:
            ended.set()
        return web.Response()

    sub = web.Application()
    aiodelay.setup(sub)
    sub.add_routes([web.get("/x", handler)])
    app = web.Application()
    aiodelay.setup(app)
    app.add_subapp("/sub", sub)
    served = await serve(app)
    client = await served.get("/sub/x")
    await asyncio.wait_for(in_section.wait(), 5)
    client.drop("RST")
    await connection_gone(requests[0])
    assert events == []  # held back by the section
    gate.set_result(None)
    await asyncio.wait_for(ended.wait(), 5)
    assert events == ["section done", "cancelled"]
