"""Twisted-style resources: render_<METHOD>, NOT_DONE_YET, request.write()/finish()."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import aiodelay
from aiodelay import NOT_DONE_YET, Resource, ResourceRequest
from aiodelay.pytest_plugin import AiodelayServer, LiveServer
from tests.conftest import Serve


def _app(resource: Resource, *, policy: str = "cancel") -> web.Application:
    app = web.Application()
    aiodelay.setup(app, policy=policy)
    app.router.add_route("*", "/{tail:.*}", resource.render)
    return app


async def _fetch(
    server: LiveServer, method: str = "GET", path: str = "/"
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.make_url(path)) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


class Later(Resource):
    """Renders from a plain callback after the test opens the gate."""

    def __init__(self) -> None:
        self.requests: list[ResourceRequest] = []
        self.started = asyncio.Event()
        self.lost: list[tuple[aiodelay.ConnectionLost, str]] = []
        self.lost_event = asyncio.Event()

    def _failed(self, err: aiodelay.ConnectionLost, tag: str) -> None:
        self.lost.append((err, tag))
        self.lost_event.set()

    def render_GET(self, request: ResourceRequest) -> object:
        self.requests.append(request)
        request.on_connection_lost(self._failed, "extra-arg")
        self.started.set()
        return NOT_DONE_YET


# -- what render methods may return ------------------------------------------------------------


async def test_bytes_are_sent_as_html_with_status_200(aiodelay_server: AiodelayServer) -> None:
    class Page(Resource):
        def render_GET(self, request: ResourceRequest) -> bytes:
            return b"<p>hi</p>"

    server = await aiodelay_server(_app(Page()))
    status, headers, body = await _fetch(server)
    assert (status, headers["Content-Type"], body) == (200, "text/html", b"<p>hi</p>")


async def test_str_is_encoded_as_utf8(aiodelay_server: AiodelayServer) -> None:
    class Page(Resource):
        def render_GET(self, request: ResourceRequest) -> str:
            return "caf\u00e9"

    server = await aiodelay_server(_app(Page()))
    _, headers, body = await _fetch(server)
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert body.decode("utf-8") == "caf\u00e9"


async def test_status_and_headers_set_before_returning_bytes(
    aiodelay_server: AiodelayServer,
) -> None:
    class Teapot(Resource):
        def render_GET(self, request: ResourceRequest) -> bytes:
            request.set_response_code(418)
            request.set_header("Content-Type", "text/plain")
            request.set_header("X-Kind", "teapot")
            return b"short and stout"

    server = await aiodelay_server(_app(Teapot()))
    status, headers, body = await _fetch(server)
    assert (status, headers["Content-Type"], headers["X-Kind"]) == (418, "text/plain", "teapot")
    assert body == b"short and stout"


async def test_stream_response_and_awaitables_are_accepted(
    aiodelay_server: AiodelayServer,
) -> None:
    class Mixed(Resource):
        def render_GET(self, request: ResourceRequest) -> web.Response:
            return web.json_response({"via": "response"})

        async def render_POST(self, request: ResourceRequest) -> bytes:
            await asyncio.sleep(0)
            return b"via coroutine"

    server = await aiodelay_server(_app(Mixed()))
    assert (await _fetch(server))[2] == b'{"via": "response"}'
    assert (await _fetch(server, "POST"))[2] == b"via coroutine"


async def test_wrong_return_type_is_a_500(aiodelay_server: AiodelayServer) -> None:
    class Wrong(Resource):
        def render_GET(self, request: ResourceRequest) -> object:
            return 1  # Twisted's NOT_DONE_YET: not ours

    server = await aiodelay_server(_app(Wrong()))
    assert (await _fetch(server))[0] == 500


def test_not_done_yet_is_a_typed_sentinel_not_an_integer() -> None:
    sentinel: object = NOT_DONE_YET
    assert sentinel != 1
    assert not isinstance(NOT_DONE_YET, int)
    assert repr(NOT_DONE_YET) == "aiodelay.NOT_DONE_YET"


# -- methods -----------------------------------------------------------------------------------


class GetAndPost(Resource):
    def render_GET(self, request: ResourceRequest) -> bytes:
        return b"got"

    def render_POST(self, request: ResourceRequest) -> bytes:
        return b"posted"


async def test_method_without_render_method_is_405_with_allow(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(_app(GetAndPost()))
    status, headers, _ = await _fetch(server, "DELETE")
    assert status == 405
    assert headers["Allow"].split(",") == ["GET", "HEAD", "POST"]
    assert (await _fetch(server, "POST"))[2] == b"posted"


async def test_head_falls_back_to_get_without_body(aiodelay_server: AiodelayServer) -> None:
    server = await aiodelay_server(_app(GetAndPost()))
    status, headers, body = await _fetch(server, "HEAD")
    assert (status, headers["Content-Length"], body) == (200, "3", b"")


async def test_head_of_a_not_done_yet_response_sends_no_body(
    aiodelay_server: AiodelayServer,
) -> None:
    class Streamed(Resource):
        def render_GET(self, request: ResourceRequest) -> object:
            request.write(b"body")
            request.finish()
            return NOT_DONE_YET

    server = await aiodelay_server(_app(Streamed()))
    status, _, body = await _fetch(server, "HEAD")
    assert (status, body) == (200, b"")


# -- NOT_DONE_YET: the response from plain callbacks -------------------------------------------


async def test_write_and_finish_from_callbacks_send_in_order(
    aiodelay_server: AiodelayServer,
) -> None:
    class Chunks(Resource):
        def _more(self, request: ResourceRequest, count: int) -> None:
            request.write(b"%d," % count)
            if count == 3:
                request.finish()
            else:
                asyncio.get_running_loop().call_soon(self._more, request, count + 1)

        def render_GET(self, request: ResourceRequest) -> object:
            request.set_response_code(201)
            request.set_header("Content-Type", "text/plain")
            request.write(b"start,")
            self._more(request, 1)
            return NOT_DONE_YET

    server = await aiodelay_server(_app(Chunks()))
    status, headers, body = await _fetch(server)
    assert (status, headers["Content-Type"], body) == (201, "text/plain", b"start,1,2,3,")


async def test_finish_without_write_sends_an_empty_page(aiodelay_server: AiodelayServer) -> None:
    resource = Later()
    server = await aiodelay_server(_app(resource))
    fetch = asyncio.ensure_future(_fetch(server))
    await asyncio.wait_for(resource.started.wait(), 5)
    resource.requests[0].finish()
    status, headers, body = await asyncio.wait_for(fetch, 5)
    assert (status, headers["Content-Type"], body) == (200, "text/html", b"")
    assert resource.lost == []  # the errback is not called when the response completes


async def test_notify_finish_resolves_once_the_response_is_written(
    aiodelay_server: AiodelayServer,
) -> None:
    resource = Later()
    server = await aiodelay_server(_app(resource))
    fetch = asyncio.ensure_future(_fetch(server))
    await asyncio.wait_for(resource.started.wait(), 5)
    request = resource.requests[0]
    done = request.notify_finish()
    request.write(b"done")
    request.finish()
    await asyncio.wait_for(done, 5)
    assert done.result() is None
    assert (await fetch)[2] == b"done"


async def test_misuse_raises_one_line_errors(aiodelay_server: AiodelayServer) -> None:
    resource = Later()
    server = await aiodelay_server(_app(resource))
    fetch = asyncio.ensure_future(_fetch(server))
    await asyncio.wait_for(resource.started.wait(), 5)
    request = resource.requests[0]
    with pytest.raises(TypeError, match="takes bytes, got str"):
        request.write("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"100\.\.599"):
        request.set_response_code(42)
    request.write(b"x")
    with pytest.raises(RuntimeError, match="set_header"):
        request.set_header("X-Late", "1")
    with pytest.raises(RuntimeError, match="set_response_code"):
        request.set_response_code(500)
    request.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        request.write(b"y")
    with pytest.raises(RuntimeError, match="twice"):
        request.finish()
    assert (await asyncio.wait_for(fetch, 5))[2] == b"x"


# aiohttp >= 3.12 wants RequestKey for request storage (it warns otherwise); 3.10 lacks it.
MINE: Any = web.RequestKey("mine", int) if hasattr(web, "RequestKey") else "mine"


async def test_aiohttp_request_attributes_stay_available(aiodelay_server: AiodelayServer) -> None:
    seen: list[object] = []

    class Echo(Resource):
        def render_GET(self, request: ResourceRequest) -> bytes:
            request[MINE] = 1
            seen.extend(
                [request.match_info["tail"], request.query["q"], request.app, MINE in request]
            )
            assert isinstance(request.request, web.Request)
            return f"{request.method} {request.path}".encode()

    app = _app(Echo())
    server = await aiodelay_server(app)
    assert (await _fetch(server, "GET", "/a/b?q=1"))[2] == b"GET /a/b"
    assert seen == ["a/b", "1", app, True]


# -- when the peer leaves ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["FIN", "RST"])
async def test_peer_leaving_calls_errback_with_extra_args(
    aiodelay_server: AiodelayServer, how: str
) -> None:
    resource = Later()
    server = await aiodelay_server(_app(resource))
    outcome = await server.drop("GET", "/", how=how)  # type: ignore[arg-type]
    assert outcome.cancelled
    await asyncio.wait_for(resource.lost_event.wait(), 5)
    [(err, tag)] = resource.lost
    assert (type(err), err.reason, tag) == (aiodelay.ConnectionLost, how, "extra-arg")
    assert aiodelay.stats(server.app).cancelled == 1


async def test_write_and_finish_after_the_peer_left_are_no_ops(
    aiodelay_server: AiodelayServer,
) -> None:
    resource = Later()
    server = await aiodelay_server(_app(resource))
    await server.drop("GET", "/")
    request = resource.requests[0]
    request.write(b"nobody reads this")
    request.finish()
    request.finish()  # Twisted raises here and floods the log (klein#11): we stay quiet


class Gated(Resource):
    """Twisted's idiom: the render waits for a gate, and the errback cancels the gate."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.errbacks: list[str] = []
        self.lost: asyncio.Future[None] | None = None

    def _render(self, gate: asyncio.Future[None], request: ResourceRequest) -> None:
        if gate.cancelled():
            return
        request.write(b"late")
        request.finish()

    def _failed(self, err: aiodelay.ConnectionLost, gate: asyncio.Future[None]) -> None:
        self.errbacks.append(err.reason)
        gate.cancel()

    def render_GET(self, request: ResourceRequest) -> object:
        self.gate.add_done_callback(functools.partial(self._render, request=request))
        self.lost = request.on_connection_lost(self._failed, self.gate)
        return NOT_DONE_YET


