"""Each demo script of aiodelay/server/demo/ served as the demo serves it, both ways: wait for
it, and leave early. The demo's index page links each script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import aiodelay
from aiodelay.pytest_plugin import AiodelayServer, LiveServer
from aiodelay.server import create_app, history_of
from aiodelay.server._cli import DEMO_DIR


async def _get(server: LiveServer, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url(path)) as resp,
    ):
        return resp.status, await resp.read()


class TimerSpy:
    """Records the loop.call_later() calls whose callback has a given name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        loop = asyncio.get_running_loop()
        real = loop.call_later
        self.handles: list[tuple[float, asyncio.TimerHandle]] = []

        def spy(delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
            handle = real(delay, callback, *args)
            if getattr(callback, "__name__", None) == name:
                self.handles.append((delay, handle))
            return handle

        monkeypatch.setattr(loop, "call_later", spy)


async def test_interrupted_renders_after_five_seconds_or_never(
    aiodelay_server: AiodelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twisted's example both ways, at the same time: one client waits, one leaves."""
    timers = TimerSpy(monkeypatch, "_delayed_render")
    server = await aiodelay_server(create_app(DEMO_DIR))
    started = asyncio.get_running_loop().time()
    waiting = asyncio.ensure_future(_get(server, "/interrupted.rpy"))
    dropped = await server.drop("GET", "/interrupted.rpy")
    assert dropped.cancelled
    assert (dropped.reason, dropped.received) == ("FIN", b"")
    cancelled = [handle for _, handle in timers.handles if handle.cancelled()]
    assert len(cancelled) == 1  # the errback cancelled the dropped request's delayed render

    status, body = await asyncio.wait_for(waiting, 10)
    assert (status, body) == (200, b"<html><body>Sorry to keep you waiting.</body></html>")
    assert asyncio.get_running_loop().time() - started >= 5
    assert [delay for delay, _ in timers.handles] == [5, 5]
    stats = aiodelay.stats(server.app)
    assert (stats.completed, stats.cancelled) == (1, 1)


async def test_asynchronous_work_completes_even_when_the_client_leaves(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app(DEMO_DIR))
    waiting = asyncio.ensure_future(_get(server, "/asynchronous.rpy"))
    dropped = await server.drop("GET", "/asynchronous.rpy", timeout=10)
    assert dropped.ran_on
    assert dropped.ended_after is not None
    assert dropped.ended_after > 1
    status, body = await asyncio.wait_for(waiting, 10)
    assert status == 200
    assert b"completed" in body
    stats = aiodelay.stats(server.app)
    assert (stats.completed, stats.shielded_ran_on, stats.cancelled) == (1, 1, 0)


async def test_stream_writes_lines_until_the_client_leaves(aiodelay_server: AiodelayServer) -> None:
    server = await aiodelay_server(create_app(DEMO_DIR))
    first_line = len(b"A line every second until you leave (close the tab, or press Esc).\n\n")
    dropped = await server.drop("GET", "/stream.rpy", after_response_bytes=first_line + 10)
    assert dropped.cancelled
    assert dropped.status == 200
    assert b"   1  " in dropped.received
    assert b"still here" in dropped.received


async def test_status_page_shows_the_counters(aiodelay_server: AiodelayServer) -> None:
    server = await aiodelay_server(create_app(DEMO_DIR))
    status, page = await _get(server, "/status.rpy")
    assert status == 200
    assert b"aiodelay status" in page
    # Each counter has its cell, and the page's script fills each cell (a cell left out of
    # its list would show "-" for good).
    found = re.search(rb"const COUNTERS = \[([^\]]*)\]", page)
    assert found is not None
    filled = set(re.findall(r'"(\w+)"', found.group(1).decode()))
    for field in dataclasses.fields(aiodelay.Stats):
        assert f'id="{field.name}"'.encode() in page
        assert field.name in filled

    await server.drop("GET", "/interrupted.rpy")
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/status.rpy?json")) as resp,
    ):
        counters = await resp.json()
    for history in ("interrupted", "per_second", "chart"):  # see the tests below
        del counters[history]
    assert counters == {
        "in_flight": 0,  # this request is the page's own: left out
        "completed": 0,  # so is the page
        "left_out": 2,
        "disconnected": 1,
        "cancelled": 1,
        "shielded_ran_on": 0,
        "truncated": 0,
        "failed": 0,
        "timed_out": 0,
        "budgets_ignored": 0,
    }


async def _status_json(server: LiveServer) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/status.rpy?json")) as resp,
    ):
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


