"""The public observer hook: aiodelay.add_observer, RequestObserver, Outcome."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp import web

import aiodelay
from tests.conftest import Probe, Serve


class _Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.outcomes: list[aiodelay.Outcome] = []
        self.ended = asyncio.Event()

    def request_started(self, request: web.BaseRequest) -> None:
        self.events.append(f"started {request.path}")

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        self.events.append(f"lost {lost.reason}")

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        self.events.append(f"ended {outcome.kind}")
        self.outcomes.append(outcome)
        self.ended.set()

    async def wait_ends(self, count: int) -> None:
        """Until ``count`` requests ended (the client may read a response before that)."""

        async def enough() -> None:
            while len(self.outcomes) < count:
                self.ended.clear()
                await self.ended.wait()

        await asyncio.wait_for(enough(), 5)


class _Broken:
    def request_started(self, request: web.BaseRequest) -> None:
        raise RuntimeError("started")

    def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
        raise RuntimeError("lost")

    def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
        raise RuntimeError("ended")


def test_the_hook_is_public() -> None:
    assert {"add_observer", "RequestObserver", "Outcome", "OutcomeKind"} <= set(aiodelay.__all__)
    recorder: aiodelay.RequestObserver = _Recorder()  # the Protocol fits a plain class
    assert recorder is not None


def test_add_observer_without_aiodelay_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"aiodelay\.setup\(app\)"):
        aiodelay.add_observer(web.Application(), _Recorder())


async def test_an_observer_hears_start_loss_and_end_once_and_can_be_removed(
    serve: Serve,
) -> None:
    probe = Probe()

    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/slow", slow)
    app.router.add_get("/", hello)
    recorder = _Recorder()
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
    recorder = _Recorder()
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

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/data.bin", file)
    recorder = _Recorder()
    aiodelay.add_observer(app, recorder)
    served = await serve(app)
    client = await served.connect()
    for _ in range(2):  # the same connection: keep-alive survives
        await client.get("/data.bin")
        assert await client.read_response() == (200, data.read_bytes())
    await recorder.wait_ends(2)
    assert recorder.events == ["started /data.bin", "ended completed"] * 2
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
