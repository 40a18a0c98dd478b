"""What a request owns (``aiodelay/_core/owned.py``): timers (aiodelay.call_later), tasks
(aiodelay.spawn) and threads (aiodelay.to_thread, aiodelay.check_cancelled), each ending with
its request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from aiohttp import web

import aiodelay
from aiodelay.testing import RawClient
from tests.conftest import HandlerRun, Serve


def _app(*routes: web.RouteDef, policy: str = "cancel") -> web.Application:
    app = web.Application()
    aiodelay.setup(app, policy=policy)
    app.add_routes(routes)
    return app


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


# -- request-scoped timers and tasks --------------------------------------------------------


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
    probe = HandlerRun()
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


# -- leaks ----------------------------------------------------------------------------------


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


# -- aiodelay.to_thread and aiodelay.check_cancelled ----------------------------------------


async def _get(client: RawClient, path: str) -> tuple[int, bytes, float]:
    """GET path on the connection: (status, body, seconds it took)."""
    start = time.monotonic()
    await client.get(path)
    status, body = await client.read_response()
    return status, body, time.monotonic() - start


class _Worker:
    """A thread function that checks every 5 ms, and says when it stopped."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped_at: float | None = None
        self.raised: BaseException | None = None

    def __call__(self, limit: float) -> str:
        self.started.set()
        end = time.monotonic() + limit
        try:
            while time.monotonic() < end:
                aiodelay.check_cancelled()
                time.sleep(0.005)
        except BaseException as exc:
            self.raised = exc
            raise
        finally:
            self.stopped_at = time.monotonic()
        return "done"


async def _started(worker: _Worker) -> None:
    await asyncio.get_running_loop().run_in_executor(None, worker.started.wait, 5)


@pytest.mark.both_loops
async def test_to_thread_returns_the_result_and_check_cancelled_is_a_no_op_outside(
    serve: Serve,
) -> None:
    aiodelay.check_cancelled()  # outside an aiodelay thread: nothing
    worker = _Worker()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=await aiodelay.to_thread(request, worker, 0.05))

    served = await serve(_app(web.get("/", handler)))
    client = await served.connect()
    assert (await _get(client, "/"))[:2] == (200, b"done")
    assert worker.raised is None


@pytest.mark.both_loops
async def test_a_thread_stops_at_its_next_check_when_the_client_leaves(serve: Serve) -> None:
    worker = _Worker()
    probe = HandlerRun()

    async def handler(request: web.Request) -> web.Response:
        text = await probe.run(request, aiodelay.to_thread(request, worker, 30))
        return web.Response(text=text)

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await _started(worker)
    dropped = time.monotonic()
    client.drop("FIN")
    await probe.wait_ended()
    assert probe.cancelled  # the await ended at once
    await asyncio.wait_for(asyncio.gather(*[j.done for j in served.app[aiodelay_key()].threads]), 5)
    assert isinstance(worker.raised, asyncio.CancelledError)
    assert worker.stopped_at is not None
    assert worker.stopped_at - dropped < 0.5  # at its next check (every 5 ms), not in 30 s


@pytest.mark.both_loops
async def test_a_thread_stops_at_its_next_check_when_the_deadline_passes(serve: Serve) -> None:
    worker = _Worker()

    @aiodelay.deadline(0.2)
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=await aiodelay.to_thread(request, worker, 30))

    served = await serve(_app(web.get("/", handler)))
    client = await served.connect()
    status, _, took = await _get(client, "/")
    answered = time.monotonic()
    assert status == 504
    await asyncio.wait_for(asyncio.gather(*[j.done for j in served.app[aiodelay_key()].threads]), 5)
    assert isinstance(worker.raised, asyncio.CancelledError)
    assert worker.stopped_at is not None
    assert worker.stopped_at - (answered - took + 0.2) < 0.5  # (not at its own 30 s)


