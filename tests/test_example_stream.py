"""examples/stream: closing the browser tab stops the token generation.

Headless Chromium (the harness of ``tests/test_browser.py``: skipped locally without it,
failing in CI) opens the example's page, whose ``EventSource`` streams tokens; once the page
has received some, the tab is closed (or navigates away, with Chromium's back/forward cache
off: with it on, the page and its connection stay alive). aiodelay's observer reports the
handler cancelled, and the generation recorded in the app says it stopped by cancellation,
after fewer tokens than its total. The counts are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import aiohttp
import pytest

import aiodelay
from aiodelay.pytest_plugin import AiodelayServer
from examples.stream import app as stream
from tests import test_browser
from tests._services import free_port, run_example
from tests.test_browser import Requests, chromium

SEEN = 5  # tokens the page must have shown before the tab goes

# Resolves once the page has received SEEN tokens, to the number it has received.
RECEIVED = f"""
new Promise(resolve => {{
  const check = () => {{ if (received >= {SEEN}) resolve(received); }};
  source.addEventListener("message", check);
  check();
}})
"""


@pytest.mark.parametrize("leave", ["close the tab", "navigate away"])
async def test_closing_the_tab_cancels_the_generation(
    aiodelay_server: AiodelayServer,
    tmp_path: Path,
    leave: Literal["close the tab", "navigate away"],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if leave == "navigate away":
        # With its back/forward cache, Chromium keeps the page (and its EventSource's
        # connection) alive after a navigation: the server then sees nobody leave and
        # generates every token (measured: 200 of 200). The cache off, the page goes.
        flags = [*test_browser.FLAGS, "--disable-features=BackForwardCache"]
        monkeypatch.setattr(test_browser, "FLAGS", flags)
    app = await stream.create_app(total=200, delay=0.05)  # 10 s if nobody leaves
    requests = Requests("/tokens")
    aiodelay.add_observer(app, requests)
    server = await aiodelay_server(app)

    async with chromium(tmp_path / "profile") as devtools:
        target = await devtools.send("Target.createTarget", {"url": "about:blank"})
        attached = await devtools.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = attached["sessionId"]
        await devtools.send("Page.navigate", {"url": str(server.make_url("/"))}, page)
        await asyncio.wait_for(requests.started.wait(), 20)  # the EventSource connected
        reply = await devtools.send(
            "Runtime.evaluate",
            {"expression": RECEIVED, "returnByValue": True, "awaitPromise": True},
            page,
        )
        assert "exceptionDetails" not in reply, reply
        received = reply["result"]["value"]
        if leave == "close the tab":
            await devtools.send("Target.closeTarget", {"targetId": target["targetId"]})
        else:
            await devtools.send("Page.navigate", {"url": str(server.make_url("/elsewhere"))}, page)
        outcome = await asyncio.wait_for(requests.ended, 10)

    [generation] = app[stream.GENERATIONS]
    counts = (
        f"page received {received} tokens; the server produced {generation.produced} "
        f"of {generation.total}, then {generation.stopped}"
    )
    print(f"\nstream, {leave}: {counts}")
    assert outcome.kind == "cancelled", counts
    assert outcome.lost is not None, counts
    assert generation.stopped == "cancelled", counts
    assert SEEN <= received <= generation.produced < generation.total, counts


async def test_a_client_that_stays_gets_every_token_then_done(
    aiodelay_server: AiodelayServer,
) -> None:
    app = await stream.create_app(total=20, delay=0)
    server = await aiodelay_server(app)
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/tokens")) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        body = await r.text()
    events = [e for e in body.replace("\r\n", "\n").split("\n\n") if e]
    data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert data == stream.WORDS + stream.WORDS[: 20 - len(stream.WORDS)]
    assert events[-1] == "event: done\ndata: "
    [generation] = app[stream.GENERATIONS]
    assert (generation.produced, generation.stopped) == (20, "completed")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"total": 0}, "total must be at least 1"), ({"delay": -1.0}, "delay must not be negative")],
)
async def test_create_app_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await stream.create_app(**kwargs)  # type: ignore[arg-type]


async def test_run_as_the_readme_says_on_the_port_given() -> None:
    port = free_port()
    async with (
        run_example("stream/app.py", port=port),
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/") as resp,
    ):
        assert resp.status == 200
        assert "EventSource" in await resp.text()
