"""The drop path most requests take: a plain drop makes nothing beyond the request's state,
and a connection's teardown comes after its handler has seen its cancellation.

A handler under the cancel policy, with no grace, that asked aiodelay nothing and that nobody
observes, is cancelled from the transport's callback with nothing made for it; whatever asks
later (the handler's own ``except`` block, a deadline, ``notify_finish`` after the end) finds
the truth in the request's state. The connection's teardown (the close after a FIN, aiohttp's
``connection_lost`` after an RST) waits two turns of the loop, by when the handlers have seen
their cancellation, so that in a storm every handler is cancelled before any of the
connections is torn down.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import pickle
import socket
import struct
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_remotes import XForwardedRelaxed

import aiodelay
from aiodelay._core.aiohttp_internals import state_of
from aiodelay._core.policy import Policy
from aiodelay._core.requests import request_policy
from aiodelay._core.state import SETTLED
from tests.conftest import Drop, Probe, RawClient, Serve, Served

pytestmark = pytest.mark.both_loops


def _app(*routes: web.RouteDef) -> web.Application:
    app = web.Application()
    aiodelay.setup(app)
    app.add_routes(routes)
    return app


@pytest.mark.parametrize(("drop", "reason"), [("FIN", "FIN"), ("RST", "RST")])
async def test_a_plain_drop_makes_nothing_more_and_says_the_truth(
    serve: Serve, drop: Drop, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)))
    client = await served.get("/")
    await probe.wait_started()
    with caplog.at_level(logging.INFO, logger="aiodelay"):
        client.drop(drop)
        await probe.wait_ended()
        await _recorded(served.app)
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


class _Held:
    """A handler (:meth:`handle`) that waits until its client leaves. ``on_cancel(request)``
    runs in its ``except CancelledError`` block; the CancelledError goes on if that returns
    None, its response is returned otherwise."""

    def __init__(
        self,
        on_cancel: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None,
    ) -> None:
        self.on_cancel = on_cancel
        self.requests: list[web.Request] = []
        self.started, self.ended = asyncio.Event(), asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        self.started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            answer = None if self.on_cancel is None else await self.on_cancel(request)
            if answer is None:
                raise
            return answer
        finally:
            self.ended.set()
        raise AssertionError("unreachable: the future above is never set")  # pragma: no cover

    async def start(self, served: Served, path: str = "/") -> RawClient:
        """A new connection with ``GET path`` on it, once the handler has started."""
        client = await served.get(path)
        await asyncio.wait_for(self.started.wait(), 5)
        return client

    async def wait_ended(self) -> None:
        await asyncio.wait_for(self.ended.wait(), 5)


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

    held = _Held(ask_and_set_a_timer)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    await _recorded(served.app)
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
    held = _Held(_asking(seen, turns))
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
    held = _Held(_asking(seen))
    app = _app(web.get("/", held.handle))
    await XForwardedRelaxed().setup(app)
    served = await serve(app)
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    await _recorded(served.app)
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

    held = _Held(clone_and_ask)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop(drop)
    await held.wait_ended()
    await _recorded(served.app)
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
    await _connection_gone(requests[0])  # the server has seen the drop
    work.set()
    await asyncio.wait_for(ended.wait(), 5)
    await _recorded(served.app)
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

    held = _Held(swallow_and_run_on)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop("FIN")
    await asyncio.wait_for(swallowed.wait(), 5)
    tasks[0].cancel()  # an outer cancellation, not aiodelay's
    await held.wait_ended()
    await _recorded(served.app)
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.cancelled, stats.failed) == (1, 0, 1)


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
    await _connection_gone(requests[0])
    assert events == []  # held back by the section
    gate.set_result(None)
    await asyncio.wait_for(ended.wait(), 5)
    assert events == ["section done", "cancelled"]


async def test_a_handler_that_answers_after_a_quick_stop_ran_on(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Catching the cancellation and returning a response: counted as run on, nothing sent."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="too late")

    held = _Held(answer)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    with caplog.at_level(logging.INFO, logger="aiodelay"):
        client.drop("RST")
        await held.wait_ended()
        await _recorded(served.app)
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
    await _recorded(served.app)
    assert outcome == ["ran on"]
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.shielded_ran_on, stats.timed_out) == (1, 1, 0)


async def test_after_a_fin_the_connection_closes_even_if_the_handler_runs_on(
    serve: Serve,
) -> None:
    """The close after a FIN waits two turns of the loop, not for the handler: a handler that
    swallows its cancellation does not keep the connection open."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run_on(request: web.Request) -> web.Response:
        await gate  # runs on, ignoring the cancellation
        return web.Response(text="late")

    held = _Held(run_on)
    served = await serve(_app(web.get("/", held.handle)))
    client = await held.start(served)
    client.drop("half-close")  # a FIN, while the client can still read
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed: nothing sent
    assert not held.ended.is_set()
    gate.set_result(None)
    await held.wait_ended()
    await _recorded(served.app)
    stats = aiodelay.stats(served.app)
    assert (stats.disconnected, stats.shielded_ran_on) == (1, 1)