@pytest.mark.both_loops
async def test_cleanup_waits_for_a_thread_and_says_which_it_left_behind(
    serve: Serve, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiodelay._core.middleware

    monkeypatch.setattr(aiodelay._core.middleware, "THREAD_CLEANUP_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="aiodelay")
    release = threading.Event()
    started = threading.Event()

    def stubborn() -> None:  # never checks: it cannot be stopped
        started.set()
        release.wait(10)

    probe = HandlerRun()

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, aiodelay.to_thread(request, stubborn))
        return web.Response()

    served = await serve(_app(web.get("/", handler)), shutdown_timeout=0.05)
    client = await served.get("/")
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    client.drop("RST")
    await probe.wait_ended()
    await served.runner.cleanup()
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    assert "stubborn" in line
    assert "left behind" in line
    release.set()


def aiodelay_key() -> Any:
    from aiodelay._core.installation import app_key as book_key

    return book_key


@pytest.mark.both_loops
async def test_a_thread_job_given_up_before_a_worker_took_it_is_not_waited_for(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A job still queued behind a busy executor when its request is cancelled never runs:
    cleanup does not wait for it, nor says it was left behind."""
    from concurrent.futures import ThreadPoolExecutor

    caplog.set_level(logging.WARNING, logger="aiodelay")
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)
    busy = threading.Event()
    release = threading.Event()
    ran: list[str] = []
    probe = HandlerRun()

    def occupy() -> None:
        busy.set()
        release.wait(10)

    def queued() -> None:
        ran.append("queued job ran")

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, aiodelay.to_thread(request, queued))
        return web.Response()

    blocker = loop.run_in_executor(None, occupy)
    assert busy.wait(5)  # the one worker is taken
    served = await serve(_app(web.get("/", handler)), shutdown_timeout=0.05)
    client = await served.get("/")
    await probe.wait_started()
    client.drop("FIN")
    await probe.wait_ended()
    book = served.app[aiodelay_key()]
    assert book.threads == set()  # given up: nothing left to wait for
    release.set()
    await blocker
    started = time.monotonic()
    await served.runner.cleanup()
    assert time.monotonic() - started < 1
    assert ran == []
    assert [r for r in caplog.records if r.name == "aiodelay"] == []
    executor.shutdown(wait=True)


@pytest.mark.both_loops
async def test_check_cancelled_raises_once_the_awaiting_code_gave_up(serve: Serve) -> None:
    """An asyncio.timeout around the await gives up on the thread: it is told to stop then,
    not only when its request ends."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def work() -> None:
        try:
            for _ in range(6000):  # 30 s at most
                aiodelay.check_cancelled()
                time.sleep(0.005)
        finally:
            loop.call_soon_threadsafe(stopped.set)

    async def handler(request: web.Request) -> web.Response:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(aiodelay.to_thread(request, work), 0.1)
        # Still in the request: the thread must stop now, not when the request ends.
        await asyncio.wait_for(stopped.wait(), 2)
        return web.Response(text="stopped")

    served = await serve(_app(web.get("/", handler)))
    client = await served.connect()
    assert (await _get(client, "/"))[:2] == (200, b"stopped")


# A server process whose request runs a thread that never checks, and stops while the
# thread runs. Its lines on stdout: the "left behind" log line, "cleanup ended", the thread's
# "returned", "exits" (the thread ends on its own 1 s after it began: bounded).
STUBBORN_THREAD = """\
import asyncio, logging, sys, threading, time
import aiohttp
from aiohttp import web
import aiodelay, aiodelay._core.middleware

aiodelay._core.middleware.THREAD_CLEANUP_TIMEOUT = 0.2
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
started = threading.Event()

def stubborn():  # never calls aiodelay.check_cancelled()
    started.set()
    time.sleep(1)
    print("returned", flush=True)

async def handler(request):
    await aiodelay.to_thread(request, stubborn)
    return web.Response()

async def main():
    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=0.05)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    writer.close()  # the client leaves: the thread is told to stop, and does not
    await runner.cleanup()
    print("cleanup ended", flush=True)

asyncio.run(main())
print("exits", flush=True)
"""


def test_the_left_behind_line_says_the_process_waits_for_the_thread() -> None:
    """A thread cannot be stopped, nor the process exit before it: the line says so."""
    done = subprocess.run(
        [sys.executable, "-c", STUBBORN_THREAD], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    left, *rest = done.stdout.splitlines()
    assert "stubborn" in left
    assert "left behind" in left
    assert "the process exits only once it returns" in left
    assert "aiodelay.check_cancelled()" in left  # what would have stopped it
    # What the line says: the process went on waiting, up to the thread's own end.
    assert rest == ["cleanup ended", "returned", "exits"]
