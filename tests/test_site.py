"""Serving a directory: traversal safety, static files, listings, .rpy scripts."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

import aiodelay
from aiodelay.pytest_plugin import AiodelayServer, LiveServer
from aiodelay.server import create_app
from aiodelay.server._cli import DEMO_DIR
from aiodelay.server._site import request_segments

SECRET = b"SECRET-OUTSIDE-THE-ROOT"


@dataclass
class Tree:
    """``tmp/root`` is served; ``tmp/outside`` must never be read or run."""

    root: Path
    outside: Path

    @property
    def evil_ran(self) -> bool:
        return (self.outside / "evil-ran").exists()


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    marker = outside / "evil-ran"
    (outside / "evil.rpy").write_text(f"open({str(marker)!r}, 'w').close()\nresource = None\n")
    (root / "a.txt").write_text("hello\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_text("inner\n")
    (root / "sub" / ".hidden").write_text("hidden\n")
    (root / ".hidden").write_text("hidden\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "page.rpy").write_text("resource = lambda request: None\n# SOURCE-OF-PAGE\n")
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "link-secret").symlink_to(outside / "secret.txt")
    (root / "link-evil.rpy").symlink_to(outside / "evil.rpy")
    (root / "link-in").symlink_to(root / "sub" / "inner.txt")
    (root / "link-hidden").symlink_to(root / ".hidden")
    os.mkfifo(root / "fifo")
    return Tree(root, outside)


async def _raw(port: int, target: str) -> tuple[int, bytes]:
    """Send ``target`` byte for byte (no client-side normalisation); (status, whole response)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return int(response.split(b" ", 2)[1]), response


# Each case: (request target as sent on the wire, expected status).
TRAVERSALS = [
    # Controls: what is inside the root is served.
    ("/a.txt", 200),
    ("/sub/inner.txt", 200),
    ("/link-in", 200),  # a symlink that stays inside the root
    # Dot-dot, plain and percent-encoded (either case), alone and after a real directory.
    ("/../outside/secret.txt", 404),
    ("/sub/../../outside/secret.txt", 404),
    ("/%2e%2e/outside/secret.txt", 404),
    ("/%2E%2E/outside/secret.txt", 404),
    ("/sub/%2e%2e/%2e%2e/outside/secret.txt", 404),
    ("/.%2e/outside/secret.txt", 404),
    ("/sub/../a.txt", 404),  # even when it would land inside: clients normalise, we refuse
    ("/./a.txt", 404),
    # Encoded slashes: one segment that hides a path.
    ("/..%2foutside%2fsecret.txt", 404),
    ("/%2e%2e%2foutside%2fsecret.txt", 404),
    ("/sub%2f..%2f..%2foutside%2fsecret.txt", 404),
    ("/sub%2Finner.txt", 404),
    # Backslashes, raw and encoded (a separator on Windows).
    ("/..%5coutside%5csecret.txt", 404),
    ("/sub%5c..%5c..%5coutside%5csecret.txt", 404),
    ("/sub\\inner.txt", 404),
    # NUL bytes: C-level truncation must not give a.txt.
    ("/a.txt%00", 404),
    ("/a.txt%00.html", 404),
    # Absolute paths in disguise.
    ("//etc/passwd", 404),
    ("/%2fetc%2fpasswd", 404),
    ("/%2Fetc/passwd", 404),
    ("/{outside}/secret.txt", 404),  # the real absolute path, taken relative to the root
    ("http://127.0.0.1/../outside/secret.txt", 404),  # absolute-form request target
    # Symlinks pointing out of the root: neither read nor run.
    ("/link-out/secret.txt", 404),
    ("/link-out/", 404),
    ("/link-secret", 404),
    ("/link-evil.rpy", 404),
    # Dotfiles, also through a symlink and encoded.
    ("/.hidden", 404),
    ("/%2ehidden", 404),
    ("/.git/config", 404),
    ("/sub/.hidden", 404),
    ("/link-hidden", 404),
    # Odd files and odd names.
    ("/fifo", 404),  # opening a FIFO would hang
    ("/a.txt/", 404),
    ("/%ff", 404),  # not UTF-8
    ("/nonexistent", 404),
]