@pytest.mark.parametrize("policy", ["cancel", "shield"])
async def test_policy_decides_whether_twisted_errback_stops_the_work(
    aiodelay_server: AiodelayServer, policy: str
) -> None:
    """cancel: the errback runs when the peer leaves and cancels the pending render.
    shield: the work runs on; the request stays in flight until finish(), and the errback
    is held back until then (it would cancel the render otherwise)."""
    resource = Gated()
    server = await aiodelay_server(_app(resource, policy=policy))
    seen = await server.drop("GET", "/", wait="seen")
    assert resource.lost is not None
    with pytest.raises(aiodelay.ConnectionLost):
        await asyncio.wait_for(resource.lost, 5)  # its errback's turn came before ours
    if policy == "cancel":
        assert resource.errbacks == ["FIN"]
        assert resource.gate.cancelled()
        assert (await seen.wait_ended()).cancelled
    else:
        assert resource.errbacks == []
        assert not resource.gate.done()
        assert seen.running
        resource.gate.set_result(None)  # the work finishes: write() is dropped, finish() ends it
        ended = await seen.wait_ended()
        assert ended.ran_on
        assert ended.received == b""
        assert resource.errbacks == ["FIN"]  # told once the work was done
    stats = aiodelay.stats(server.app)
    assert (stats.cancelled, stats.shielded_ran_on) == ((1, 0) if policy == "cancel" else (0, 1))


