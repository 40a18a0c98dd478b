"""What stops a handler (``aiodelay/_core/policy.py``): @aiodelay.grace, and the settings of
deadlines and graces that are refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import pytest
from aiohttp import web

import aiodelay
from tests.conftest import HandlerRun, Serve


def _app(*routes: web.RouteDef, **config: Any) -> web.Application:
    app = web.Application()
    aiodelay.setup(app, **config)
    app.add_routes(routes)
    return app


@pytest.mark.both_loops
async def test_grace_lets_work_that_ends_in_time_run_on(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()
    left = asyncio.Event()

    @aiodelay.grace(0.6)
    async def fill(request: web.Request) -> web.Response:
        async def work() -> None:
            await left.wait()
            await asyncio.sleep(0.3)  # the cache fill's remaining work

        await probe.run(request, work())
        return web.Response()

    served = await serve(_app(web.get("/fill", fill)))
    client = await served.get("/fill")
    await probe.wait_started()
    client.drop("FIN")
    assert probe.request is not None
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(aiodelay.notify_finish(probe.request), 5)
    left.set()
    await probe.wait_ended()
    assert probe.completed
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.shielded_ran_on, stats.cancelled) == (1, 1, 0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert "ran on (within its 0.600s grace)" in line


@pytest.mark.both_loops
async def test_grace_cancels_work_that_takes_longer(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()
    seen: list[float] = []

    @aiodelay.grace(0.5)
    async def fill(request: web.Request) -> web.Response:
        await probe.run(request, asyncio.sleep(5))
        return web.Response()

    served = await serve(_app(web.get("/fill", fill)))
    client = await served.get("/fill")
    await probe.wait_started()
    assert probe.request is not None
    finish = aiodelay.notify_finish(probe.request)
    finish.add_done_callback(lambda _: seen.append(time.monotonic()))
    client.drop("FIN")
    await probe.wait_ended()
    stopped = time.monotonic()
    assert probe.cancelled
    assert 0.5 <= stopped - seen[0] < 0.6
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.cancelled) == (1, 1)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert line.endswith("cancelled (after its 0.500s grace)")


@pytest.mark.both_loops
@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: aiodelay.deadline("5"), TypeError),  # type: ignore[arg-type]
        (lambda: aiodelay.deadline(True), TypeError),
        (lambda: aiodelay.deadline(0), ValueError),
        (lambda: aiodelay.deadline(-1), ValueError),
        (lambda: aiodelay.deadline(float("inf")), ValueError),
        (lambda: aiodelay.deadline(1, status=200), ValueError),
        (lambda: aiodelay.deadline(1, status="504"), TypeError),  # type: ignore[arg-type]
        (lambda: aiodelay.grace(0), ValueError),
        (lambda: aiodelay.grace(None), TypeError),  # type: ignore[arg-type]
        (lambda: aiodelay.setup(web.Application(), deadline=0), ValueError),
        (lambda: aiodelay.middleware(deadline="1"), TypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_configuration_is_refused(call: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()


@pytest.mark.both_loops
async def test_the_end_of_a_grace_waits_for_a_shield_section(serve: Serve) -> None:
    """A handler in its grace enters a shield() section (the write the grace is for) that
    outlasts the grace: the section runs to its end, then the handler is cancelled."""
    events: list[str] = []
    probe = HandlerRun()
    release = asyncio.Event()

    @aiodelay.grace(0.2)
    async def handler(request: web.Request) -> web.Response:
        async def work() -> None:
            async def commit() -> None:
                await release.wait()  # set by the test once the grace is over
                events.append("committed")

            await aiodelay.shield(commit())
            events.append("after the section")

        await probe.run(request, work())
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    assert probe.request is not None
    finish = aiodelay.notify_finish(probe.request)
    client.drop("FIN")
    with contextlib.suppress(aiodelay.ConnectionLost):
        await asyncio.wait_for(finish, 5)  # the client left: the grace runs
    # The grace is a span of time: the test lets it pass (a timer, not a wait for an event).
    grace_over = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.3, grace_over.set_result, None)
    await grace_over
    release.set()
    await probe.wait_ended()
    assert events == ["committed"]
    assert probe.cancelled
