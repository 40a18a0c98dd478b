"""The public observer hook: aiodelay.add_observer, RequestObserver, Outcome."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

import aiodelay
from tests.conftest import HandlerRun, RecordingObserver, Serve, Served


async def _serve_observed(
    serve: Serve, routes: dict[str, Handler]
) -> tuple[Served, RecordingObserver]:
    """An app with aiodelay, ``routes`` (GET) and a :class:`RecordingObserver` observing it,
    served."""
    app = web.Application()
    aiodelay.setup(app)
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    recorder = RecordingObserver()
    aiodelay.add_observer(app, recorder)
    return await serve(app), recorder


class _Broken:
    def request_started(self, request: web.BaseRequest) -> None:
        raise RuntimeError("started")

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        raise RuntimeError("lost")

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        raise RuntimeError("ended")


def test_the_hook_is_public() -> None:
    assert {"add_observer", "RequestObserver", "Outcome", "OutcomeKind"} <= set(aiodelay.__all__)
    recorder: aiodelay.RequestObserver = RecordingObserver()  # the Protocol fits a plain class
    assert recorder is not None


def test_add_observer_without_aiodelay_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)"):
        aiodelay.add_observer(web.Application(), RecordingObserver())


async def test_an_observer_hears_start_loss_and_end_once_and_can_be_removed(
    serve: Serve,
) -> None:
    probe = HandlerRun()

    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/slow", slow)
    app.router.add_get("/", hello)
    recorder = RecordingObserver()
    remove = aiodelay.add_observer(app, recorder)
    served = await serve(app)
    client = await served.get("/slow")
    await probe.wait_started()
    client.drop("RST")
    await probe.wait_ended()
    other = await served.get("/")
    assert await other.read_response() == (200, b"hi")
    assert recorder.events == [
        "started /slow",
        "lost RST",
        "ended cancelled",
        "started /",
        "ended completed",
    ]
    cancelled, completed = recorder.outcomes
    assert cancelled.lost is not None
    assert cancelled.lost.reason == "RST"
    assert cancelled.started_at <= (cancelled.lost_at or 0) <= cancelled.ended_at
    assert (completed.lost, completed.lost_at, completed.client) == (None, None, "127.0.0.1")
    # A completed request's outcome is made without the dataclass's __init__ (for its cost),
    # and is the dataclass's own all the same.
    rebuilt = aiodelay.Outcome(*dataclasses.astuple(completed))
    assert type(completed) is aiodelay.Outcome
    # Every field set (budget_from by its default): a field added to Outcome must be set too.
    assert [*vars(completed), "budget_from"] == [f.name for f in dataclasses.fields(completed)]
    assert (completed, hash(completed), repr(completed)) == (rebuilt, hash(rebuilt), repr(rebuilt))
    with pytest.raises(dataclasses.FrozenInstanceError):
        completed.kind = "failed"  # type: ignore[misc]
    remove()
    remove()  # a second call does nothing
    await other.get("/")
    assert await other.read_response() == (200, b"hi")
    assert len(recorder.events) == 5


async def test_a_broken_observer_is_logged_and_the_request_goes_on(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aiodelay")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    aiodelay.add_observer(app, _Broken())
    recorder = RecordingObserver()
    aiodelay.add_observer(app, recorder)
    served = await serve(app)
    client = await served.get("/")
    assert await client.read_response() == (200, b"hi")
    await client.get("/")
    assert await client.read_response() == (200, b"hi")
    assert recorder.events == ["started /", "ended completed"] * 2
    messages = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert len(messages) == 4
    assert all("failed" in m for m in messages)


async def test_an_observed_app_serves_files_without_an_error_and_keeps_alive(
    serve: Serve, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """With observers, aiodelay writes each response to its end itself; aiohttp's
    finish_response() then prepares it again, which FileResponse did not survive."""
    caplog.set_level(logging.DEBUG)
    data = tmp_path / "data.bin"
    data.write_bytes(b"0123456789" * 1000)

    async def file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(data)

    served, recorder = await _serve_observed(serve, {"/data.bin": file})
    client = await served.connect()
    for _ in range(2):  # the same connection: keep-alive survives
        await client.get("/data.bin")
        assert await client.read_response() == (200, data.read_bytes())
    await recorder.wait_ends(2)
    assert recorder.events == ["started /data.bin", "ended completed"] * 2
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_middleware_outside_aiodelay_still_changes_an_observed_response(
    serve: Serve,
) -> None:
    """aiodelay writes an observed response itself only where nothing but aiohttp sees it
    after aiodelay: here a middleware outside it adds a header after the handler."""

    @web.middleware
    async def stamp(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["X-Stamp"] = "outer"
        return response

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application(middlewares=[stamp, aiodelay.middleware()])
    app.router.add_get("/", hello)
    recorder = RecordingObserver()
    aiodelay.add_observer(app, recorder)
    served = await serve(app)
    client = await served.connect()
    for _ in range(2):
        await client.get("/")
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert b"\r\nX-Stamp: outer\r\n" in head
        assert await client.reader.readexactly(2) == b"hi"
    await recorder.wait_ends(2)
    assert recorder.events == ["started /", "ended completed"] * 2


async def test_an_on_response_prepare_handler_that_raises_is_met_as_without_aiodelay(
    serve: Serve,
) -> None:
    """aiohttp writes the responses of an app with on_response_prepare handlers itself (they
    see request.app as aiohttp sets it): one that raises closes the connection with nothing
    sent, as without aiodelay; the observer hears one end; the server serves on."""
    fail = [True]

    async def refuse(request: web.BaseRequest, response: web.StreamResponse) -> None:
        if fail:
            fail.clear()
            raise ConnectionRefusedError("the session store is down")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    app.on_response_prepare.append(refuse)
    app.router.add_get("/", hello)
    recorder = RecordingObserver()
    aiodelay.add_observer(app, recorder)
    served = await serve(app)
    client = await served.get("/")
    assert await client.reader.read() == b""  # closed, no byte of a response
    await recorder.wait_ends(1)
    client = await served.get("/")
    assert await client.read_response() == (200, b"hi")
    await recorder.wait_ends(2)
    assert recorder.events[:1] == ["started /"]
    assert recorder.events[2:] == ["started /", "ended completed"]


async def test_a_sub_app_on_response_prepare_handler_sees_its_app(serve: Serve) -> None:
    key = web.AppKey("key", str)
    seen: list[str] = []

    async def mark(request: web.BaseRequest, response: web.StreamResponse) -> None:
        assert isinstance(request, web.Request)
        seen.append(request.app[key])

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    sub = web.Application()
    sub[key] = "sub"
    sub.on_response_prepare.append(mark)
    sub.router.add_get("/x", hello)
    app.add_subapp("/s", sub)
    recorder = RecordingObserver()
    aiodelay.add_observer(app, recorder)
    served = await serve(app)
    client = await served.get("/s/x")
    assert await client.read_response() == (200, b"hi")
    await recorder.wait_ends(1)
    assert seen == ["sub"]
    assert recorder.events == ["started /s/x", "ended completed"]


async def test_a_response_aiohttp_cannot_write_is_logged_and_closed_as_without_aiodelay(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A header aiohttp refuses to write, where aiodelay writes the observed response: logged
    as aiohttp logs it, the connection closed with nothing sent, the request failed."""
    caplog.set_level(logging.ERROR)

    async def bad(request: web.Request) -> web.Response:
        return web.Response(text="hi", headers={"X-Bad": "a\r\nb"})

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    served, recorder = await _serve_observed(serve, {"/bad": bad, "/": hello})
    client = await served.get("/")  # (the first response of its class)
    assert await client.read_response() == (200, b"hi")
    await client.get("/bad")
    assert await client.reader.read() == b""
    await recorder.wait_ends(2)
    assert recorder.events[2:] == ["started /bad", "ended failed"]
    assert any(r.getMessage() == "Unhandled exception" for r in caplog.records)
    client = await served.get("/")
    assert await client.read_response() == (200, b"hi")