async def test_shield_policy_keeps_request_timers_until_finish(
    aiodelay_server: AiodelayServer,
) -> None:
    """A stream under the shield policy ticks on after the peer left (its writes dropped)
    until it calls finish(); then the request ends and is counted as ran on."""
    ticked_after_drop = asyncio.Event()
    stop = asyncio.Event()

    class Ticking(Resource):
        def _tick(self, request: ResourceRequest) -> None:
            if stop.is_set():
                request.finish()
                return
            if aiodelay.is_disconnected(request.request):
                ticked_after_drop.set()
            request.write(b"tick\n")
            request.call_later(0.01, self._tick, request)

        def render_GET(self, request: ResourceRequest) -> object:
            self._tick(request)
            return NOT_DONE_YET

    server = await aiodelay_server(_app(Ticking(), policy="shield"))
    seen = await server.drop("GET", "/", after_response_bytes=5, wait="seen")
    assert seen.running
    await asyncio.wait_for(ticked_after_drop.wait(), 5)
    stop.set()
    ended = await seen.wait_ended()
    assert ended.ran_on
    assert aiodelay.stats(server.app).shielded_ran_on == 1


async def test_request_call_later_is_cancelled_with_the_request(
    aiodelay_server: AiodelayServer,
) -> None:
    handles: list[asyncio.TimerHandle] = []

    class Ticking(Resource):
        def _tick(self, request: ResourceRequest) -> None:
            request.write(b"tick\n")
            handles.append(request.call_later(0.05, self._tick, request))

        def render_GET(self, request: ResourceRequest) -> object:
            self._tick(request)
            return NOT_DONE_YET

    server = await aiodelay_server(_app(Ticking()))
    outcome = await server.drop("GET", "/", after_response_bytes=10)
    assert outcome.cancelled
    assert outcome.received.startswith(b"tick\ntick\n")
    assert handles[-1].cancelled()


