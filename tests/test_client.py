"""The INFO line and observers name the client the app trusts (aiohttp-remotes behind a proxy)."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp_remotes import XForwardedRelaxed, XForwardedStrict

import aiodelay
from tests.conftest import HandlerRun, RecordingObserver, Serve

# An address from TEST-NET-3 (RFC 5737): only ever a header value here, never contacted.
CLIENT = "203.0.113.7"


async def _interrupted(
    serve: Serve, app: web.Application, probe: HandlerRun, caplog: pytest.LogCaptureFixture
) -> tuple[str, aiodelay.Outcome]:
    ends = RecordingObserver()
    aiodelay.add_observer(app, ends)
    served = await serve(app)
    client = await served.connect()
    await client.send(
        b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: %s\r\n\r\n" % CLIENT.encode()
    )
    await probe.wait_started()
    client.drop("FIN")
    await probe.wait_ended()
    [outcome] = ends.outcomes
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiodelay"]
    return line, outcome


async def _behind_a_proxy(*, remotes_first: bool) -> web.Application:
    """An app with aiodelay and aiohttp-remotes' ``XForwardedRelaxed``, in either order."""
    app = web.Application()
    if remotes_first:
        await XForwardedRelaxed().setup(app)
        aiodelay.setup(app)
    else:
        aiodelay.setup(app)
        await XForwardedRelaxed().setup(app)
    return app


@pytest.mark.parametrize("remotes_first", [True, False])
async def test_behind_a_trusted_proxy_the_log_and_observers_name_the_client(
    serve: Serve, caplog: pytest.LogCaptureFixture, remotes_first: bool
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()
    seen: list[str | None] = []

    async def slow(request: web.Request) -> web.Response:
        seen.append(request.remote)
        await probe.run(request, probe.gate)
        return web.Response()

    app = await _behind_a_proxy(remotes_first=remotes_first)
    app.router.add_get("/slow", slow)
    line, outcome = await _interrupted(serve, app, probe, caplog)
    assert seen == [CLIENT]  # what the app itself trusts
    assert line.startswith(f"GET /slow from {CLIENT} interrupted by FIN")
    assert outcome.client == CLIENT
    assert outcome.kind == "cancelled"


async def test_without_a_proxy_middleware_the_header_is_not_believed(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodelay")
    probe = HandlerRun()

    async def slow(request: web.Request) -> web.Response:
        await probe.run(request, probe.gate)
        return web.Response()

    app = web.Application()
    aiodelay.setup(app)
    app.router.add_get("/slow", slow)
    line, outcome = await _interrupted(serve, app, probe, caplog)
    assert line.startswith("GET /slow from 127.0.0.1 interrupted by FIN")
    assert outcome.client == "127.0.0.1"


async def test_a_strict_proxy_middleware_that_refuses_leaves_the_peer_address(
    serve: Serve,
) -> None:
    """XForwardedStrict trusts only the proxies listed: from another peer the app answers 400,
    and aiodelay does not name a client the app did not trust."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    await XForwardedStrict([["10.0.0.1"]]).setup(app)
    aiodelay.setup(app)
    app.router.add_get("/", hello)
    ends = RecordingObserver()
    aiodelay.add_observer(app, ends)
    served = await serve(app)
    client = await served.connect()
    await client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: %s\r\n\r\n" % CLIENT.encode())
    status, _ = await client.read_response()
    assert status == 400
    [outcome] = ends.outcomes
    assert outcome.client == "127.0.0.1"


@pytest.mark.parametrize("remotes_first", [True, False])
async def test_behind_a_trusted_proxy_observers_name_the_client_of_a_completed_request(
    serve: Serve, remotes_first: bool
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = await _behind_a_proxy(remotes_first=remotes_first)
    app.router.add_get("/", hello)
    ends = RecordingObserver()
    aiodelay.add_observer(app, ends)
    served = await serve(app)
    client = await served.connect()
    for _ in range(2):
        await client.send(
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: %s\r\n\r\n" % CLIENT.encode()
        )
        assert await client.read_response() == (200, b"hi")
    await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # (no header: the peer)
    assert await client.read_response() == (200, b"hi")
    await ends.wait_ends(3)
    assert [(o.kind, o.client) for o in ends.outcomes] == [
        ("completed", CLIENT),
        ("completed", CLIENT),
        ("completed", "127.0.0.1"),
    ]