def test_make_outcome_makes_what_the_dataclass_makes() -> None:
    from aiodelay._core.observe import make_outcome, note_budget

    lost = aiodelay.ConnectionLost("RST")
    values = ("cancelled", lost, 1.0, 1.5, 2.0, "127.0.0.1")
    made, built = make_outcome(*values), aiodelay.Outcome(*values)  # type: ignore[arg-type]
    # Every field it sets; budget_from only for a request a budget from upstream set the
    # deadline of (note_budget), else the class's default answers.
    names = [f.name for f in dataclasses.fields(built)]
    assert names == [*vars(made), "budget_from"]
    assert (made, hash(made), repr(made)) == (built, hash(built), repr(built))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.kind = "completed"  # type: ignore[misc]
    budgeted = make_outcome(*values)  # type: ignore[arg-type]
    note_budget(budgeted, "grpc-timeout")
    built = aiodelay.Outcome(*values, budget_from="grpc-timeout")  # type: ignore[arg-type]
    assert (budgeted, hash(budgeted), repr(budgeted)) == (built, hash(built), repr(built))


async def test_a_response_class_with_its_own_prepare_is_observed_as_completed(
    serve: Serve,
) -> None:
    prepared: list[str] = []

    class Counted(web.Response):
        async def prepare(self, request: web.BaseRequest) -> Any:
            prepared.append(request.path)
            return await super().prepare(request)

    async def hello(request: web.Request) -> web.Response:
        return Counted(text="hi")

    served, recorder = await _serve_observed(serve, {"/": hello})
    client = await served.get("/")
    assert await client.read_response() == (200, b"hi")
    await recorder.wait_ends(1)
    assert recorder.events == ["started /", "ended completed"]
    assert prepared == ["/"]  # aiohttp prepared it, once