@pytest.mark.parametrize("close", ["FIN", "RST"])
async def test_in_a_storm_every_handler_is_cancelled_before_a_connection_is_torn_down(
    serve: Serve, close: str
) -> None:
    """Drops read in one turn of the loop: each handler sees its CancelledError while every
    request of the storm still has its transport (aiohttp's ``connection_lost``, and after a
    FIN the sockets' close, come after)."""
    n = 5
    requests: list[web.BaseRequest] = []
    seen: list[list[bool]] = []
    started = asyncio.Event()
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        if len(requests) == n:
            started.set()
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            seen.append([each.transport is not None for each in requests])
            if len(seen) == n:
                ended.set()
            raise
        return web.Response()  # pragma: no cover - never reached

    served = await serve(_app(web.get("/", handler)))
    loop = asyncio.get_running_loop()
    socks = [socket.socket() for _ in range(n)]  # plain sockets: uvloop's cannot shutdown()
    try:
        for sock in socks:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", served.port))
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        for sock in socks:  # one after the other, before the server's loop turns again
            if close == "FIN":
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        for sock in socks:
            sock.close()
    assert seen == [[True] * n] * n


async def test_under_handler_cancellation_a_handler_that_runs_on_is_not_cancelled_again(
    serve: Serve,
) -> None:
    """On a server with aiohttp's handler_cancellation=True, aiohttp's own teardown after an
    RST comes after aiodelay cancelled the handler; a handler that caught that cancellation
    and runs on is not cancelled a second time by aiohttp."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def run_on(request: web.Request) -> web.Response:
        try:
            await gate
        except asyncio.CancelledError:  # pragma: no cover - the failure being tested
            outcome.append("cancelled again")
            raise
        outcome.append("ran on")
        return web.Response()

    held = _Held(run_on)
    served = await serve(_app(web.get("/", held.handle)), handler_cancellation=True)
    client = await held.start(served)
    client.drop("RST")
    await _connection_gone(held.requests[0])
    assert held.requests[0].transport is None  # aiohttp has run its connection_lost
    assert outcome == []
    gate.set_result(None)
    await held.wait_ended()
    await _recorded(served.app)
    assert outcome == ["ran on"]
    assert aiodelay.stats(served.app).shielded_ran_on == 1


async def test_a_failing_teardown_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The teardowns that wait for the cancelled handlers run in one batch; one that raises
    is logged, and the others still run."""
    from aiodelay._core.teardown import after_cancelled

    ran: list[str] = []

    def fails() -> None:
        raise RuntimeError("boom")

    done = asyncio.Event()
    after_cancelled(ran.append, "first")
    after_cancelled(fails)
    after_cancelled(ran.append, "third")
    after_cancelled(done.set)
    assert ran == []  # not in this turn
    with caplog.at_level(logging.ERROR, logger="aiodelay"):
        await asyncio.wait_for(done.wait(), 5)
    assert ran == ["first", "third"]
    [record] = [r for r in caplog.records if r.name == "aiodelay"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_over_tls_a_fin_closes_at_once(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS transport cannot stay open after EOF (asyncio warns if asked to): there the
    close is not deferred, and the handler is cancelled all the same."""
    probe = Probe()

    async def handler(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    served = await serve(_app(web.get("/", handler)), tls=True)
    client = await served.get("/")
    await probe.wait_started()
    with caplog.at_level(logging.WARNING):
        client.drop("FIN")
        await probe.wait_ended()
        await _recorded(served.app)
    assert probe.cancelled
    assert [r.getMessage() for r in caplog.records if "eof_received" in r.getMessage()] == []
    assert aiodelay.stats(served.app).cancelled == 1


async def _connection_gone(request: web.BaseRequest) -> None:
    """Let the loop turn until aiohttp has run its connection_lost for the request's
    connection (a few turns after the drop: aiodelay defers it past the cancellation)."""
    for _ in range(1000):
        if request.transport is None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the connection was not torn down")


async def _recorded(app: web.Application) -> None:
    """Let the loop turn until no request is in flight any more: the middleware records the
    end a few turns after the handler's own ``finally`` ran."""
    for _ in range(1000):
        if not aiodelay.stats(app).in_flight:
            return
        await asyncio.sleep(0)
    raise AssertionError("the request was not recorded")


@pytest.mark.parametrize("message", [None, "the connection was closed before the handler started"])
def test_connection_lost_copies_and_pickles_with_its_reason(message: str | None) -> None:
    """ConnectionLost keeps its reason in a slot (no per-drop __dict__); copies and pickles
    still carry reason and message."""
    lost = aiodelay.ConnectionLost("closed", message)
    for again in (copy.copy(lost), pickle.loads(pickle.dumps(lost))):
        assert type(again) is aiodelay.ConnectionLost
        assert again.reason == "closed"
        assert str(again) == str(lost)


@pytest.mark.parametrize("pending", [False, True])
def test_the_teardown_batch_keeps_no_loop_alive(pending: bool) -> None:
    """Each loop's batch of teardowns is found through a WeakKeyDictionary keyed by the loop;
    the batch refers to the loop's transports (and so to the loop): neither a batch that ran
    nor one still pending when the loop is closed may keep the loop alive."""
    from aiodelay._core.teardown import after_cancelled

    async def one_teardown() -> None:
        done = asyncio.Event()
        after_cancelled(asyncio.get_running_loop().time)  # refers to the loop, as a close does
        after_cancelled(done.set)
        if not pending:
            await asyncio.wait_for(done.wait(), 5)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one_teardown())
        after_cancelled_ran = not pending
        assert after_cancelled_ran or loop._ready  # type: ignore[attr-defined]
    finally:
        loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None


async def test_each_turns_teardowns_come_after_that_turns_cancelled_handlers() -> None:
    """A drop read while the teardowns of an earlier turn wait makes a batch of its own: its
    handler sees the cancellation before its connection is torn down, as the first one's."""
    from aiodelay._core.teardown import after_cancelled

    loop = asyncio.get_running_loop()
    order: list[str] = []
    both = asyncio.Event()

    async def handler(name: str) -> None:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            order.append(f"{name} handler")

    def teardown(name: str) -> None:
        order.append(f"{name} teardown")
        if name == "B":
            both.set()

    handlers = {name: asyncio.create_task(handler(name)) for name in "AB"}
    await asyncio.sleep(0)  # both wait

    def drop(name: str) -> None:  # what a read of a drop does: cancel, defer the teardown
        handlers[name].cancel()
        after_cancelled(teardown, name)

    loop.call_soon(drop, "A")
    await asyncio.sleep(0)
    loop.call_soon(drop, "B")  # a turn later, while A's teardown waits
    await asyncio.wait_for(both.wait(), 5)
    assert order == ["A handler", "A teardown", "B handler", "B teardown"]


def test_an_interrupt_in_a_teardown_leaves_the_rest_for_the_next_turns() -> None:
    """A KeyboardInterrupt from one teardown stops the loop; the teardowns after it in the
    batch run when the loop runs again."""
    from aiodelay._core.teardown import after_cancelled

    ran: list[str] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    async def batch() -> None:
        after_cancelled(ran.append, "first")
        after_cancelled(interrupt)
        after_cancelled(ran.append, "third")
        await asyncio.get_running_loop().create_future()  # the interrupt ends this

    async def rest() -> None:
        for _ in range(10):
            if "third" in ran:
                return
            await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(batch())
        assert ran == ["first"]
        loop.run_until_complete(rest())
        assert ran == ["first", "third"]
    finally:
        loop.close()


def test_exception_notes_and_attributes_survive_a_copy() -> None:
    """Attributes other than the reason (and Python 3.11's notes) live in the instance
    __dict__, which copies and pickles carry too."""
    lost = aiodelay.ConnectionLost("RST")
    lost.where = "upstream"  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        lost.add_note("seen behind a proxy")
    for again in (copy.copy(lost), pickle.loads(pickle.dumps(lost))):
        assert again.reason == "RST"
        assert again.where == "upstream"  # type: ignore[union-attr]
        assert getattr(again, "__notes__", None) == getattr(lost, "__notes__", None)


@pytest.mark.parametrize("logged", [False, True])
async def test_a_middleware_outside_aiodelay_sees_a_drop_as_without_aiodelay(
    serve: Serve, caplog: pytest.LogCaptureFixture, logged: bool
) -> None:
    """A middleware outside aiodelay's (a parent app's, or one put before
    aiodelay.middleware()) gets the CancelledError where aiohttp logs nothing (from Python
    3.11 on), and otherwise a response of its own to look at: never one shared by every
    drop, which it could change for all the others."""
    seen: list[object] = []
    probes: list[Probe] = []
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
        probes.append(Probe())
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


@pytest.mark.parametrize("logged", [False, True])
async def test_a_dropped_upload_leaves_no_task_lingering_over_its_body(
    serve: Serve, caplog: pytest.LogCaptureFixture, logged: bool
) -> None:
    """Clients send the start of an upload (192 KiB of 1 MB) and leave by FIN at once, most
    before their handler, which does not read the body, has started: aiohttp's task of each
    connection ends with the connection, not after aiohttp's lingering time (10 s) of
    waiting for the rest of a body that cannot come."""
    count = 50
    tasks: set[asyncio.Task[Any]] = set()
    all_ended = asyncio.Event()

    class Observer:
        def request_started(self, request: web.BaseRequest) -> None:
            tasks.add(request.task)  # aiohttp's task of the connection

        def request_lost(self, request: web.BaseRequest, lost: aiodelay.ConnectionLost) -> None:
            pass

        def request_ended(self, request: web.BaseRequest, outcome: aiodelay.Outcome) -> None:
            if len(tasks) == count:
                all_ended.set()

    async def upload(request: web.Request) -> web.Response:
        await asyncio.get_running_loop().create_future()  # until cancelled
        return web.Response()

    access_log = None
    if logged:
        caplog.set_level(logging.INFO, logger="tests.access.upload")  # (enabled: aiohttp logs)
        access_log = logging.getLogger("tests.access.upload")
    app = web.Application()
    aiodelay.setup(app)
    aiodelay.add_observer(app, Observer())
    app.router.add_post("/upload", upload)
    served = await serve(app, access_log=access_log)
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"

    async def upload_and_leave() -> None:
        client = await served.connect()
        await client.send(head + b"x" * (192 * 1024))
        client.drop("FIN")

    await asyncio.gather(*(upload_and_leave() for _ in range(count)))
    await asyncio.wait_for(all_ended.wait(), 5)
    _, lingering = await asyncio.wait(tasks, timeout=5)
    assert not lingering, f"{len(lingering)} of {count} connection tasks still run"
    assert aiodelay.stats(app).cancelled == count