@pytest.mark.parametrize(("target", "status"), TRAVERSALS)
async def test_requests_cannot_leave_the_root(
    aiodelay_server: AiodelayServer, tree: Tree, target: str, status: int
) -> None:
    server = await aiodelay_server(create_app(tree.root))
    got, response = await _raw(server.port, target.format(outside=tree.outside))
    assert got == status
    assert SECRET not in response
    assert not tree.evil_ran


@pytest.mark.parametrize(
    ("raw_path", "segments"),
    [
        ("/", [""]),
        ("/a/b%20c/", ["a", "b c", ""]),
        ("/caf%C3%A9", ["caf\u00e9"]),
        ("a.txt", None),
        ("/a//b", None),
        ("/..", None),
        ("/%2e", None),
        ("/a%2Fb", None),
        ("/a%5Cb", None),
        ("/a%00", None),
        ("/%c3", None),
    ],
)
def test_request_segments(raw_path: str, segments: list[str] | None) -> None:
    assert request_segments(raw_path) == segments


# -- static files and listings -----------------------------------------------------------------


async def _fetch(
    server: LiveServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, server.make_url(path), headers=headers, allow_redirects=False
        ) as resp,
    ):
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def test_static_file_with_content_type_range_and_conditional(
    aiodelay_server: AiodelayServer, tree: Tree
) -> None:
    (tree.root / "style.css").write_text("body { color: red }\n")
    server = await aiodelay_server(create_app(tree.root))
    status, headers, body = await _fetch(server, "/style.css")
    assert (status, headers["Content-Type"], body) == (200, "text/css", b"body { color: red }\n")

    status, _, body = await _fetch(server, "/style.css", headers={"Range": "bytes=0-3"})
    assert (status, body) == (206, b"body")

    etag = headers["ETag"]
    status, _, body = await _fetch(server, "/style.css", headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")

    status, headers, body = await _fetch(server, "/style.css", "HEAD")
    assert (status, headers["Content-Length"], body) == (200, "20", b"")


async def test_static_files_of_an_observed_site_go_out_without_an_error(
    aiodelay_server: AiodelayServer, tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    """The site keeps a history (an observer), so aiodelay writes each response to its end
    itself; aiohttp then prepares it again, which aiohttp's FileResponse took for a new
    response and failed on (an "Unhandled exception" logged for each file served)."""
    caplog.set_level(logging.ERROR, logger="aiohttp")
    (tree.root / "sub" / "index.html").write_text("<h1>index</h1>")
    server = await aiodelay_server(create_app(tree.root))
    async with aiohttp.ClientSession() as session:
        for path, headers, expected in [
            ("/a.txt", {}, 200),
            ("/a.txt", {"Range": "bytes=0-1"}, 206),
            ("/sub/", {}, 200),
            ("/a.txt", {"If-Modified-Since": "Sun, 01 Jan 2090 00:00:00 GMT"}, 304),
        ]:
            async with session.get(server.make_url(path), headers=headers) as resp:
                await resp.read()
                assert resp.status == expected
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp")] == []


async def test_static_files_only_answer_get_and_head(
    aiodelay_server: AiodelayServer, tree: Tree
) -> None:
    server = await aiodelay_server(create_app(tree.root))
    status, headers, _ = await _fetch(server, "/a.txt", "POST")
    assert (status, headers["Allow"]) == (405, "GET,HEAD")


async def test_listing_links_entries_and_hides_what_is_not_served(
    aiodelay_server: AiodelayServer, tree: Tree
) -> None:
    (tree.root / "<b>&.txt").write_text("odd name\n")
    server = await aiodelay_server(create_app(tree.root))
    status, headers, body = await _fetch(server, "/")
    page = body.decode()
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    for shown in ('href="a.txt"', 'href="sub/"', 'href="page.rpy"', 'href="link-in"'):
        assert shown in page
    assert '<a href="%3Cb%3E%26.txt">&lt;b&gt;&amp;.txt</a>' in page
    for hidden in (".hidden", ".git", "link-out", "link-secret", "link-evil", "fifo"):
        assert hidden not in page
    assert (await _fetch(server, "/%3Cb%3E%26.txt"))[2] == b"odd name\n"


async def test_directory_redirects_to_slash_then_serves_index_html(
    aiodelay_server: AiodelayServer, tree: Tree
) -> None:
    (tree.root / "sub" / "index.html").write_text("<h1>index</h1>")
    server = await aiodelay_server(create_app(tree.root))
    status, headers, _ = await _fetch(server, "/sub?x=1")
    assert (status, headers["Location"]) == (301, "/sub/?x=1")
    status, headers, body = await _fetch(server, "/sub/")
    assert (status, headers["Content-Type"], body) == (200, "text/html", b"<h1>index</h1>")


# -- scripts -----------------------------------------------------------------------------------


COUNTING_SCRIPT = """\
from aiohttp import web
with open({log!r}, "a") as log:
    log.write("loaded\\n")
VERSION = {version}
async def resource(request):
    return web.Response(text=f"version {{VERSION}}")
"""


def _write_script(path: Path, log: Path, version: int) -> None:
    path.write_text(COUNTING_SCRIPT.format(log=str(log), version=version))
    # A new modification time even on filesystems with coarse timestamps.
    os.utime(path, ns=(version * 10**9, version * 10**9))


async def test_script_loads_on_first_request_and_again_only_on_change(
    aiodelay_server: AiodelayServer, tree: Tree
) -> None:
    script, log = tree.root / "count.rpy", tree.outside / "loads.log"
    _write_script(script, log, 1)
    server = await aiodelay_server(create_app(tree.root))
    assert not log.exists()  # not before its first request
    assert (await _fetch(server, "/count.rpy"))[2] == b"version 1"
    assert (await _fetch(server, "/count.rpy"))[2] == b"version 1"
    assert log.read_text() == "loaded\n"
    _write_script(script, log, 2)
    assert (await _fetch(server, "/count.rpy"))[2] == b"version 2"
    assert log.read_text() == "loaded\nloaded\n"


async def test_the_plans_of_script_requests_stay_bounded(
    aiodelay_server: AiodelayServer, tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The site makes a route per script request: aiodelay's per-route plans are a bounded
    cache, not one more entry per request for the server's life."""
    from aiodelay._core import installation

    monkeypatch.setattr(installation, "PLANS_KEPT", 3)
    _write_script(tree.root / "count.rpy", tree.outside / "loads.log", 1)
    app = create_app(tree.root)
    server = await aiodelay_server(app)
    for _ in range(10):
        assert (await _fetch(server, "/count.rpy"))[2] == b"version 1"
    assert len(installation.installed_on(app)._plans) <= 3


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("resource = (\n", "broken.rpy: SyntaxError: '(' was never closed (line 1)"),
        (
            "x = 1\nresource = missing_name\n",
            "NameError: name 'missing_name' is not defined (line 2)",
        ),
        ("import sys\nsys.exit(3)\n", "broken.rpy: SystemExit: 3 (line 2)"),
        ("x = 1\n", "broken.rpy defines no module-level `resource`"),
        (
            "resource = 42\n",
            "`resource` must be an aiodelay.Resource or an aiohttp handler, not int",
        ),
        (
            "from aiodelay import Resource\nclass Page(Resource): pass\nresource = Page\n",
            "`resource` is the class Page; use `resource = Page()`",
        ),
    ],
)
async def test_broken_script_is_a_500_with_one_line_then_the_fix_is_picked_up(
    aiodelay_server: AiodelayServer,
    tree: Tree,
    caplog: pytest.LogCaptureFixture,
    source: str,
    reason: str,
) -> None:
    script = tree.root / "broken.rpy"
    script.write_text(source)
    server = await aiodelay_server(create_app(tree.root))
    with caplog.at_level(logging.INFO, logger="aiodelay.site"):
        status, _, body = await _fetch(server, "/broken.rpy")
    assert status == 500
    text = body.decode()
    assert reason in text
    assert text.count("\n") == 1
    assert "Traceback" not in text
    assert "broken.rpy" in caplog.text  # the details are in the server log
    script.write_text(
        "from aiohttp import web\nasync def resource(r):\n    return web.Response()\n"
    )
    os.utime(script, ns=(10**9, 10**9))
    assert (await _fetch(server, "/broken.rpy"))[0] == 200


async def test_script_source_is_never_served(aiodelay_server: AiodelayServer, tree: Tree) -> None:
    server = await aiodelay_server(create_app(tree.root))
    # page.rpy's resource returns None: a 500, not its source.
    status, _, body = await _fetch(server, "/page.rpy")
    assert status == 500
    assert b"SOURCE-OF-PAGE" not in body


async def test_no_scripts_mode_gives_404_and_runs_nothing(
    aiodelay_server: AiodelayServer, tree: Tree
) -> None:
    script, log = tree.root / "count.rpy", tree.outside / "loads.log"
    _write_script(script, log, 1)
    server = await aiodelay_server(create_app(tree.root, scripts=False))
    status, _, body = await _fetch(server, "/count.rpy")
    assert status == 404
    assert b"VERSION" not in body
    assert not log.exists()
    assert b"count.rpy" not in (await _fetch(server, "/"))[2]


async def test_script_handler_kinds(aiodelay_server: AiodelayServer, tree: Tree) -> None:
    (tree.root / "sync.rpy").write_text(
        "from aiohttp import web\ndef resource(request):\n    return web.Response(text='sync')\n"
    )
    (tree.root / "view.rpy").write_text(
        "from aiohttp import web\nclass resource(web.View):\n"
        "    async def get(self):\n        return web.Response(text='view')\n"
    )
    (tree.root / "twisted.rpy").write_text(
        "from aiodelay import Resource\nclass Page(Resource):\n"
        "    def render_GET(self, request):\n        return b'twisted'\nresource = Page()\n"
    )
    server = await aiodelay_server(create_app(tree.root))
    for name in ("sync", "view", "twisted"):
        assert (await _fetch(server, f"/{name}.rpy"))[2] == name.encode()
    assert (await _fetch(server, "/view.rpy", "POST"))[0] == 405


SHIELDED_SCRIPT = """\
import asyncio
import aiodelay
from aiodelay import NOT_DONE_YET, Resource
from aiohttp import web

@aiodelay.shielded
async def resource(request):
    await asyncio.sleep(0.1)
    return web.Response(text="done")
"""


SHIELDED_RESOURCE_SCRIPT = """\
import asyncio
import aiodelay
from aiodelay import Resource

@aiodelay.shielded
class Slow(Resource):
    async def render_GET(self, request):
        await asyncio.sleep(0.1)
        return b"done"

resource = Slow()
"""


@pytest.mark.parametrize("policy", ["cancel", "shield"])
async def test_script_mark_wins_over_the_app_policy(
    aiodelay_server: AiodelayServer, tree: Tree, policy: str
) -> None:
    """The script's own handler is the route's handler, so @aiodelay.shielded applies, on a
    function or on a Resource subclass."""
    (tree.root / "shielded.rpy").write_text(SHIELDED_SCRIPT)
    (tree.root / "plain.rpy").write_text(SHIELDED_SCRIPT.replace("@aiodelay.shielded", ""))
    (tree.root / "shielded_resource.rpy").write_text(SHIELDED_RESOURCE_SCRIPT)
    server = await aiodelay_server(create_app(tree.root, policy=policy))
    assert (await server.drop("GET", "/shielded.rpy")).ran_on
    assert (await server.drop("GET", "/shielded_resource.rpy")).ran_on
    plain = await server.drop("GET", "/plain.rpy")
    assert plain.kind == ("cancelled" if policy == "cancel" else "ran_on")


# A script whose work does not end by itself, in each form a script's resource takes, marked
# MARK: "@aiodelay.deadline(...)" or "@aiodelay.grace(5)". Its work waits for its client to
# leave and then for a tenth of a second (a grace lets it end so); the plain function's is a
# future that nothing resolves.
MARKED_SCRIPTS = {
    "function": """\
import asyncio
import aiodelay
from aiohttp import web

MARK
async def resource(request):
    while not aiodelay.is_disconnected(request):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    return web.Response(text="done")
""",
    "plain function": """\
import asyncio
import aiodelay

MARK
def resource(request):  # returns at once: a "not done yet" future nothing resolves
    return asyncio.get_running_loop().create_future()
""",
    "Resource subclass": """\
import asyncio
import aiodelay
from aiodelay import Resource

MARK
class Slow(Resource):
    async def render_GET(self, request):
        while not aiodelay.is_disconnected(request.request):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        return b"done"

resource = Slow()
""",
    "web.View": """\
import asyncio
import aiodelay
from aiohttp import web

MARK
class resource(web.View):
    async def get(self):
        while not aiodelay.is_disconnected(self.request):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        return web.Response(text="done")
""",
}


@pytest.mark.parametrize("form", list(MARKED_SCRIPTS))
async def test_a_scripts_deadline_is_honoured(
    aiodelay_server: AiodelayServer, tree: Tree, form: str
) -> None:
    """As on any route: the script's handler is stopped when its deadline passes."""
    source = MARKED_SCRIPTS[form].replace("MARK", "@aiodelay.deadline(0.2, status=503)")
    (tree.root / "slow.rpy").write_text(source)
    app = create_app(tree.root)
    server = await aiodelay_server(app)
    outcome = await server.drop("GET", "/slow.rpy", after_seconds=5)
    assert outcome.timed_out, outcome
    assert outcome.status == 503, outcome
    assert aiodelay.stats(app).timed_out == 1


@pytest.mark.parametrize("form", [f for f in MARKED_SCRIPTS if f != "plain function"])
async def test_a_scripts_grace_is_honoured(
    aiodelay_server: AiodelayServer, tree: Tree, form: str
) -> None:
    """As on any route: the script's work runs on for its grace after its client left."""
    (tree.root / "slow.rpy").write_text(MARKED_SCRIPTS[form].replace("MARK", "@aiodelay.grace(5)"))
    (tree.root / "plain.rpy").write_text(MARKED_SCRIPTS[form].replace("MARK", ""))
    server = await aiodelay_server(create_app(tree.root))
    assert (await server.drop("GET", "/slow.rpy")).ran_on
    assert (await server.drop("GET", "/plain.rpy")).cancelled


def test_create_app_refuses_what_is_not_a_directory(tree: Tree) -> None:
    with pytest.raises(FileNotFoundError):
        create_app(tree.root / "missing")
    with pytest.raises(NotADirectoryError):
        create_app(tree.root / "a.txt")


async def test_a_request_handler_error_in_a_script_keeps_the_server_up(
    aiodelay_server: AiodelayServer, tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    (tree.root / "raises.rpy").write_text(
        "async def resource(request):\n    raise ValueError('boom')\n"
    )
    server = await aiodelay_server(create_app(tree.root))
    assert (await _fetch(server, "/raises.rpy"))[0] == 500
    assert "ValueError: boom" in caplog.text
    assert (await _fetch(server, "/a.txt"))[0] == 200


# -- the demo site (aiodelay/server/demo/) -----------------------------------------------------


class DemoTimers:
    """Records the loop.call_later() calls of the callback named ``name`` (with the delay the
    script asked for) and runs them after ``scale`` times that delay, so a test need not wait
    the demo's five seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, scale: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        real = loop.call_later
        self.handles: list[tuple[float, asyncio.TimerHandle]] = []

        def spy(delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
            if getattr(callback, "__name__", None) != name:
                return real(delay, callback, *args)
            handle = real(delay * scale, callback, *args)
            self.handles.append((delay, handle))
            return handle

        monkeypatch.setattr(loop, "call_later", spy)


def _interrupted_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "interrupted by" in r.getMessage()]


@pytest.mark.parametrize("policy", ["cancel", "shield"])
async def test_interrupted_demo_does_what_the_policy_says(
    aiodelay_server: AiodelayServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    """cancel: leaving cancels the delayed render.  shield: the render runs on to its end (its
    five seconds, here shortened to 0.5) after the request started (only it calls finish()),
    and the log says so with that time; no line claims what did not happen (it said "ran on"
    after 0.0s, the render cancelled).
    """
    caplog.set_level(logging.INFO, "aiodelay")
    timers = DemoTimers(monkeypatch, "_delayed_render", scale=0.1)
    server = await aiodelay_server(create_app(DEMO_DIR, policy=policy))
    seen = await server.drop("GET", "/interrupted.rpy", wait="seen")
    ended = await seen.wait_ended(timeout=10)
    assert ended.record is not None
    took = ended.record.ended_at - ended.record.started_at
    [(delay, handle)] = timers.handles
    assert delay == 5
    delay *= 0.1
    [line] = _interrupted_lines(caplog)
    stats = aiodelay.stats(server.app)
    if policy == "cancel":
        assert ended.cancelled
        assert handle.cancelled()
        assert took < delay
        assert line.endswith(": cancelled")
        assert (stats.cancelled, stats.shielded_ran_on) == (1, 0)
    else:
        assert ended.ran_on
        assert took >= delay - 0.01  # timers may fire a clock tick early
        match = re.search(r": ran on \(shielded\), ended after (\d+\.\d+)s$", line)
        assert match is not None, line
        assert float(match.group(1)) >= delay - 0.01
        assert (stats.cancelled, stats.shielded_ran_on) == (0, 1)
    assert ended.received == b""  # nothing was rendered to the client that left


@pytest.mark.parametrize("policy", ["cancel", "shield"])
async def test_stream_demo_stops_when_the_client_leaves_whatever_the_policy(
    aiodelay_server: AiodelayServer, policy: str
) -> None:
    """A stream has no end to run on to: it is marked cancellable."""
    server = await aiodelay_server(create_app(DEMO_DIR, policy=policy))
    dropped = await server.drop("GET", "/stream.rpy", after_response_bytes=1)
    assert dropped.cancelled


async def test_demo_without_scripts_says_scripts_are_off(
    aiodelay_server: AiodelayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every demo link used to be a bare 404: now a 404 page that says why, and still nothing
    runs.  It says so for any .rpy name, so it does not tell which scripts exist."""
    timers = DemoTimers(monkeypatch, "_delayed_render")
    app = create_app(DEMO_DIR, scripts=False)
    server = await aiodelay_server(app)
    index = (await _fetch(server, "/"))[2].decode()
    links = re.findall(r'href="([^"]+\.rpy)"', index)
    assert len(links) >= 4
    for path in [*links, "no-such.rpy", "SUB/Upper.RPY"]:
        status, headers, body = await _fetch(server, "/" + path)
        assert status == 404, path
        assert headers["Content-Type"].startswith("text/html")
        assert b"scripts are off" in body
        assert b"--no-scripts" in body
        assert b"import" not in body  # not the script's source either
    assert timers.handles == []
    # The site observes its requests (its history): each is recorded once aiohttp is done
    # with it, which may come a turn after its client read the whole response.
    for _ in range(1000):
        if not aiodelay.stats(app).in_flight:
            break
        await asyncio.sleep(0)
    assert aiodelay.stats(app).completed == len(links) + 3  # the index and the 404 pages


async def test_status_demo_leaves_out_its_own_requests(aiodelay_server: AiodelayServer) -> None:
    """ "in flight" was never 0 (the poll asking) and "completed" rose with every poll."""
    server = await aiodelay_server(create_app(DEMO_DIR))
    assert (await _fetch(server, "/status.rpy"))[0] == 200
    counters = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(server.make_url("/status.rpy?json")) as resp:
                counters.append(await resp.json())
    assert [c["in_flight"] for c in counters] == [0, 0, 0]
    assert [c["completed"] for c in counters] == [0, 0, 0]
    assert [c["left_out"] for c in counters] == [2, 3, 4]  # the page, the polls and this one

    await server.drop("GET", "/interrupted.rpy")
    assert (await _fetch(server, "/a-file-that-is-not-there"))[0] == 404
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/status.rpy?json")) as resp,
    ):
        status = await resp.json()
        assert len(status.pop("interrupted")) == 1  # tested in test_demo.py
        del status["per_second"], status["chart"]
        assert status == {
            "in_flight": 0,
            "completed": 1,  # the 404: not this page's
            "disconnected": 1,
            "cancelled": 1,
            "shielded_ran_on": 0,
            "truncated": 0,
            "failed": 0,
            "timed_out": 0,
            "budgets_ignored": 0,
            "left_out": 5,
        }


async def test_demo_serves_a_favicon(aiodelay_server: AiodelayServer) -> None:
    """Each page load logged a 404 for /favicon.ico."""
    server = await aiodelay_server(create_app(DEMO_DIR))
    status, headers, body = await _fetch(server, "/favicon.ico")
    assert status == 200
    assert headers["Content-Type"].startswith("image/")
    assert body.startswith(b"\0\0\1\0")  # an ICO header