@pytest.mark.parametrize("ends_it_itself", [True, False], ids=["handler-ends", "aiohttp-ends"])
async def test_a_streamed_response_is_observed_as_completed_once_its_end_is_written(
    serve: Serve, ends_it_itself: bool
) -> None:
    """An observed streamed response is completed once its end is written: by the handler
    itself, or after it returned (the middleware writes it, as aiohttp would next)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 4
        await response.prepare(request)
        await response.write(b"hi")
        await response.write(b"!!")
        if ends_it_itself:
            await response.write_eof()
        return response

    served, recorder = await _serve_observed(serve, {"/": stream})
    client = await served.get("/")
    assert await client.read_response() == (200, b"hi!!")
    await recorder.wait_ends(1)
    await client.get("/")
    assert await client.read_response() == (200, b"hi!!")
    await recorder.wait_ends(2)
    assert recorder.events == ["started /", "ended completed"] * 2
    assert [outcome.kind for outcome in recorder.outcomes] == ["completed"] * 2


@pytest.mark.parametrize("raised", [RuntimeError, ConnectionResetError])
async def test_an_error_in_aiohttps_write_of_the_end_ends_an_observed_request_by_its_kind(
    serve: Serve,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    raised: type[Exception],
) -> None:
    """Writing the end of an observed response raises: an error of aiohttp's own fails the
    request (logged as aiohttp logs it, the connection closed), a ``ConnectionError`` (the
    client left) truncates it."""
    from aiohttp import http_writer

    caplog.set_level(logging.ERROR)
    write_eof = http_writer.StreamWriter.write_eof
    # An error of aiohttp's own, once (aiohttp's second write of the end, next, meets the
    # connection that the first one closed); a client gone, at every write.
    faults: list[bytes] = []

    async def failing(writer: http_writer.StreamWriter, chunk: bytes = b"") -> None:
        if chunk == b"boom" and (raised is not RuntimeError or not faults):
            faults.append(chunk)
            raise raised("boom")
        await write_eof(writer, chunk)

    monkeypatch.setattr(http_writer.StreamWriter, "write_eof", failing)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=request.path[1:].encode())

    served, recorder = await _serve_observed(serve, {"/{name}": handler})
    client = await served.get("/hi")
    assert await client.read_response() == (200, b"hi")
    await client.get("/boom")
    await recorder.wait_ends(2)
    kind = "failed" if raised is RuntimeError else "truncated"
    assert recorder.events[2:] == ["started /boom", f"ended {kind}"]
    # The connection closes without the body (aiohttp before 3.12 sent the head already).
    assert not (await client.reader.read()).endswith(b"boom")
    # Logged once, as aiohttp logs an error of its own (aiohttp's second write of the end
    # then meets the closed connection, quietly).
    logged = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert logged == (["Unhandled exception"] if raised is RuntimeError else [])


async def test_an_observed_request_that_completed_is_settled_and_lets_go_of_its_request(
    serve: Serve,
) -> None:
    """Once its response is written, an observed request's outcome is final (its end after
    the handler's return), and its state no longer holds the request."""
    from aiodelay._core.aiohttp_internals import state_of
    from aiodelay._core.state import SETTLED

    returned: list[float] = []
    requests: list[web.Request] = []

    async def hello(request: web.Request) -> web.Response:
        requests.append(request)
        returned.append(time.monotonic())
        return web.Response(text="hi")

    served, recorder = await _serve_observed(serve, {"/": hello})
    client = await served.connect()
    for count in (1, 2):  # (the next request on a connection lets go of the one before)
        await client.get("/")
        assert await client.read_response() == (200, b"hi")
        await recorder.wait_ends(count)
        request, outcome, handler_returned = requests[-1], recorder.outcomes[-1], returned[-1]
        assert outcome.started_at <= handler_returned <= outcome.ended_at
        state = state_of(request)
        assert (state.phase, state.request, state.task) == (SETTLED, None, None)