async def test_status_page_lists_a_dropped_request_and_counts_it(
    aiodelay_server: AiodelayServer,
) -> None:
    server = await aiodelay_server(create_app(DEMO_DIR))
    before = time.time()
    dropped = await server.drop("GET", "/interrupted.rpy", how="RST")
    after = time.time()
    assert dropped.cancelled
    assert dropped.record is not None
    record = dropped.record
    assert record.lost_at is not None

    status = await _status_json(server)
    [row] = status["interrupted"]
    assert {k: v for k, v in row.items() if k not in ("time", "at", "after")} == {
        "method": "GET",
        "path": "/interrupted.rpy",
        "reason": "RST",
        "outcome": "cancelled",
        "client": "127.0.0.1",
    }
    assert before <= row["at"] <= after
    assert row["after"] == pytest.approx(record.lost_at - record.started_at)
    assert 0 <= row["after"] < 5  # it left long before the render was due
    [kept] = history_of(server.app).rows()
    assert row["time"] == kept.time_of_day
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", row["time"])

    per_second = status["per_second"]
    assert len(per_second) == 300
    assert sum(per_second) == 1
    assert per_second.index(1) >= 300 - 1 - 5  # in one of the last few seconds
    # The chart has one bar, and says what its axes are.
    assert status["chart"].count("<rect ") == 1
    for label in (">0<", ">1<", ">now<", ">\u22125 min<"):
        assert label in status["chart"]


# Serves as /%3Cscript%3Ealert(1)%3C/script%3E.rpy: a directory "<script>alert(1)<" with a
# script "script>.rpy" in it (names a POSIX file system allows), that waits until cancelled.
EVIL_PATH = "/<script>alert(1)</script>.rpy"
EVIL_TARGET = "/%3Cscript%3Ealert(1)%3C/script%3E.rpy"
WAIT_SCRIPT = "import asyncio\n\nasync def resource(request):\n    await asyncio.Event().wait()\n"


def evil_site(root: Path) -> Path:
    """A copy of the demo site, with a script at :data:`EVIL_PATH`."""
    shutil.copytree(DEMO_DIR, root)
    folder = root / "<script>alert(1)<"
    folder.mkdir()
    (folder / "script>.rpy").write_text(WAIT_SCRIPT)
    return root


async def test_status_page_escapes_the_path_in_html(
    aiodelay_server: AiodelayServer, tmp_path: Path
) -> None:
    server = await aiodelay_server(create_app(evil_site(tmp_path / "site")))
    dropped = await server.drop("GET", EVIL_TARGET)
    assert dropped.cancelled

    status, page = await _get(server, "/status.rpy")
    assert status == 200
    text = page.decode()
    escaped = "/&lt;script&gt;alert(1)&lt;/script&gt;.rpy"
    assert f'<td class="path" title="{escaped}">{escaped}</td>' in text
    assert "alert(1)</script>" not in text
    assert text.count("<script>") == 1  # the page's own
    # JSON is not HTML: there the path is as it was (the page's script shows it as text).
    [row] = (await _status_json(server))["interrupted"]
    assert row["path"] == EVIL_PATH


def test_index_links_each_script_and_only_those() -> None:
    scripts = {p.name for p in DEMO_DIR.glob("*.rpy")}
    linked = set(re.findall(r'href="([^"/]+\.rpy)"', (DEMO_DIR / "index.html").read_text()))
    assert "interrupted.rpy" in scripts  # docs/server.md points at it
    assert linked == scripts