async def test_without_setup_bodies_work_and_not_done_yet_names_the_fix(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    class Page(Resource):
        def render_GET(self, request: ResourceRequest) -> object:
            return NOT_DONE_YET if request.query.get("later") else b"plain"

    app = web.Application()  # no aiodelay.setup(app)
    app.router.add_get("/", Page().render)
    served = await serve(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{served.port}/") as resp:
            assert await resp.read() == b"plain"
        async with session.get(f"http://127.0.0.1:{served.port}/?later=1") as resp:
            assert resp.status == 500
    assert "call aiodelay.setup(app)" in caplog.text


async def test_errback_is_not_called_when_the_render_method_raises(
    aiodelay_server: AiodelayServer, caplog: pytest.LogCaptureFixture
) -> None:
    called: list[object] = []
    failed = asyncio.Event()

    class Broken(Resource):
        def render_GET(self, request: ResourceRequest) -> object:
            request.on_connection_lost(lambda err: called.append(err))
            request.notify_finish().add_done_callback(lambda _: failed.set())
            raise ValueError("a bug in the render method")

    server = await aiodelay_server(_app(Broken()))
    assert (await _fetch(server))[0] == 500
    await asyncio.wait_for(failed.wait(), 5)
    assert called == []
    assert "ValueError: a bug in the render method" in caplog.text  # aiohttp's own log
